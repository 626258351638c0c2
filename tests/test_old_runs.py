"""Run folders written by an older teskd (tests/fixtures/old_runs, commit 8eed1c5: ``teacher.safetensors``,
``teacher_*`` summary keys, every method's deployed branch named ``teacher``) still resume, evaluate, report
and export with today's code (issue 22)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import teskd
from teskd.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "old_runs"
TRAIN_ARGS = ["train.progress=false", "train.threads=1"]


@pytest.fixture
def old(tmp_path) -> Path:
    """A copy of the fixture (runs must never be changed in place) and its image folder's path."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    return tmp_path / "old"


def root(old: Path) -> str:
    return f"data.root={old / 'images'}"


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_fixture_is_really_old():
    """Guards the point of this file: the fixture keeps the old names (do not regenerate it)."""
    for name in ("ce", "teskd"):
        run = FIXTURE / name
        assert (run / "teacher.safetensors").is_file()
        summary = json.loads((run / "summary.json").read_text())
        assert "teacher_top1_last" in summary and not any(k.startswith("deployed") for k in summary)
        assert all(set(r["test_acc"]) >= {"teacher"} for r in records(run))


@pytest.mark.parametrize("name", ["ce", "teskd"])
def test_an_old_run_resumes_and_extends(old, name, capsys):
    run = old / name
    before = records(run)
    assert main(["train", "--resume", str(run), root(old), "train.epochs=3", *TRAIN_ARGS]) == 0
    after = records(run)
    assert after[:2] == before and [r["epoch"] for r in after] == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3
    # the resumed run's numbers are read back whatever the names of either generation
    model, _, classes = teskd.load(run)
    assert model.training is False and classes == ["cat", "dog", "owl"]


