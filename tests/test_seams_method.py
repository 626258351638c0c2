"""A method that deploys a branch of another name is one registration (issue 22): the CE-like method below,
registered from this test alone, ships its branch ``main`` and trains a second head ``aux`` beside it; it
trains, evaluates, reports and exports, and every step reads the deployed network under its own name (not
``teacher``, which is what the deployed network was called before)."""

import json
import shutil
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import teskd
from teskd.cli import main
from teskd.config import MethodParams, from_dict
from teskd.methods.base import Method, StepOutput, register_method

from conftest import REPO

CONFIG = str(REPO / "configs" / "imagefolder" / "small_resnet18_teskd.yaml")
CLASSES = ["ant", "bee", "cat"]


@dataclass
class MainAuxParams(MethodParams):
    name: str = "test_main_aux"


class MainAux(Method):
    """Cross-entropy on the backbone (``main``, deployed) and on a second linear head over the same pooled
    feature (``aux``, trained, not deployed)."""

    name = "test_main_aux"
    params_class = MainAuxParams
    deploy_branch = "main"

    def __init__(self, backbone, num_classes: int, params: MainAuxParams, input_size: int = 32):
        super().__init__(backbone, num_classes, params, input_size)
        self.aux = nn.Linear(backbone.num_features, num_classes)

    def _branches(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone.forward_features(images)
        return {"main": features.logits, "aux": self.aux(features.feature)}

    def forward_train(self, images, labels, index=None) -> StepOutput:
        logits = self._branches(images)
        parts = {name: F.cross_entropy(z, labels) for name, z in logits.items()}
        return StepOutput(parts["main"] + parts["aux"], {k: v.detach() for k, v in parts.items()}, logits)

    def forward_eval(self, images):
        return self._branches(images)


@pytest.fixture
def main_aux():
    from teskd.registry import METHODS

    register_method(MainAux)
    yield MainAux
    METHODS.unregister(MainAux.name)  # this test's entry must not outlive it


@pytest.fixture
def folder(tmp_path):
    """A 3-class image folder: 4 training and 2 validation images per class, colours that tell them apart."""
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (36, 36), (100 * c, 20 * i, 200 - 90 * c)).save(
                    tmp_path / "data" / split / name / f"{i}.png")
    return tmp_path / "data"


def records_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def cli_json(capsys, *argv):
    """The JSON a command prints (eval --json, report --format json)."""
    capsys.readouterr()
    assert main(list(map(str, argv))) == 0
    return json.loads(capsys.readouterr().out)


def test_a_method_deploying_main_trains_evaluates_reports_and_exports(main_aux, folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", CONFIG, f"data.root={folder}", "method.name=test_main_aux", "model.arch=resnet18",
                 "model.width_mult=0.0625", "data.image_size=32", "data.eval_resize=32", "data.batch_size=4",
                 "data.workers=0", "train.epochs=2", "schedule.warmup_epochs=0", "train.progress=false",
                 "train.threads=1", "--out", str(run)]) == 0
    records = records_of(run)
    assert [set(r["test_acc"]) for r in records] == [{"main", "aux"}] * 2
    last = records[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["deployed_branch"] == "main" and summary["deployed_top1_last"] == last["test_acc"]["main"]
    method = trained_method(run)
    assert summary["params_train"] == summary["params_deploy"] + sum(p.numel() for p in method.aux.parameters())
    assert (run / "deployed.safetensors").is_file() and (run / "curves.png").is_file()

    # eval: every branch, "main" among them, at the numbers training logged for its last epoch
    evaluated = cli_json(capsys, "eval", run, "--json")
    assert set(evaluated["accuracy"]) == {"main", "aux"}
    assert evaluated["accuracy"]["main"]["top1"] == pytest.approx(last["test_acc"]["main"])
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[lines.index(next(x for x in lines if x.startswith("branch"))) + 1:]] \
        == ["main", "aux"]

    # report: the group's top-1 is branch main's, from summary.json and, for an unfinished copy, from metrics
    (group,) = cli_json(capsys, "report", run, "--format", "json")
    assert group["top1_last_mean"] == last["test_acc"]["main"]
    assert group["top1_best_mean"] == records[summary["best_epoch"] - 1]["test_acc"]["main"]
    assert group["train_top1_last_mean"] == last["train_acc"]["main"]
    assert group["test_acc_last_mean"] == last["test_acc"]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("summary.json", "checkpoints"))
    (group,) = cli_json(capsys, "report", unfinished, "--format", "json")
    assert group["unfinished"] == 1 and group["runs"][0]["top1_last"] == last["test_acc"]["main"]
    # where the plug-in is not loaded, summary.json's deployed_branch still names the branch; without a
    # summary nothing does, and the report says so (not that metrics.jsonl is damaged)
    from teskd.registry import METHODS

    METHODS.unregister(MainAux.name)
    try:
        (group,) = cli_json(capsys, "report", run, "--format", "json")
        code = main(["report", str(unfinished)])
    finally:
        register_method(MainAux)
    assert group["train_top1_last_mean"] == last["train_acc"]["main"]
    err = capsys.readouterr().err
    assert code == 2 and "does not say which of its branches is deployed" in err and "TESKD_PLUGINS" in err

    # export: the file's logits are those of the run's deployed module, branch main of the method
    out = tmp_path / "main.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    exported, _, classes = teskd.load(out)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported(x), method.deploy_module(x))
        assert torch.equal(exported(x), method.eval()(x)["main"])
    assert classes == CLASSES


def trained_method(run):
    from teskd.build import build_model
    from teskd.engine.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / "last.pt")
    method = build_model(from_dict(state["config"]), state["num_classes"])
    method.load_state_dict(state["model"])
    return method.eval()
