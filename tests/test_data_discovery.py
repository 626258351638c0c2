"""Where the real-data tests look: $TESKD_DATA first (what teskd itself reads), then ../shared/data."""

import os
import subprocess
import sys

import conftest
from conftest import REPO


def test_teskd_data_comes_first_then_the_shared_copy(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TESKD_DATA"}
    code = "import conftest; print([str(p) for p in conftest.DATA_FOLDERS])"
    run = lambda extra: subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", env={**env, **extra},  # noqa: E731
                                       capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    shared = str(REPO.parent / "shared" / "data")
    assert run({"TESKD_DATA": str(tmp_path)}) == str([str(tmp_path), shared])
    assert run({}) == str([shared])
    assert run({"TESKD_DATA": ""}) == str([shared])


def test_find_data_takes_the_first_folder_holding_the_dataset(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    (second / "cifar100").mkdir(parents=True)
    (second / "cifar100" / "train.npz").write_bytes(b"")
    monkeypatch.setattr(conftest, "DATA_FOLDERS", [first, second])
    assert conftest.find_data("cifar100", "train.npz") == second / "cifar100"
    (first / "cifar100").mkdir(parents=True)
    (first / "cifar100" / "train.npz").write_bytes(b"")
    assert conftest.find_data("cifar100", "train.npz") == first / "cifar100"
    # held by neither: the first folder's, so the skip reason names where $TESKD_DATA points
    assert conftest.find_data("imagenette-mini", "train") == first / "imagenette-mini"


def test_the_skip_reason_says_how_to_provide_the_data():
    assert conftest.DATA_HINT == "set TESKD_DATA to the folder holding it, e.g. TESKD_DATA=/path/to/datasets make test"
    assert "shared/data/README" not in (REPO / "tests" / "conftest.py").read_text()  # a clone has no such file
