import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Where the real-data tests look, first match wins: $TESKD_DATA (what teskd itself reads), then the
# offline copy beside the repository.
DATA_FOLDERS = [Path(p) for p in (os.environ.get("TESKD_DATA"), REPO.parent / "shared" / "data") if p]
DATA_HINT = "set TESKD_DATA to the folder holding it, e.g. TESKD_DATA=/path/to/datasets make test"


def find_data(name: str, marker: str) -> Path:
    """``FOLDER/name`` of the first data folder whose ``name/marker`` exists (else that of the first folder)."""
    for folder in DATA_FOLDERS:
        if (folder / name / marker).exists():
            return folder / name
    return DATA_FOLDERS[0] / name


SHARED_CIFAR100 = find_data("cifar100", "train.npz")


@pytest.fixture(autouse=True)
def registries_unchanged():
    """Whatever a test registers (a method, backbone, dataset or export format) is gone after it, and what
    it removes is back: no test sees another's entries. Entries a whole module needs are registered by a
    module-scoped fixture there (set up before this snapshot)."""
    from teskd.data.registry import DATASETS
    from teskd.deploy.formats import FORMATS
    from teskd.models.registry import BACKBONES
    from teskd.registry import METHODS

    registries = (METHODS, BACKBONES, DATASETS, FORMATS)
    for registry in registries:
        registry.names()  # the built-ins first: importing them during the test must not count as the test's
    saved = [registry.snapshot() for registry in registries]
    modules = set(sys.modules)
    yield
    for registry, entries in zip(registries, saved):
        registry.restore(entries)
    # a plug-in of tests/ that the test imported (TESKD_PLUGINS) registered itself on import: forget the module
    # too, so that the next test's import registers it again
    for name in set(sys.modules) - modules:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(REPO / "tests")):
            del sys.modules[name]


@pytest.fixture
def cifar100_root() -> Path:
    """The real CIFAR-100 (npz layout) under $TESKD_DATA or ../shared/data; skipped, visibly, if absent."""
    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 (cifar100/train.npz, test.npz) not found at {SHARED_CIFAR100}: {DATA_HINT}")
    return SHARED_CIFAR100


def hooked_trainer(config, args, run: Path, hook, **kwargs):
    """A Trainer whose every training forward's output passes through ``hook(trainer, call_number, output)``
    (a forward hook on the method: the method itself is not patched)."""
    from teskd.config import load_config
    from teskd.launch import assemble

    trainer = assemble(load_config(config, args), run, **kwargs)
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


IMAGENETTE = find_data("imagenette-mini", "train")


def train_imagenette(out: Path, eval_resize: int = 36) -> Path:
    """A 1-epoch, 1/16-width ImageNet-style run on the real imagenette-mini JPEGs at 32 px (skipped if absent)."""
    from teskd.cli import main

    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"imagenette-mini (train/, val/) not found at {IMAGENETTE}: {DATA_HINT}")
    args = [f"data.root={IMAGENETTE}", "data.image_size=32", f"data.eval_resize={eval_resize}",
            "data.subset_per_class=2", "data.test_subset_per_class=2", "data.batch_size=10", "data.workers=0",
            "model.width_mult=0.0625", "train.epochs=1", "schedule.warmup_epochs=0", "train.progress=false",
            "train.threads=1"]
    config = str(REPO / "configs" / "imagefolder" / "small_resnet18_teskd.yaml")
    assert main(["train", config, *args, "--out", str(out)]) == 0
    return out


# The slow tier (`make test-fast` skips it; `make test` and CI run it): whole modules of real training runs,
# several processes or forked kill points, and the single tests below. Marked here so the list is in one place.
SLOW_MODULES = {"test_killpoints", "test_distributed", "test_reliability", "test_demo", "test_imagefolder_train",
                "test_sweep", "test_sweep_launchers", "test_readme_walkthrough", "test_import_official"}
SLOW_TESTS = {"test_two_exports_to_one_file_at_once", "test_every_architecture_is_rebuilt_exactly_and_its_graph_would_pass",
              "test_the_operator_list_is_exactly_what_the_exports_contain", "test_a_run_can_be_loaded_at_every_file_operation_of_its_saves",
              "test_imagenet_resnet18_teskd_trains_at_common_image_sizes", "test_fifo_image_stops_training_in_one_line",
              "test_png_bomb_in_training_stops_in_one_line", "test_png_bomb_in_training_is_skipped_and_reported",
              "test_fifo_image_is_skipped_counted_and_reported"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
