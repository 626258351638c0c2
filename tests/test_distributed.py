"""Several processes (torchrun, gloo on the CPU): the same training as one process with the same global
batch, evaluation that counts every test image once, stop/resume, and a two-"node" rendezvous."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from teskd.cli import main
from teskd.config import load_config
from teskd.engine.checkpoint import load_checkpoint, save_checkpoint
from teskd.launch import per_rank as _per_rank
from teskd.errors import TeskdError

from conftest import REPO

CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "TESKD_PLUGINS": "gn_backbone",
       "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "plugins"), os.environ.get("PYTHONPATH", "")])}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """CIFAR-10 layout: 20 training images, 11 test images (odd: the ranks get 6 and 5)."""
    root = tmp_path_factory.mktemp("data") / "cifar10"
    root.mkdir()
    g = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 11)):
        np.savez(root / f"{split}.npz", x=g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n) % 10, classes=np.array([f"c{i}" for i in range(10)]))
    return root


def args(data, *extra):
    # no augmentation: one process and two see the same images (each rank draws its own crops otherwise)
    return [CONFIG, "data.dataset=cifar10", f"data.root={data}", "data.batch_size=10", "data.eval_batch_size=4",
            "data.subset_per_class=null", "data.test_subset_per_class=null", "data.crop_padding=0",
            "data.hflip=false", "model.arch=test_gn_net", "train.epochs=2", "train.progress=false",
            "train.threads=1", "train.deterministic=true", *extra]


def torchrun(*argv, nproc=2, extra=(), **kw):
    return subprocess.run([*TORCHRUN, *extra, f"--nproc_per_node={nproc}", "-m", "teskd", "train", *argv],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def one_process(*argv):
    return subprocess.run([sys.executable, "-m", "teskd", "train", *argv], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def epochs(run: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("two") / "run"
    proc = torchrun(*args(data), "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes: global batch 10 = 2 x 5 per process" in proc.stdout
    assert proc.stdout.count("run directory:") == 1  # only the primary rank prints
    return run


def test_two_processes_train_like_one_with_the_same_global_batch(data, two, tmp_path):
    single = tmp_path / "single"
    proc = one_process(*args(data), "--out", str(single))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(single, two) < 1e-5  # the same arithmetic, summed in another order
    assert epochs(two) == [1, 2]
    ref = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ref, got):  # meters reduced over both ranks: the epoch's numbers, not one rank's
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_acc"] == b["test_acc"]


@pytest.fixture
def plugin(monkeypatch):
    """The test backbone, importable in this process too."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "plugins"))
    monkeypatch.setenv("TESKD_PLUGINS", "gn_backbone")


