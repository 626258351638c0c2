"""A full disk is named as such even when removing the failed temporary file frees megabytes again."""

import os
from pathlib import Path

import pytest
import torch

from teskd import fileio
from teskd.engine import checkpoint
from teskd.errors import TeskdError

CAPACITY = 4 << 20  # a 4 MiB filesystem: more than fileio.disk_is_full's 1 MiB margin once the temp file is gone


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """``tmp_path`` behaves like a 4 MiB filesystem: statvfs reports 4 MiB minus the bytes of its files, and a write
    that would pass the capacity fails the way torch's zip writer fails (a RuntimeError, not an OSError)."""
    real_statvfs = os.statvfs

    def used() -> int:
        return sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())

    class Fake:
        def __init__(self, real):
            self.f_frsize = 1
            self.f_bavail = max(0, CAPACITY - used())

    monkeypatch.setattr(os, "statvfs", lambda p: Fake(real_statvfs(p)) if str(p).startswith(str(tmp_path))
                        else real_statvfs(p))
    real_write = checkpoint._HashingWriter.write

    def write(self, data):
        room = CAPACITY - used()
        if len(data) > room:  # as write(2) does: what fits is written, then the disk is full
            real_write(self, bytes(memoryview(data).cast("B")[:room]))
            self.f.flush()
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3145792 vs 3145728")
        return real_write(self, data)

    monkeypatch.setattr(checkpoint._HashingWriter, "write", write)
    return tmp_path


def test_checkpoint_on_a_full_disk_says_no_space_left(small_disk):
    path = Path(small_disk) / "last.pt"
    big = {"model": {"w": torch.zeros(2 << 20)}}  # 8 MiB of float32: does not fit
    with pytest.raises(TeskdError) as err:
        checkpoint.save_checkpoint(big, path)
    assert str(err.value) == (f"could not write checkpoint {path}: No space left on device; "
                              f"the previous checkpoint is unchanged")
    assert sorted(p.name for p in Path(small_disk).iterdir()) == []  # the temporary file is gone
    assert not fileio.disk_is_full(small_disk)  # ... and with it the evidence: the reason was read before


def test_a_run_can_be_loaded_at_every_file_operation_of_its_saves(tmp_path, cifar100_root):
    """teskd.load of a run while it trains: called at every file operation of its checkpoint saves (the moments
    between the renames of last.pt, last.prev.pt and their digest files), it always returns a network."""
    import teskd
    from teskd.cli import main

    run = tmp_path / "run"
    loaded, ops = [], []

    def hook(op, path):
        ops.append(op)
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("last*.pt")):
            model, preprocess, _ = teskd.load(run)
            loaded.append(model(torch.zeros(1, 3, 32, 32)).shape)

    args = [f"data.root={cifar100_root}", "model.width_mult=0.125", "data.subset_per_class=2",
            "data.test_subset_per_class=1", "data.batch_size=100", "train.epochs=2", "train.checkpoint_every=1",
            "train.progress=false", "train.threads=1", "--out", str(run)]
    fileio.fault_hook = hook
    try:
        assert main(["train", str(Path(__file__).parents[1] / "configs/cifar100/resnet18_ce.yaml"), *args]) == 0
    finally:
        fileio.fault_hook = None
    assert ops.count("replace") >= 8 and len(loaded) >= 10
    assert set(loaded) == {torch.Size([1, 100])}
