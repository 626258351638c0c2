"""A run killed at every file operation of its save/resume path, in turn, resumes to the same weights."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill-point driver forks (POSIX only)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("killpoints")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "killpoints_driver.py"), str(work)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(result: dict, reference_epochs: int = 2) -> None:
    where = f"kill point {result['at']} {result['op']}"
    assert result["killed"], f"{where}: the run was not killed there (operations changed order?)"
    assert result.get("code") == 0, f"{where}: resume failed: {result.get('error', result)}"
    assert result["differing"] == [], f"{where}: weights differ from the uninterrupted run: {result['differing']}"
    assert result["epochs"] == list(range(1, reference_epochs + 1)), f"{where}: metrics epochs {result['epochs']}"
    assert result["summary_epochs"] == reference_epochs, where
    assert result["best_epoch"] == result["summary_best_epoch"], f"{where}: best.pt out of step with the summary"
    assert result["leftover_tmp"] == [], f"{where}: temporary files left behind: {result['leftover_tmp']}"


def test_every_operation_of_the_save_path_is_covered(report):
    kinds = Counter(op for op, _ in report["fresh_ops"])
    # temp-file creation, a torn write, fsync, renames, digest files, metrics appends, best.pt's link
    for kind in ("write", "write-partial", "fsync", "replace", "append", "link"):
        assert kinds[kind] >= 1, kind
    names = {name for _, name in report["fresh_ops"]}
    for name in ("last.pt", "last.prev.pt", "last.prev.pt.sha256", "last.pt.sha256", "best.pt", "best.pt.sha256",
                 "metrics.jsonl", "config.yaml", "summary.json", "deployed.safetensors"):
        assert name in names, name
    assert len(report["fresh"]) == len(report["fresh_ops"])  # every kill point, not a sample
    assert len(report["resume"]) == len(report["resume_ops"]) and report["resume_ops"]


def test_killed_at_each_operation_of_a_fresh_run_then_resumed_is_bit_identical(report):
    for result in report["fresh"]:
        _check(result)


def test_killed_at_each_operation_of_a_resume_then_resumed_again_is_bit_identical(report):
    kinds = Counter(op for op, _ in report["resume_ops"])
    assert kinds["replace"] >= 1 and kinds["write"] >= 1  # the metrics rewrite and the config of the resume
    for result in report["resume"]:
        _check(result)
