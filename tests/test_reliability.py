"""Crash safety and input safety: killed runs resume to the same weights, bad input never destroys work."""

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from teskd.cli import main
from teskd.engine import checkpoint as ckpt_mod
from teskd.engine.checkpoint import load_checkpoint, load_latest, save_checkpoint

from conftest import REPO, SHARED_CIFAR100
from conftest import hooked_trainer as conftest_hooked_trainer

CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_teskd.yaml")


def tiny_args(root, *extra):
    # 2 epochs x 8 steps of a 1/8-width ResNet-18 TESKD on 400 real CIFAR-100 images, deterministic
    return [f"data.root={root}", "model.width_mult=0.125", "data.subset_per_class=4",
            "data.test_subset_per_class=1", "data.batch_size=50", "train.epochs=2", "train.progress=false",
            "train.deterministic=true", "train.threads=1", "train.checkpoint_every=1", *extra]


def final_weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100}")
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", CONFIG, *tiny_args(SHARED_CIFAR100), "--out", str(out)]) == 0
    return out


def _cli(*args):
    return [sys.executable, "-m", "teskd.cli", *args]


def hooked_trainer(args, run: Path, hook):
    return conftest_hooked_trainer(CONFIG, args, run, hook)


def _wait_for_new_checkpoint(proc, path: Path, after: float, timeout: float = 120) -> bool:
    """Wait until ``path`` is (re)written after time ``after`` while ``proc`` runs."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if path.exists() and path.stat().st_mtime > after:
            return True
        time.sleep(0.02)
    return False


def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference_run, tmp_path):
    """Kill a real training process with SIGKILL three times at random moments, resume each time."""
    rng = random.Random(1234)
    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.pt"
    kills = resumes = 0
    for attempt in range(8):
        has_ckpt = last.is_file() or (run / "checkpoints" / "last.prev.pt").is_file()
        resumes += has_ckpt
        cmd = (_cli("train", "--resume", str(run)) if has_ckpt
               else _cli("train", CONFIG, *tiny_args(SHARED_CIFAR100), "--out", str(run), "--overwrite"))
        started = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if kills < 3 and _wait_for_new_checkpoint(proc, last, started):
            # training is under way (it saves after every step): kill at a random moment within a few steps,
            # which may fall inside a step, a checkpoint write or an evaluation
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert proc.returncode == 0, err.decode()[-2000:]
    assert kills >= 2 and resumes >= 2  # killed while training, and resumed from what it had saved
    assert_same_weights(final_weights(run), final_weights(reference_run))
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2


def test_sigterm_saves_a_checkpoint_and_resume_matches(reference_run, tmp_path):
    run = tmp_path / "term"
    proc = subprocess.Popen(_cli("train", CONFIG, *tiny_args(SHARED_CIFAR100), "--out", str(run)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)  # training has started once the first step's checkpoint exists
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 128 + signal.SIGTERM
    message = err.decode().strip().splitlines()[-1]
    assert message.startswith("error: SIGTERM received: stopped at epoch") and f"--resume {run}" in message
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["progress"] is None or state["progress"]["step"] >= 1
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_weights(final_weights(run), final_weights(reference_run))


def test_resume_from_mid_epoch_checkpoint_in_process(reference_run, tmp_path):
    """A mid-epoch checkpoint (epoch 2, after batch 4) resumes to the same weights and epoch metrics."""
    run = tmp_path / "mid"

    def interrupt(trainer, call, out):
        if call == 12:  # epoch 2 (8 steps each), during its 4th step
            trainer.stop_signal = "SIGINT"
        return out

    trainer = hooked_trainer(tiny_args(SHARED_CIFAR100), run, interrupt)
    with pytest.raises(Exception) as info:
        trainer.run()
    assert "SIGINT received: stopped at epoch 2, batch 4" in str(info.value)
    progress = load_checkpoint(run / "checkpoints" / "last.pt")["progress"]
    assert progress["epoch"] == 1 and progress["step"] == 4
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_weights(final_weights(run), final_weights(reference_run))
    ref = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ref, got):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]


def test_non_finite_loss_stops_with_details_and_keeps_the_checkpoint(tmp_path, cifar100_root):
    run = tmp_path / "nan"

    def poison(trainer, call, out):
        if call == 8 + 3:  # epoch 2, batch index 2
            out.loss = out.loss * float("nan")
        return out

    trainer = hooked_trainer(tiny_args(cifar100_root, "train.checkpoint_every=0"), run, poison)
    with pytest.raises(Exception) as info:
        trainer.run()
    message = str(info.value)
    assert "non-finite loss at epoch 2, batch index 2 (global step 10): loss=nan ce=" in message
    assert "kd=" in message and "feat=" in message and "\n" not in message
    state = load_checkpoint(run / "checkpoints" / "last.pt")  # still the good end of epoch 1
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                        if v.is_floating_point())


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)
    before = sha(path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(Exception) as info:
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    assert str(info.value) == (f"could not write checkpoint {path}: No space left on device; "
                               f"the previous checkpoint is unchanged")
    assert sha(path) == before and torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]  # no temp files left


def test_checksum_detects_damage_and_resume_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(4)}, "config": {}, "epoch": 1, "num_classes": 4}, path)
    save_checkpoint({"model": {"w": torch.full((4,), 2.0)}, "config": {}, "epoch": 2, "num_classes": 4}, path)
    assert load_checkpoint(path)["epoch"] == 2 and load_checkpoint(ckpt_mod.previous_path(path))["epoch"] == 1
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=f"checkpoint {path} fails its checksum"):
        load_checkpoint(path)
    state, used = load_latest(path)
    assert used == ckpt_mod.previous_path(path) and state["epoch"] == 1
    assert "using the previous checkpoint" in capsys.readouterr().out


def test_truncated_checkpoint_is_named_and_left_alone(reference_run, tmp_path, capsys):
    run = tmp_path / "trunc"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((reference_run / "config.yaml").read_text())
    good = (reference_run / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(good[: len(good) // 3])
    before = sha(run / "checkpoints" / "last.pt")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoints' / 'last.pt'} is corrupt" in err and len(err.splitlines()) == 1
    assert sha(run / "checkpoints" / "last.pt") == before


def test_checkpoint_from_another_architecture_is_refused(reference_run, tmp_path, capsys):
    code = main(["eval", str(reference_run), "model.arch=resnet34"])
    err = capsys.readouterr().err
    assert code == 2 and "does not match resnet34/teskd" in err and len(err.splitlines()) == 1


def test_class_count_mismatch_is_refused(reference_run, tmp_path, capsys):
    root = tmp_path / "cifar10"
    root.mkdir()
    g = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 10)):
        np.savez(root / f"{split}.npz", x=g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n) % 10, classes=np.array([f"c{i}" for i in range(10)]))
    code = main(["eval", str(reference_run), "data.dataset=cifar10", f"data.root={root}",
                 "data.subset_per_class=null", "data.test_subset_per_class=null"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained for 100 classes, but cifar10 has 10" in err


def test_debug_flag_shows_the_traceback():
    with pytest.raises(Exception, match="unknown config key train.nope"):
        main(["--debug", "info", CONFIG, "train.nope=1"])


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random as pyrandom

    from teskd.engine.runtime import rng_state as _rng_state, set_rng_state as _set_rng_state

    pyrandom.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    save_checkpoint({"model": {}, "config": {}, "rng": _rng_state()}, path)
    expected = (pyrandom.random(), np.random.rand(), torch.rand(1).item())
    pyrandom.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    _set_rng_state(load_checkpoint(path)["rng"])  # loads with weights_only=True
    assert (pyrandom.random(), np.random.rand(), torch.rand(1).item()) == expected
