"""The seams new methods and scales plug into: the method is the module that trains (DDP wraps it),
methods may step twice or freeze modules, and a Trainer leaves the process as it found it."""

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from teskd.build import build_model
from teskd.config import MethodParams, load_config
from teskd.engine.callbacks import Callback
from teskd.engine.step import Optimization, make_optimizer
from teskd.engine.trainer import Trainer
from teskd.launch import assemble, checkpoint_minutes
from teskd.methods.base import Method, StepOutput, register_method
from teskd.models import build_backbone

from killpoints_driver import CONFIG, train_args, write_data


@dataclass
class TwoStepParams(MethodParams):
    name: str = "test_two_steps"


class TwoSteps(Method):
    """Alternating updates as in DML: two optimizer steps per batch (here on two losses of one network)."""

    name = "test_two_steps"
    params_class = TwoStepParams
    steps_taken = 0

    def forward_train(self, images, labels, index=None):
        logits = self.backbone(images)
        return StepOutput(F.cross_entropy(logits, labels), {}, {"deployed": logits})

    def forward_eval(self, images):
        return {"deployed": self.backbone(images)}

    def training_step(self, model, batch, opt):
        for _ in range(2):
            with opt.autocast():
                out = model(*batch)
            opt.zero_grad()
            opt.backward(out.loss)
            opt.step()
            type(self).steps_taken += 1
        return out


@dataclass
class FrozenParams(MethodParams):
    name: str = "test_frozen_teacher"