@pytest.mark.parametrize("name", ["ce", "teskd"])
def test_an_old_run_evaluates_to_its_recorded_numbers(old, name, capsys):
    run = old / name
    recorded = records(run)[-1]["test_acc"]
    assert main(["eval", str(run), root(old), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    accs = result["accuracy"]
    deployed = [v["top1"] for k, v in accs.items() if k in ("teacher", "deployed")]
    assert deployed and deployed[0] == pytest.approx(recorded["teacher"])


def test_an_old_run_reports_beside_a_new_one(old, tmp_path, capsys):
    new = tmp_path / "new-ce"
    cfg = old / "ce" / "config.yaml"
    assert main(["train", str(cfg), root(old), "train.epochs=1", *TRAIN_ARGS, "--out", str(new)]) == 0
    capsys.readouterr()
    assert main(["report", str(old / "ce"), str(old / "teskd"), str(new), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    groups = {(g["method"], g["epochs"]): g for g in out}
    assert set(groups) == {("ce", "2/2"), ("teskd", "2/2"), ("ce", "1/1")}
    for name in ("ce", "teskd"):
        old_summary = json.loads((old / name / "summary.json").read_text())
        assert groups[(name, "2/2")]["top1_last_mean"] == pytest.approx(old_summary["teacher_top1_last"])
    assert groups[("ce", "1/1")]["top1_last_mean"] == pytest.approx(records(new)[-1]["test_acc"][
        "deployed" if "deployed" in records(new)[-1]["test_acc"] else "teacher"])


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_an_old_run_exports_and_the_export_predicts_like_the_run(old, tmp_path, fmt, capsys):
    out = tmp_path / f"old.{ 'onnx' if fmt == 'onnx' else 'safetensors'}"
    assert main(["export", str(old / "teskd"), "--format", fmt, "--out", str(out)]) == 0
    image = next((old / "images" / "val" / "owl").glob("*.png"))
    from_run, _, _ = teskd.load(old / "teskd")
    from_file, _, _ = teskd.load(out)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(from_run(x), from_file(x), atol=1e-4)
    capsys.readouterr()
    assert main(["predict", str(out), str(image), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["file"] == str(image) and result["top"][0]["class"] in ("cat", "dog", "owl")


def test_an_old_ce_run_resumed_with_new_code_reads_both_generations_of_records(old, capsys):
    """Epochs 1-2 were logged as ``teacher``, epoch 3 as CE's ``deployed``: the summary, the report and the
    curves read the deployed network's numbers from both, record by record."""
    from teskd.curves import draw_curves
    from teskd.engine.rundir import RunDir

    run = old / "ce"
    assert main(["train", "--resume", str(run), root(old), "train.epochs=3", *TRAIN_ARGS]) == 0
    recs = records(run)
    assert [set(r["test_acc"]) for r in recs] == [{"teacher"}, {"teacher"}, {"deployed"}]
    values = [r["test_acc"]["teacher"] for r in recs[:2]] + [recs[2]["test_acc"]["deployed"]]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["deployed_branch"] == "deployed" and not any(k.startswith("teacher_") for k in summary)
    assert summary["deployed_top1_last"] == values[2] and summary["deployed_top1_max_test"] == max(values)
    assert summary["deployed_top1_best"] == values[summary["best_epoch"] - 1]
    # the new export beside the old one; the run's lookup prefers the new
    assert RunDir(run).deployed_file() == run / "deployed.safetensors" and (run / "teacher.safetensors").is_file()
    capsys.readouterr()
    assert main(["report", str(run), "--format", "json"]) == 0
    (group,) = json.loads(capsys.readouterr().out)
    assert group["runs"][0]["top1_last"] == values[2]
    assert group["train_top1_last_mean"] == recs[2]["train_acc"]["deployed"]
    fig = draw_curves(recs, "old ce", "deployed")
    deployed = [line for line in fig.axes[0].get_lines() if line.get_label() == "deployed (deployed)"]
    assert len(deployed) == 1 and list(deployed[0].get_ydata()) == values  # one curve over both generations


def test_an_old_run_folder_with_only_its_teacher_safetensors_is_found(old, capsys):
    """The export of a run written before the rename is teacher.safetensors: the run's lookup finds it, and an
    eval of the folder without checkpoints points at it."""
    from teskd.engine.rundir import RunDir

    run = old / "ce"
    assert RunDir(run).deployed_file() == run / "teacher.safetensors"
    shutil.rmtree(run / "checkpoints")
    assert main(["eval", str(run), root(old)]) == 2
    assert f"its deployed weights alone: {run / 'teacher.safetensors'}" in capsys.readouterr().err
    model, _, classes = teskd.load(run / "teacher.safetensors")
    assert classes == ["cat", "dog", "owl"]


@pytest.mark.parametrize("record, branch, key", [
    ({"test_acc": {"teacher": 1.0, "kd_teacher": 2.0}}, "student", "teacher"),  # old KD: teacher is the student
    ({"test_acc": {"student": 1.0, "teacher": 2.0}}, "student", "student"),  # new KD
    ({"test_acc": {"teacher": 1.0, "peer2": 2.0}}, "peer1", "teacher"),  # old DML
    ({"train_loss": 1.0, "train_acc": {"deployed": 3.0}}, "deployed", "deployed"),  # not evaluated (eval_every)
    ({"test_acc": {"teacher": 1.0}}, None, "teacher"),  # an unloaded plug-in's old run
    ({"test_acc": {"teacher": 1.0, "student1": 0.5}}, "teacher", "teacher"),  # TESKD: the same in both
])
def test_the_deployed_branch_of_a_record(record, branch, key):
    from teskd.runfiles import deployed_key, with_deployed_branch

    assert deployed_key(record, branch) == key
    renamed = with_deployed_branch(record, branch)
    if branch is not None:
        assert deployed_key(renamed, branch) == branch
        assert {k: sorted(v) for k, v in renamed.items() if isinstance(v, dict)} == {
            k: sorted(branch if b == key else b for b in v) for k, v in record.items() if isinstance(v, dict)}


def test_an_old_summary_is_read_under_the_new_names(old):
    from teskd.runfiles import read_summary, run_deploy_branch

    summary = read_summary(old / "teskd")
    old_summary = json.loads((old / "teskd" / "summary.json").read_text())
    assert summary["deployed_top1_last"] == old_summary["teacher_top1_last"]
    assert not any(k.startswith("teacher_") for k in summary)
    assert run_deploy_branch(summary, "teskd") == "teacher" and run_deploy_branch(summary, "ce") == "deployed"
    assert run_deploy_branch({"deployed_branch": "main"}, "ce") == "main"  # the summary's word wins
