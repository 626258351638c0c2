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
