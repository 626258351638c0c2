"""Run folders: --overwrite never destroys what teskd did not write, one writer per run, clean errors on
full disks, read-only and vanished folders, and resume semantics (no checkpoint yet, changed settings)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from teskd.cli import main
from teskd.engine import checkpoint as ckpt_mod
from teskd.engine.checkpoint import load_checkpoint, save_checkpoint
from teskd.engine.metrics import MetricsLog
from teskd.engine.rundir import RunDir, RunLock
from teskd.errors import TeskdError

from conftest import REPO, hooked_trainer
from killpoints_driver import CONFIG, train_args, write_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cifar10"
    write_data(root)
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", CONFIG, *train_args(data), "--out", str(out)]) == 0
    return out


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def hooked(args, run: Path, hook, **kw):
    return hooked_trainer(CONFIG, args, run, hook, **kw)


# --- --overwrite and --out ------------------------------------------------------------------


def test_overwrite_refuses_a_folder_teskd_did_not_write(data, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    (folder / "config.yaml").write_text("mine too")
    assert main(["train", CONFIG, *train_args(data), "--out", str(folder), "--overwrite"]) == 2
    err = one_line_error(capsys)
    assert "refusing to --overwrite" in err and "thesis.tex" in err
    assert (folder / "thesis.tex").read_text() == "precious" and (folder / "config.yaml").read_text() == "mine too"


def test_overwrite_of_the_current_directory_is_refused(data, tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    assert main(["train", CONFIG, *train_args(data), "--out", ".", "--overwrite"]) == 2
    assert "refusing to --overwrite ." in one_line_error(capsys)
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_overwrite_with_bad_data_leaves_the_previous_run_intact(reference, tmp_path, capsys):
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(reference), str(run)], check=True)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", CONFIG, *train_args(tmp_path / "nowhere"), "--out", str(run), "--overwrite"]) == 2
    assert "no cifar10 data found" in one_line_error(capsys)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_overwrite_replaces_a_previous_run(reference, data, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(reference), str(run)], check=True)
    (run / "checkpoints" / ".last.pt.orphan.tmp").write_bytes(b"x" * 100)
    args = [*train_args(data), "train.epochs=1"]
    assert main(["train", CONFIG, *args, "--out", str(run), "--overwrite"]) == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert not (run / "checkpoints" / ".last.pt.orphan.tmp").exists()


def test_out_naming_an_existing_file_is_refused(data, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep")
    assert main(["train", CONFIG, *train_args(data), "--out", str(target)]) == 2
    assert "is an existing file" in one_line_error(capsys)
    assert target.read_text() == "keep"


# --- resume -----------------------------------------------------------------------------------


def test_resume_before_the_first_checkpoint_starts_again(reference, data, tmp_path, capsys):
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.yaml").write_text((reference / "config.yaml").read_text())
    (run / "metrics.jsonl").write_text('{"epoch": 1, "torn')
    assert main(["train", "--resume", str(run)]) == 0
    assert "starting the run again from the beginning" in capsys.readouterr().out
    assert_same_weights(run, reference)
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a teskd run directory" in one_line_error(capsys)
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in one_line_error(capsys)


def test_torn_last_metrics_line_is_dropped_on_resume(reference, tmp_path, capsys):
    run = tmp_path / "torn"
    subprocess.run(["cp", "-a", str(reference), str(run)], check=True)
    (run / "summary.json").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a kill in the middle of an append
    assert main(["train", "--resume", str(run)]) == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert "incomplete last line" in capsys.readouterr().out


def test_damaged_metrics_line_in_the_middle_is_a_one_line_error(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.path.write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(TeskdError, match="line 2 is not an epoch record"):
        log.read()


def test_metrics_rewrite_is_atomic(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    text = '{"epoch": 1}\n{"epoch": 2}\n'
    log.path.write_text(text)

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(TeskdError, match="No space left on device"):
        log.truncate_after(1)
    assert log.path.read_text() == text  # never a truncated or empty file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_fewer_epochs_on_resume_are_refused(reference, tmp_path, capsys):
    run = tmp_path / "fewer"
    subprocess.run(["cp", "-a", str(reference), str(run)], check=True)
    config = (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "train.epochs=1"]) == 2
    assert "has finished 2 epochs; train.epochs=1 would discard" in one_line_error(capsys)
    assert (run / "config.yaml").read_text() == config


def test_more_epochs_on_resume_say_what_changed(reference, tmp_path, capsys):
    run = tmp_path / "more"
    subprocess.run(["cp", "-a", str(reference), str(run)], check=True)
    assert main(["train", "--resume", str(run), "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "resuming with changed settings: train.epochs: 2 -> 3" in out
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3


def test_changed_width_names_the_mismatching_tensors(reference, tmp_path, capsys):
    run = tmp_path / "width"
    subprocess.run(["cp", "-a", str(reference), str(run)], check=True)
    assert main(["train", "--resume", str(run), "model.width_mult=0.125"]) == 2
    err = one_line_error(capsys)
    assert "shape mismatches backbone.conv1.weight (file [4, 3, 3, 3], model [8, 3, 3, 3])" in err


def test_mid_epoch_resume_with_another_batch_size_is_refused(data, tmp_path, capsys):
    run = tmp_path / "mid"

    def stop(trainer, call, out):
        if call == 1:
            trainer.stop_signal = "SIGTERM"
        return out

    with pytest.raises(TeskdError, match="SIGTERM received: stopped at epoch 1, batch 1"):
        hooked(train_args(data), run, stop).run()
    assert main(["train", "--resume", str(run), "data.batch_size=5"]) == 2
    assert "inside epoch 1 after batch 1 of data.batch_size=10" in one_line_error(capsys)


def test_sigterm_is_honoured_when_an_epoch_has_one_batch(data, reference, tmp_path):
    run = tmp_path / "single"
    args = [*train_args(data), "data.batch_size=20", "train.epochs=3"]

    def stop(trainer, call, out):
        if call == 1:
            trainer.stop_signal = "SIGTERM"
        return out

    with pytest.raises(TeskdError, match="SIGTERM received: stopped after epoch 1, after saving"):
        hooked(args, run, stop).run()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_best_pt_is_the_same_file_as_the_epochs_last_pt(reference):
    best = load_checkpoint(reference / "checkpoints" / "best.pt")
    summary = json.loads((reference / "summary.json").read_text())
    assert best["epoch"] == summary["best_epoch"] == best["best"]["epoch"]


# --- one writer per run -----------------------------------------------------------------------


def test_second_writer_is_refused_naming_the_holder(reference, tmp_path, capsys):
    run = tmp_path / "busy"
    subprocess.run(["cp", "-a", str(reference), str(run)], check=True)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with RunLock(RunDir(run)):
        assert main(["train", "--resume", str(run), "train.epochs=3"]) == 2
        err = one_line_error(capsys)
        assert f"run directory {run} is in use by another teskd process (pid {os.getpid()} on" in err
        assert main(["train", CONFIG, "--out", str(run), "--overwrite", *train_args(reference)]) == 2
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    # the lock dies with its holder: a killed holder never blocks the next run
    proc = subprocess.run([sys.executable, "-c", "import os, fcntl, signal; fd = os.open(%r, os.O_RDWR);"
                           "fcntl.flock(fd, fcntl.LOCK_EX); os.kill(os.getpid(), signal.SIGKILL)"
                           % str(run / ".teskd.lock")])
    assert proc.returncode == -9
    with RunLock(RunDir(run)):
        pass


def test_two_processes_on_one_run_one_is_refused(data, tmp_path):
    run = tmp_path / "race"
    cmd = [sys.executable, "-m", "teskd.cli", "train", CONFIG, *train_args(data), "train.epochs=40",
           "train.checkpoint_every=0", "--out", str(run)]  # long enough for a second process to start
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run / ".teskd.lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.stat().st_size > 0) and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the first run holds the lock once its holder note is written
    second = subprocess.run([sys.executable, "-m", "teskd.cli", "train", "--resume", str(run)],
                            cwd=REPO, capture_output=True, text=True)
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-2000:]
    if "in use by another teskd process" not in second.stderr:
        pytest.skip("the first run finished before the second started")
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 41))


# --- hand-made and damaged checkpoints ----------------------------------------------------------


@pytest.mark.parametrize("damage", ["no_num_classes", "no_epoch", "no_rng", "negative_epoch", "not_a_dict"])
def test_hand_made_checkpoint_is_a_one_line_error(reference, tmp_path, capsys, damage):
    run = tmp_path / "hand"
    subprocess.run(["cp", "-a", str(reference), str(run)], check=True)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    if damage == "no_num_classes":
        del state["num_classes"]
    elif damage == "no_epoch":
        del state["epoch"]
    elif damage == "no_rng":
        del state["rng"]
    elif damage == "negative_epoch":
        state["epoch"] = -3
    else:
        state = [1, 2, 3]
    for name in ("last.pt", "last.prev.pt"):
        save_checkpoint(state, run / "checkpoints" / name, keep_previous=False)
    assert main(["train", "--resume", str(run)]) == 2
    assert "damaged or hand-made" in one_line_error(capsys) or damage == "not_a_dict"


def test_garbage_checkpoint_never_suggests_unpickling(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"model": {}, "config": {}, "obj": np.dtype("float32")}, path)
    with pytest.raises(TeskdError) as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) and "never unpickles" in str(info.value)
    assert info.value.__cause__ is not None  # --debug shows the real cause


# --- vanished, read-only and full folders -------------------------------------------------------


def test_run_folder_removed_mid_run_is_not_recreated(data, tmp_path):
    run = tmp_path / "gone"

    def remove(trainer, call, out):
        if call == 2:
            subprocess.run(["rm", "-rf", str(run)], check=True)
        return out

    with pytest.raises(TeskdError, match="was removed or moved while training"):
        hooked(train_args(data), run, remove).run()
    assert not run.exists()


def _can_mount() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A real 3 MiB tmpfs (needs root; skipped, visibly, where the machine does not allow mounts)."""
    point = tmp_path / "fs"
    point.mkdir()
    if not (_can_mount() and _mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(point))):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield point
    subprocess.run(["umount", "-l", str(point)])


