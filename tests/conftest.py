from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR100 = REPO.parent / "shared" / "data" / "cifar100"


@pytest.fixture
def cifar100_root() -> Path:
    """The real CIFAR-100 (npz layout) beside the repository; skipped, visibly, if absent."""
    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100} (see ../shared/data/README.md)")
    return SHARED_CIFAR100


def hooked_trainer(config, args, run: Path, hook, **kwargs):
    """A Trainer whose every training forward's output passes through ``hook(trainer, call_number, output)``
    (a forward hook on the method: the method itself is not patched)."""
    from teskd.config import load_config
    from teskd.engine.trainer import Trainer

    trainer = Trainer(load_config(config, args), run, **kwargs)
    calls = {"n": 0}

    def forward_hook(module, args, output):
        if not module.training:
            return None  # evaluation passes through unchanged
        calls["n"] += 1
        return hook(trainer, calls["n"], output)

    trainer.method.register_forward_hook(forward_hook)
    return trainer


def randomize_bn(module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics (so eval outputs depend on them)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette-mini"


def train_imagenette(out: Path, eval_resize: int = 36) -> Path:
    """A 1-epoch, 1/16-width ImageNet-style run on the real imagenette-mini JPEGs at 32 px (skipped if absent)."""
    from teskd.cli import main

    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"imagenette-mini not found at {IMAGENETTE} (see ../shared/data/README.md)")
    args = [f"data.root={IMAGENETTE}", "data.image_size=32", f"data.eval_resize={eval_resize}",
            "data.subset_per_class=2", "data.test_subset_per_class=2", "data.batch_size=10", "data.workers=0",
            "model.width_mult=0.0625", "train.epochs=1", "schedule.warmup_epochs=0", "train.progress=false",
            "train.threads=1"]
    config = str(REPO / "configs" / "imagefolder" / "small_resnet18_teskd.yaml")
    assert main(["train", config, *args, "--out", str(out)]) == 0
    return out