class FrozenTeacher(Method):
    """Classic KD's shape: a frozen (pretrained) teacher guides the trained network, which is deployed."""

    name = "test_frozen_teacher"
    params_class = FrozenParams
    deploy_branch = "student"
    seen_modes: list = []

    def __init__(self, backbone, num_classes, params, input_size=32):
        super().__init__(backbone, num_classes, params, input_size)
        self.teacher = build_backbone("resnet18", num_classes, 0.0625)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def frozen_modules(self):
        return [self.teacher]

    def forward_train(self, images, labels, index=None):
        type(self).seen_modes.append((self.training, self.teacher.training))
        with torch.no_grad():
            target = self.teacher(images).softmax(1)
        logits = self.backbone(images)
        loss = F.cross_entropy(logits, labels) + F.kl_div(logits.log_softmax(1), target, reduction="batchmean")
        return StepOutput(loss, {}, {"student": logits})

    def forward_eval(self, images):
        return {"student": self.backbone(images), "teacher": self.teacher(images)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cifar10"
    write_data(root)
    return root


def test_method_is_the_module_that_trains():
    method = build_model(load_config(None, ["model.width_mult=0.0625", "data.dataset=cifar10"]), 10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = method.train()(x, y)
    assert set(out.logits) == {"teacher", "student1", "student2", "student3"} and out.loss.ndim == 0
    scores = method.eval()(x)
    assert method.deploy_branch == "teacher" and torch.equal(scores["teacher"], method.deploy_module(x))
    with pytest.raises(ValueError, match="needs labels"):
        method.train()(x)


def test_two_optimizer_steps_per_batch_train_through_the_engine(data, tmp_path):
    TwoSteps.steps_taken = 0
    trainer = assemble(load_config(None, [*train_args(data), "method.name=test_two_steps"]), tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    summary = trainer.run()
    assert TwoSteps.steps_taken == 2 * 2 * 2  # 2 epochs x 2 batches x 2 steps
    assert summary["method"] == "test_two_steps" and summary["epochs"] == 2
    after = trainer.method.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_a_frozen_module_stays_out_of_the_optimizer_and_in_eval_mode(data, tmp_path):
    FrozenTeacher.seen_modes = []
    trainer = assemble(load_config(None, [*train_args(data), "method.name=test_frozen_teacher"]), tmp_path / "kd")
    frozen = {id(p) for p in trainer.method.teacher.parameters()}
    optimized = {id(p) for g in trainer.opt.optimizer.param_groups for p in g["params"]}
    assert frozen and not frozen & optimized
    assert optimized == {id(p) for p in trainer.method.backbone.parameters()}
    teacher_before = {k: v.clone() for k, v in trainer.method.teacher.state_dict().items()}
    summary = trainer.run()
    assert FrozenTeacher.seen_modes and all(m == (True, False) for m in FrozenTeacher.seen_modes)
    for k, v in trainer.method.teacher.state_dict().items():  # BN running stats too: eval mode
        assert torch.equal(v, teacher_before[k]), k
    records = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert summary["deployed_top1_last"] == records[-1]["test_acc"]["student"]  # the deployed branch


def test_a_trainer_leaves_process_settings_and_rngs_as_it_found_them(data, tmp_path):
    torch.set_num_threads(2)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    assemble(load_config(CONFIG, [*train_args(data), "train.epochs=1"]), tmp_path / "run").run()
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == env
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])


def test_ddp_wraps_the_method_and_steps_like_the_method(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from teskd.engine.runtime import match_gradient_strides

    cfg = load_config(None, ["model.width_mult=0.0625", "data.dataset=cifar10"])
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    models = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for wrap in (False, True):
            torch.manual_seed(0)
            method = build_model(cfg, 10).train()
            opt = Optimization(make_optimizer(method, cfg.optim), torch.device("cpu"), None)
            if wrap:  # as prepare_model wraps it: gradients given their parameters' strides (no DDP layout warning)
                match_gradient_strides(method)
            model = DistributedDataParallel(method) if wrap else method
            method.training_step(model, (x, y, None), opt)
            models.append(method.state_dict())
    finally:
        dist.destroy_process_group()
    plain, ddp = models
    for k in plain:
        assert torch.allclose(plain[k], ddp[k], rtol=0, atol=1e-6), k


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_run_start(self, start):
        self.calls.append(("start", start.start_epoch, start.resumed))

    def on_epoch_end(self, record):
        self.calls.append(("epoch", record["epoch"], sorted(record["test_acc"])))

    def on_run_end(self, end):
        self.calls.append(("end", end.summary["epochs"], [r["epoch"] for r in end.records], end.num_classes))

    def close(self):
        self.calls.append(("close",))


def test_the_trainer_does_only_what_its_callbacks_do_and_leaves_the_callers_config(data, tmp_path, monkeypatch):
    """The assembly resolves a copy of the config (relative data root made absolute for config.yaml); a trainer
    handed only a recording callback writes no export, summary or figure: those are launch's callbacks."""
    monkeypatch.chdir(data.parent)
    cfg = load_config(None, [*train_args(data), f"data.root={data.name}", "train.epochs=2", "method.name=ce"])
    run = tmp_path / "run"
    assembled = assemble(cfg, run)
    assert cfg.data.root == data.name and assembled.cfg.data.root == str(data.absolute())
    assert [type(c).__name__ for c in assembled.callbacks] == ["ExportDeployed", "WriteSummary", "DrawCurves"]
    assert assembled.parts.checkpoint_minutes == 0.0  # in-memory data: the spec's interval (epoch ends only)
    assert checkpoint_minutes(load_config(None, ["train.checkpoint_minutes=5"])) == 5.0
    assert checkpoint_minutes(load_config(None, ["data.dataset=imagefolder"])) == 30.0
    recorder = Recorder()
    summary = Trainer(assembled.parts, run, callbacks=[recorder]).run()
    assert recorder.calls == [("start", 0, False), ("epoch", 1, ["deployed"]), ("epoch", 2, ["deployed"]),
                              ("end", 2, [1, 2], 10), ("close",)]
    assert summary["epochs"] == 2 and summary["method"] == "ce"
    assert sorted(p.name for p in run.iterdir()) == [".teskd.lock", "checkpoints", "config.yaml", "metrics.jsonl"]
    assert f"root: {data.absolute()}" in (run / "config.yaml").read_text()


@dataclass
class OddPairingParams(MethodParams):
    name: str = "test_odd_pairing"


class OddPairing(TwoSteps):
    name = "test_odd_pairing"
    params_class = OddPairingParams
    batch_pairing = "neighbours"


def test_a_method_asking_for_an_unknown_pairing_is_refused_before_the_folder_is_touched(data, tmp_path):
    from teskd.errors import TeskdError

    with pytest.raises(TeskdError) as err:
        assemble(load_config(None, [*train_args(data), "method.name=test_odd_pairing"]), tmp_path / "run")
    assert str(err.value) == "method test_odd_pairing asks for unknown batch pairing 'neighbours'"
    assert not (tmp_path / "run").exists()


def test_loaders_pair_batches_through_the_protocol():
    """``pair_batches("same_class")`` (what the assembly calls) is the same-class pairing; the protocol gives
    the split's size on every rank."""
    from teskd.data.arrays import ImageArrays
    from teskd.data.loader import PAIRINGS, Loader
    from teskd.data.memory_loader import InMemoryLoader
    from teskd.errors import TeskdError

    n = 11
    arrays = ImageArrays(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n) % 3, None)

    def loader(rank):
        return InMemoryLoader(arrays, 4, shuffle=True, drop_last=False, transform=lambda x: x.float(),
                              device="cpu", seed=1, rank=rank, world_size=2)

    by_protocol, direct = loader(1), loader(1)
    assert isinstance(by_protocol, Loader) and PAIRINGS == ("same_class",)
    assert by_protocol.dataset_size == n and by_protocol.num_samples == 6
    by_protocol.pair_batches("same_class")
    direct.pair_same_class()
    pairs = list(zip(by_protocol, direct, strict=True))
    assert [a.index.shape[0] for a, _ in pairs] == [8, 4]  # 6 samples on this rank: 4 + 2, each with partners
    for a, b in pairs:
        half = a.labels.shape[0] // 2
        assert torch.equal(a.index, b.index) and torch.equal(a.labels[:half], a.labels[half:])
    with pytest.raises(TeskdError, match="^unknown batch pairing 'x'; known: same_class$"):
        loader(0).pair_batches("x")


@pytest.fixture(autouse=True, scope="module")
def test_methods_registered():
    """This file's methods, registered while its tests run (and removed after: conftest's snapshot)."""
    from teskd.registry import METHODS

    for method in (TwoSteps, FrozenTeacher, OddPairing,):
        register_method(method)
    yield
    for method in (TwoSteps, FrozenTeacher, OddPairing,):
        METHODS.unregister(method.name)
