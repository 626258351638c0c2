# `make test` and `make demo` work on a fresh machine with only Python and pip:
# they create .venv, install the project (with torch from PyPI or a local mirror) and run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where datasets live (cifar100/ below it). Defaults to the shared offline copy beside the repo.
TESKD_DATA ?= $(abspath ../shared/data)
export TESKD_DATA

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
