"""torch 2.14.1's CPU channels_last kernels corrupt the heap in the backward of 1x1 strided convolutions with
fewer than 8 input channels (the shortcut of a ResNet-18 at width 1/16): such networks train in NCHW."""

import subprocess
import sys

import torch

from teskd.config import TrainConfig
from teskd.engine import runtime
from teskd.models import build_backbone

from conftest import REPO


def test_tiny_width_networks_keep_nchw_on_the_cpu_and_compute_the_same():
    torch.manual_seed(0)
    net = build_backbone("resnet18", 10, 0.0625)
    x = torch.randn(2, 3, 32, 32)
    want = net.eval()(x)
    method, _ = runtime.prepare_model(net, TrainConfig(channels_last=True), torch.device("cpu"))
    assert all(p.is_contiguous() for p in method.parameters())  # not converted to channels_last
    assert torch.allclose(method(x.contiguous(memory_format=torch.channels_last)), want, atol=1e-6)
    wide, _ = runtime.prepare_model(build_backbone("resnet18", 10, 0.125), TrainConfig(channels_last=True),
                                    torch.device("cpu"))
    assert wide.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # 8 channels: unaffected


def test_tiny_width_training_step_does_not_crash(tmp_path):
    """In a subprocess: where the bug is, the old code died with SIGSEGV/SIGABRT in the first backward."""
    code = ("import torch; from teskd.models import build_backbone; from teskd.engine import runtime; "
            "from teskd.config import TrainConfig; torch.set_num_threads(1); "
            "m = build_backbone('resnet18', 100, 0.0625); "
            "_, m = runtime.prepare_model(m, TrainConfig(channels_last=True), torch.device('cpu')); "
            "x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last); "
            "[torch.nn.functional.cross_entropy(m(x), torch.zeros(4, dtype=torch.long)).backward() for _ in range(2)]; "
            "print('stepped')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stepped" in proc.stdout


def test_training_says_once_that_it_keeps_nchw(tmp_path, cifar100_root, capsys):
    from teskd.cli import main

    args = [f"data.root={cifar100_root}", "model.width_mult=0.0625", "data.subset_per_class=1",
            "data.test_subset_per_class=1", "train.epochs=1", "train.progress=false", "train.threads=1"]
    assert main(["train", str(REPO / "configs/cifar100/resnet18_ce.yaml"), *args, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr()
    assert out.out.count(runtime.NCHW_NOTE) == 1 and out.err == ""
