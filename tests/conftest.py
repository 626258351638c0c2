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


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Training runs set process-wide torch switches (threads, deterministic algorithms); undo them
    after each test so no test depends on which ran before it."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = benchmark


def hooked_trainer(config, args, run: Path, hook, **kwargs):
    """A Trainer whose every training forward passes through ``hook(trainer, call_number, output)``."""
    from teskd.config import load_config
    from teskd.engine.trainer import Trainer

    trainer = Trainer(load_config(config, args), run, **kwargs)
    original = trainer.method.forward_train
    calls = {"n": 0}

    def forward_train(images, labels):
        calls["n"] += 1
        return hook(trainer, calls["n"], original(images, labels))

    trainer.method.forward_train = forward_train
    return trainer
