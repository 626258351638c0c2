"""The engine's hooks for methods that depend on the data or on training progress: the training-set
size, the epoch (ramps), state outside the network kept across resume, same-class batch pairing,
and the training vs deployed cost in summary.json."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from teskd.build import build_model
from teskd.config import MethodParams, load_config
from teskd.data.arrays import ImageArrays
from teskd.data.memory_loader import InMemoryLoader
from teskd.data.torch_loader import TorchLoader
from teskd.launch import assemble
from teskd.methods.base import Method, StepOutput, register_method
from teskd.models import count_macs, count_params

from killpoints_driver import train_args, write_data


@dataclass
class HookParams(MethodParams):
    name: str = "test_hooks"


class Hooks(Method):
    """Counts how often each training sample was seen, in state outside the network."""

    name = "test_hooks"
    params_class = HookParams
    batch_pairing = "same_class"
    calls: list = []

    def setup_data(self, num_train_samples, world_size=1):
        type(self).calls.append(("setup", num_train_samples, world_size))
        self.seen = torch.zeros(num_train_samples, dtype=torch.int64)

    def on_epoch_start(self, epoch, epochs):
        super().on_epoch_start(epoch, epochs)
        type(self).calls.append(("epoch", epoch, epochs))

    def training_state_dict(self):
        return {"seen": self.seen.clone()}

    def load_training_state(self, state):
        type(self).calls.append(("load", int(state["seen"].sum())))
        self.seen.copy_(state["seen"])

    def forward_train(self, images, labels, index=None):
        half = labels.shape[0] // 2
        assert torch.equal(labels[:half], labels[half:])  # the partners are of the same class
        self.seen.index_add_(0, index[:half].cpu(), torch.ones(half, dtype=torch.int64))
        logits = self.backbone(images[:half])
        loss = F.cross_entropy(logits, labels[:half])
        return StepOutput(loss, {"ce": loss.detach()}, {"deployed": logits}, labels=labels[:half])

    def forward_eval(self, images):
        return {"deployed": self.backbone(images)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cifar10"
    write_data(root)  # 20 training images (2 per class), 10 test images
    return root


def test_hooks_are_called_and_training_state_survives_resume(data, tmp_path):
    args = [*train_args(data), "method.name=test_hooks"]
    Hooks.calls = []
    run = tmp_path / "run"
    first = assemble(load_config(None, [*args, "train.epochs=1"]), run)
    first.run()
    assert Hooks.calls == [("setup", 20, 1), ("epoch", 0, 1)]
    assert first.method.seen.tolist() == [1] * 20  # every sample once per epoch, partners not counted
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # accuracy is counted on the labels the method scored: 20 images, not 40
    assert 0 <= records[0]["train_acc"]["deployed"] <= 100

    Hooks.calls = []
    second = assemble(load_config(None, [*args, "train.epochs=2"]), run, resume=True)
    second.run()
    assert Hooks.calls == [("setup", 20, 1), ("load", 20), ("epoch", 1, 2)]
    assert second.method.seen.tolist() == [2] * 20


def _arrays(labels):
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ImageArrays(images, torch.tensor(labels), None)


def test_same_class_pairing_in_memory_is_seeded_resumable_and_sharded():
    labels = [i % 4 for i in range(23)]
    loader = InMemoryLoader(_arrays(labels), 5, shuffle=True, drop_last=False, transform=lambda x: x.float(),
                            device="cpu", seed=3)
    loader.pair_same_class()
    loader.set_epoch(2)
    batches = list(loader)
    assert len(batches) == 5
    partners = []
    for images, y, index in batches:
        b = index.shape[0] // 2
        assert torch.equal(y[:b], y[b:]) and torch.equal(y, torch.tensor(labels)[index])
        assert torch.equal(images[:, 0, 0, 0], index.float())  # the images are the indexed samples
        partners += index[b:].tolist()
    assert sum(p != i for p, i in zip(partners, [i for _, _, x in batches for i in x[:x.shape[0] // 2].tolist()])) > 5
    again = list(loader.iter_from(3))
    assert all(torch.equal(a.index, b.index) for a, b in zip(again, batches[3:]))
    loader.set_epoch(3)
    assert not all(torch.equal(a.index, b.index) for a, b in zip(loader, batches))
    for rank in (0, 1):  # each rank pairs its own shard within the class
        shard = InMemoryLoader(_arrays(labels), 5, shuffle=True, drop_last=False, transform=lambda x: x.float(),
                               device="cpu", seed=3, rank=rank, world_size=2)
        shard.pair_same_class()
        for _, y, index in shard:
            b = index.shape[0] // 2
            assert torch.equal(y[:b], y[b:])


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = torch.tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((3, 2, 2), float(i)), int(self.labels[i])


def test_same_class_pairing_with_a_dataloader_matches_the_in_memory_order():
    labels = [i % 3 for i in range(17)]
    common = dict(shuffle=True, drop_last=False, device="cpu", seed=1)
    torch_loader = TorchLoader(_Labelled(labels), 4, **common)
    memory = InMemoryLoader(_arrays(labels), 4, transform=lambda x: x.float(), **common)
    for loader in (torch_loader, memory):
        loader.pair_same_class()
        loader.set_epoch(1)
    for a, b in zip(torch_loader, memory, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.images[:, 0, 0, 0], a.index.float())


def test_pairing_needs_labels_for_every_sample():
    loader = InMemoryLoader(_arrays([0, 1, 0]), 2, shuffle=True, drop_last=False, transform=lambda x: x.float(),
                            device="cpu")
    with pytest.raises(Exception, match="one label per sample"):
        loader.pair_same_class(torch.tensor([0, 1]))


def test_summary_counts_trained_and_deployed_cost(data, tmp_path):
    from test_engine_seams import FrozenTeacher

    register_method(FrozenTeacher)  # removed after this test by conftest's registries_unchanged
    trainer = assemble(load_config(None, [*train_args(data), "method.name=test_frozen_teacher",
                                         "train.epochs=1"]), tmp_path / "kd")
    summary = trainer.run()
    backbone = trainer.method.backbone
    assert summary["params_train"] == count_params(backbone)  # the frozen teacher is not trained
    assert summary["params_deploy"] == count_params(backbone)
    assert summary["macs_deploy"] == count_macs(backbone)
    assert summary["macs_train"] == count_macs(backbone) + count_macs(trainer.method.teacher)


def test_teskd_kd_ramp_scales_only_the_kd_part():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    parts = {}
    for ramp in (0, 8):
        torch.manual_seed(1)
        method = build_model(load_config(None, ["model.width_mult=0.0625", f"method.kd_ramp_epochs={ramp}"]), 100)
        method.train().on_epoch_start(2, 20)
        parts[ramp] = method(x, y).parts
    scale = math.exp(-5 * (1 - 2 / 8) ** 2)
    assert parts[8]["kd"].item() == pytest.approx(parts[0]["kd"].item() * scale, rel=1e-5)
    assert parts[8]["ce"].item() == pytest.approx(parts[0]["ce"].item(), rel=1e-6)


@pytest.fixture(autouse=True, scope="module")
def test_methods_registered():
    """This file's methods, registered while its tests run (and removed after: conftest's snapshot)."""
    from teskd.registry import METHODS

    for method in (Hooks,):
        register_method(method)
    yield
    for method in (Hooks,):
        METHODS.unregister(method.name)
