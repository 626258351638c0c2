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