def _fill(folder: Path, leave: int) -> None:
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_real_full_disk_while_saving_is_a_one_line_error(small_fs, data, capsys):
    run = small_fs / "run"
    args = [*train_args(data), "train.epochs=1"]
    _fill(small_fs, 64 * 1024)  # room for the config and the log, not for a checkpoint
    assert main(["train", CONFIG, *args, "--out", str(run)]) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "could not write" in err
    assert not list(run.rglob("*.tmp"))


def test_real_full_disk_keeps_the_old_summary_and_checkpoint(small_fs):
    path = small_fs / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)
    summary = small_fs / "summary.json"
    summary.write_text('{"old": true}')
    _fill(small_fs, 0)
    with pytest.raises(TeskdError, match="No space left on device"):
        save_checkpoint({"model": {"w": torch.zeros(10000)}, "config": {}}, path)
    from teskd import fileio

    with pytest.raises(TeskdError, match=f"could not write {summary}: No space left on device"):
        fileio.atomic_write_text(summary, json.dumps({"new": "x" * 100000}))
    with pytest.raises(TeskdError, match="No space left on device"):
        fileio.append_line(small_fs / "metrics.jsonl", "y" * 100000)
    assert summary.read_text() == '{"old": true}'
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_read_only_run_folder_on_resume_is_a_one_line_error(reference, tmp_path, capsys):
    run = tmp_path / "ro"
    subprocess.run(["cp", "-a", str(reference), str(run)], check=True)
    (run / ".teskd.lock").unlink(missing_ok=True)
    if not (_can_mount() and _mount("--bind", str(run), str(run))):
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if not _mount("-o", "remount,ro,bind", str(run)):
            pytest.skip("cannot remount read-only here")
        assert main(["train", "--resume", str(run), "train.epochs=3"]) == 2
        assert "cannot write to the run directory" in one_line_error(capsys)
    finally:
        subprocess.run(["umount", "-l", str(run)])


def test_failed_rename_during_save_keeps_a_loadable_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}, "epoch": 1, "num_classes": 2}, path)
    from teskd import fileio

    calls = {"n": 0}
    real = os.replace

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # after last.pt became last.prev.pt, before its digest file followed
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", flaky)
    with pytest.raises(TeskdError, match="Input/output error"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}, "epoch": 2, "num_classes": 2}, path)
    monkeypatch.setattr(fileio.os, "replace", real)
    state, used = ckpt_mod.load_latest(path)
    assert used.name == "last.prev.pt" and state["epoch"] == 1
