# `make test` and `make demo` work on a fresh machine with only Python and pip:
# they create .venv, install the project (with torch from PyPI or a local mirror) and run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where datasets live (cifar100/ below it). Defaults to the shared offline copy beside the repo;
# where that does not hold CIFAR-100, `make demo` downloads it into ./data/cifar100 (MD5-checked).
TESKD_DATA ?= $(abspath ../shared/data)
export TESKD_DATA
# Unset: torch comes from the default index (on Linux that is the CUDA build, ~5.6 GB with its
# nvidia-* packages, even for a CPU run). Set it to install torch/torchvision from another index
# first, e.g. the CPU-only build: make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=

.PHONY: install test test-fast demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX_URL),$(BIN)/python -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e '.[test,plot,export,tensorboard,timm,cluster]'
	touch $(STAMP)

install: $(STAMP)
	@echo "teskd is installed in $(VENV)/: run 'source $(VENV)/bin/activate' in your shell (or call $(BIN)/teskd)"

# two pytest workers (pytest-xdist): the suite took 14:37 in one process and 9:00 in two on the 2-core VM
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# the quick tier for the inner loop (no slow tests: real runs, several processes, sweeps); CI runs `make test`
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
