"""A tiny real training run: train, resume to the same weights, evaluate, export."""

import json

import pytest
import torch
from safetensors.torch import load_file

from teskd.cli import main
from teskd.models import build_backbone

from conftest import REPO

CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_teskd.yaml")


def tiny(root, *extra):
    return [f"data.root={root}", "model.width_mult=0.125", "data.subset_per_class=4",
            "data.test_subset_per_class=2", "data.batch_size=50", "data.eval_batch_size=100",
            "train.progress=false", "train.deterministic=true", "train.threads=1", *extra]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    from conftest import SHARED_CIFAR100

    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100}")
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert main(["train", CONFIG, *tiny(SHARED_CIFAR100, "train.epochs=2", "data.val_per_class=1"),
                 "--out", str(out)]) == 0
    return out


def test_run_directory_contents(straight_run):
    run = straight_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "deployed.safetensors",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert set(r["test_acc"]) == {"teacher", "student1", "student2", "student3", "students_ensemble"}
        assert all(0.0 <= v <= 100.0 for v in r["test_acc"].values())
        assert {"lr", "train_loss", "loss_ce", "loss_kd", "loss_feat", "train_acc", "epoch_seconds",
                "val_acc"} <= set(r)
        # the named parts add up to the total loss
        assert r["loss_ce"] + r["loss_kd"] + r["loss_feat"] == pytest.approx(r["train_loss"], rel=1e-5)
        assert r["lr"] == pytest.approx(0.1)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selected_on"] == "val" and summary["epochs"] == 2
    assert (summary["method"], summary["seed"], summary["width_mult"]) == ("teskd", 0, 0.125)
    assert summary["deployed_top1_last"] == records[-1]["test_acc"]["teacher"]
    best = max(records, key=lambda r: r["val_acc"]["teacher"])  # first maximum wins
    assert summary["best_epoch"] == best["epoch"]
    assert summary["deployed_top1_best"] == best["test_acc"]["teacher"]
    assert summary["params_deploy"] < summary["params_train"]
    assert summary["train_images_per_sec"] > 0
    # 100 classes x (4 train), 1 per class held out for validation from the full set
    resolved = (run / "config.yaml").read_text()
    assert "subset_per_class: 4" in resolved and "val_per_class: 1" in resolved


def test_exported_teacher_is_the_plain_backbone(straight_run):
    state = load_file(str(straight_run / "deployed.safetensors"))
    backbone = build_backbone("resnet18", 100, 0.125)
    backbone.load_state_dict(state)  # strict: no student keys, nothing missing
    ckpt = torch.load(straight_run / "checkpoints" / "last.pt", weights_only=True)
    for key, value in state.items():
        assert torch.equal(value, ckpt["model"][f"backbone.{key}"])
    assert not any(k.startswith("students") for k in state)


def test_resume_reaches_the_same_weights(straight_run, tmp_path, cifar100_root):
    out = tmp_path / "resumed"
    args = tiny(cifar100_root, "data.val_per_class=1")
    assert main(["train", CONFIG, *args, "train.epochs=1", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "train.epochs=2"]) == 0
    a = torch.load(straight_run / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_eval_reports_every_branch(straight_run, capsys):
    assert main(["eval", str(straight_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((straight_run / "summary.json").read_text())
    assert result["epoch"] == 2
    assert result["accuracy"]["teacher"]["top1"] == pytest.approx(summary["deployed_top1_last"])
    assert set(result["accuracy"]) == {"teacher", "student1", "student2", "student3", "students_ensemble"}
    for acc in result["accuracy"].values():
        assert acc["top1"] <= acc["top5"]


def test_ce_baseline_trains_without_students(tmp_path, cifar100_root):
    out = tmp_path / "ce"
    cfg = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")
    assert main(["train", cfg, *tiny(cifar100_root, "train.epochs=1"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_train"] == summary["params_deploy"]
    assert summary["selected_on"] == "test"
    record = json.loads((out / "metrics.jsonl").read_text())
    assert set(record["test_acc"]) == {"deployed"}  # CE's one network


def test_eval_every_evaluates_every_nth_epoch_and_the_last(tmp_path, cifar100_root):
    """train.eval_every=2 over 3 epochs: epochs 2 and 3 are evaluated, epoch 1 is not; best and summary use the
    evaluated ones, and report reads the run."""
    from teskd.report import read_run

    out = tmp_path / "run"
    assert main(["train", str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml"),
                 *tiny(cifar100_root, "train.epochs=3", "train.eval_every=2"), "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert ["test_acc" in r for r in records] == [False, True, True]
    assert all("train_acc" in r and "train_loss" in r for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["deployed_top1_last"] == records[2]["test_acc"]["deployed"]
    best = max(records[1:], key=lambda r: r["test_acc"]["deployed"])
    assert summary["best_epoch"] == best["epoch"]
    assert summary["deployed_top1_max_test"] == best["test_acc"]["deployed"]
    row = read_run(out, []).row
    assert row.top1_last == records[2]["test_acc"]["deployed"] and row.finished


def test_eval_every_must_be_positive(tmp_path, capsys):
    assert main(["train", CONFIG, "train.eval_every=0", "--out", str(tmp_path / "r")]) != 0
    assert "train.eval_every must be >= 1, got 0" in capsys.readouterr().err