def test_sharded_evaluation_counts_every_test_image_once(two, capsys, plugin):
    # 11 test images over 2 ranks (6 + 5, no padding duplicates): the reported accuracy is the
    # one-process accuracy of the same weights on all 11
    assert main(["eval", str(two), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 11
    last = json.loads((two / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_acc"]["deployed"] == result["accuracy"]["deployed"]["top1"]
    assert round(last["test_acc"]["deployed"] * 11 / 100, 6).is_integer()


def test_two_processes_stopped_by_sigterm_resume_to_the_same_weights(data, tmp_path):
    long = args(data, "train.epochs=12")
    reference = tmp_path / "reference"
    assert torchrun(*long, "--out", str(reference)).returncode == 0
    run = tmp_path / "stopped"
    proc = subprocess.Popen([*TORCHRUN, "--nproc_per_node=2", "-m", "teskd", "train", *long, "--out", str(run)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
    out, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert "SIGTERM received: stopped" in err
    resumed = torchrun(*long, "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_diff(reference, run) == 0.0
    assert epochs(run) == list(range(1, 13))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_train_like_two_local_processes(data, two, tmp_path):
    run, port = tmp_path / "nodes", _free_port()
    launch = ["--nnodes=2", "--master_addr=127.0.0.1", f"--master_port={port}"]
    nodes = [subprocess.Popen([*TORCHRUN, *launch, f"--node_rank={r}", "--nproc_per_node=1", "-m", "teskd",
                               "train", *args(data), "--out", str(run)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [p.communicate(timeout=600) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), results[0][1][-2000:] + results[1][1][-2000:]
    assert max_diff(two, run) == 0.0
    assert epochs(run) == [1, 2]


def test_global_batch_is_split_over_processes_or_refused():
    cfg = load_config(None, ["data.batch_size=256", "data.eval_batch_size=100"])
    per_rank = _per_rank(cfg.data, 8)
    assert (per_rank.batch_size, per_rank.eval_batch_size) == (32, 13)
    assert _per_rank(cfg.data, 1) is cfg.data
    with pytest.raises(TeskdError, match="data.batch_size=256 is the global batch: it must divide evenly over 3"):
        _per_rank(cfg.data, 3)


def test_mid_epoch_checkpoint_of_two_processes_resumes_only_with_two(data, tmp_path, capsys, plugin):
    run = tmp_path / "mid"
    assert main(["train", *args(data, "train.checkpoint_every=1", "train.epochs=1"), "--out", str(run)]) == 0
    state = load_checkpoint(run / "checkpoints" / "last.prev.pt")  # the mid-epoch save
    assert state["progress"]["step"] == 1
    state["progress"]["world_size"] = 2
    for name in ("last.pt", "last.prev.pt"):
        save_checkpoint(state, run / "checkpoints" / name, keep_previous=False)
    assert main(["train", "--resume", str(run)]) == 2
    assert "stopped inside epoch 1 with 2 processes; resume it with that many" in capsys.readouterr().err


def test_two_processes_resumed_mid_epoch_log_the_whole_epochs_metrics(data, tmp_path):
    """A mid-epoch checkpoint of two processes holds both ranks' running sums: the resumed epoch logs the same
    training loss and accuracy as the uninterrupted one (it used to log rank 0's half of the first batch only)."""
    full = tmp_path / "full"
    assert torchrun(*args(data, "train.checkpoint_every=1", "train.epochs=1"), "--out", str(full)).returncode == 0
    state = load_checkpoint(full / "checkpoints" / "last.prev.pt")  # after batch 1 of 2
    assert state["progress"]["step"] == 1 and state["progress"]["seen"] == 10  # both ranks' 5 images
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((full / "config.yaml").read_text())
    save_checkpoint(state, run / "checkpoints" / "last.pt", keep_previous=False)
    resumed = torchrun("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, got = (json.loads((r / "metrics.jsonl").read_text()) for r in (full, run))
    assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-9)
    assert got["train_acc"] == ref["train_acc"]
    assert max_diff(full, run) == 0.0


@pytest.mark.parametrize("name, branches", [("cskd", {"deployed"}), ("one", {"branch1", "branch2", "branch3",
                                                                             "ensemble"})])
def test_methods_with_pairs_or_extra_branches_train_in_two_processes(data, tmp_path, name, branches):
    """CS-KD's pairs are drawn within each rank's shard (the method refuses a batch whose halves differ in
    class); ONE's extra branches and gate are synchronised like the backbone."""
    run = tmp_path / name
    proc = torchrun(*args(data, f"method.name={name}", "train.epochs=1"), "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(record["test_acc"]) == branches
    assert all(torch.isfinite(v.double()).all() for v in weights(run).values())


def test_teskd_in_channels_last_gives_ddp_gradients_its_bucket_layout(data, tmp_path):
    """TESKD's 1x1 fusion convolutions run on 1x1 features, where the CPU's backward gives gradients NCHW strides
    and the parameters have NHWC ones (the same bytes): DDP warned "Grad strides do not match bucket view strides"
    (a copy it flags as slow). The gradients now arrive with their parameters' strides, and training is as before."""
    run = tmp_path / "teskd"
    proc = torchrun(CONFIG.replace("resnet18_ce", "resnet18_teskd"), *args(data, "train.epochs=1")[1:],
                    "model.arch=resnet18", "model.width_mult=0.125", "train.channels_last=true", "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in proc.stderr, proc.stderr[-3000:]
    assert all(torch.isfinite(v.double()).all() for v in weights(run).values())


def test_pskd_in_two_processes_trains_like_one(data, tmp_path):
    """Each rank keeps the whole prediction table (the steps' predictions are all-gathered), so the second
    epoch's targets, and the weights, are those of one process with the same global batch."""
    single, two = tmp_path / "single", tmp_path / "two"
    assert one_process(*args(data, "method.name=pskd"), "--out", str(single)).returncode == 0
    proc = torchrun(*args(data, "method.name=pskd"), "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(single, two) < 1e-5
    tables = [torch.load(run / "checkpoints" / "last.pt", weights_only=True)["method_state"]["predictions"]
              for run in (single, two)]
    assert torch.allclose(tables[0], tables[1], atol=1e-6) and (tables[0].sum(1) > 0.99).all()


def _gather_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from teskd.engine import distributed

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        mine = torch.full((2 + rank, 3), float(rank))  # rank 0: 2 rows, rank 1: 3 rows
        torch.save(distributed.all_gather_cat(mine), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_gather_cat_concatenates_unequal_shards_in_rank_order(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "gathered")
    mp.spawn(_gather_worker, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    expect = torch.cat([torch.zeros(2, 3), torch.ones(3, 3)])
    for rank in (0, 1):
        assert torch.equal(torch.load(f"{out}.{rank}", weights_only=True), expect)
