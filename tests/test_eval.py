"""`teskd eval`: what was evaluated (split, size, subset, data folder), --full, and deployed teachers."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from teskd.cli import main
from teskd.config import from_dict
from teskd.engine.checkpoint import load_checkpoint
from teskd.build import build_model
from teskd.errors import TeskdError
from teskd.evaluation import load_deployed_file

from conftest import REPO

CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_teskd.yaml")
PER_CLASS = 3  # synthetic images per class in each split


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A synthetic CIFAR-100 in the npz layout: 3 train and 3 test images per class, classes interleaved."""
    root = tmp_path_factory.mktemp("data") / "cifar100"
    root.mkdir()
    rng = np.random.default_rng(0)
    classes = np.array([f"class{i}" for i in range(100)])
    for name in ("train.npz", "test.npz"):
        y = np.tile(np.arange(100), PER_CLASS)  # file order: 0..99, 0..99, 0..99
        x = rng.integers(0, 256, (y.size, 32, 32, 3), dtype=np.uint8)
        np.savez(root / name, x=x, y=y, classes=classes)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", CONFIG, f"data.root={data_root}", "model.width_mult=0.125", "data.subset_per_class=2",
                 "data.test_subset_per_class=1", "train.epochs=1", "train.progress=false", "train.threads=1",
                 "train.device=cpu", "--out", str(out)]) == 0
    return out


def eval_json(capsys, *argv):
    capsys.readouterr()
    assert main(["eval", *argv, "--json", "train.threads=1"]) == 0
    return json.loads(capsys.readouterr().out)


def eval_text(capsys, *argv):
    capsys.readouterr()
    code = main(["eval", *argv, "train.threads=1"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_reports_the_runs_test_subset(capsys, run, data_root):
    result = eval_json(capsys, str(run))
    assert result["kind"] == "checkpoint" and result["epoch"] == 1
    assert result["dataset"] == "cifar100" and result["split"] == "test"
    assert result["images"] == 100 and result["split_images"] == 100 * PER_CLASS
    assert result["full_split"] is False and result["subset_per_class"] == 1
    assert result["selection"] == "first 1 test image of each class"
    assert result["data_root"] == str(data_root.resolve())
    # the same images as the training run's evaluation: the same teacher accuracy
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["accuracy"]["teacher"]["top1"] == pytest.approx(last["test_acc"]["teacher"])
    assert set(result["accuracy"]) == set(last["test_acc"])


def test_eval_text_says_subset_size_and_absolute_folder(capsys, run, data_root, tmp_path, monkeypatch):
    # a relative data.root is shown as the absolute folder it resolved to
    monkeypatch.chdir(data_root.parent)
    code, out, err = eval_text(capsys, str(run), "data.root=cifar100")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"checkpoint {run / 'checkpoints' / 'last.pt'} (epoch 1, resnet18/teskd)"
    assert lines[1] == (f"evaluated on cifar100: a subset of the test split, 100 of 300 images (first 1 test "
                        f"image of each class; --full for all), read from {data_root.resolve()}")
    assert lines[2] == "precision: float32"  # evaluation's default, whatever train.amp says
    assert lines[3].split() == ["branch", "top-1", "top-5"]
    assert [line.split()[0] for line in lines[4:]] == ["teacher", "student1", "student2", "student3",
                                                       "students_ensemble"]


def test_full_evaluates_the_whole_test_split(capsys, run):
    result = eval_json(capsys, str(run), "--full")
    assert result["images"] == result["split_images"] == 100 * PER_CLASS
    assert result["full_split"] is True and result["subset_per_class"] is None
    assert result["selection"] == "all test images"
    code, out, _ = eval_text(capsys, str(run), "--full")
    assert code == 0 and "the full test split, 300 images (all test images)" in out and "--full for all" not in out


def test_full_with_the_val_split_is_refused(capsys, run):
    code, _, err = eval_text(capsys, str(run), "--split", "val", "--full")
    assert code == 2 and err.startswith("error: --full selects the whole test split")
    assert len(err.strip().splitlines()) == 1


def test_deployed_teacher_matches_the_run(capsys, run, data_root):
    teacher = run / "deployed.safetensors"
    for extra in ([], ["--full"]):
        from_run = eval_json(capsys, str(run), *extra)
        deployed = eval_json(capsys, str(teacher), f"data.root={data_root}", "data.test_subset_per_class=1", *extra)
        assert deployed["kind"] == "deployed" and deployed["arch"] == "resnet18"
        assert deployed["width_mult"] == 0.125 and deployed["num_classes"] == 100
        assert deployed["trained_on"] == "cifar100" and deployed["dataset"] == "cifar100"
        assert list(deployed["accuracy"]) == ["deployed"]  # the bare backbone has no students
        for key in ("images", "split_images", "full_split", "selection", "data_root"):
            assert deployed[key] == from_run[key], key
        assert deployed["accuracy"]["deployed"] == from_run["accuracy"]["teacher"]  # TESKD deploys its teacher

    # stronger than equal accuracies: the deployed backbone computes the run's teacher logits exactly
    backbone, meta = load_deployed_file(teacher)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    method = build_model(from_dict(state["config"]), 100)
    method.load_state_dict(state["model"])
    images = torch.randn(8, 3, 32, 32)
    backbone.eval()
    method.eval()
    with torch.no_grad():
        assert torch.equal(backbone(images), method.forward_eval(images)["teacher"])
    assert meta["arch"] == "resnet18" and meta["width_mult"] == 0.125


def test_deployed_teacher_text_output(capsys, run, data_root):
    code, out, err = eval_text(capsys, str(run / "deployed.safetensors"), f"data.root={data_root}")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"deployed network {run / 'deployed.safetensors'} (safetensors export, resnet18, width_mult 0.125, 100 classes)"
    assert lines[1] == (f"evaluated on cifar100: the full test split, 300 images (all test images), "
                        f"read from {data_root.resolve()}")
    assert [line.split()[0] for line in lines[4:]] == ["deployed"]


def _one_line_error(capsys, *argv) -> str:
    code, _, err = eval_text(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    return err


def test_mismatched_teacher_weights_name_the_keys(capsys, run, data_root, tmp_path):
    weights = load_file(str(run / "deployed.safetensors"))
    missing = sorted(weights)[0]
    del weights[missing]
    weights["fc.weight"] = torch.zeros(10, weights["fc.weight"].shape[1])
    weights["extra.bias"] = torch.zeros(3)
    meta = {"arch": "resnet18", "num_classes": "100", "width_mult": "0.125", "dataset": "cifar100"}
    bad = tmp_path / "bad.safetensors"
    save_file(weights, str(bad), metadata=meta)
    err = _one_line_error(capsys, str(bad), f"data.root={data_root}")
    assert f"{bad} does not match resnet18 (width_mult 0.125, 100 classes)" in err
    assert f"missing keys {missing}" in err and "unexpected keys extra.bias" in err
    assert "shape mismatches fc.weight (file [10, 64], model [100, 64])" in err


def test_teacher_file_errors(capsys, run, data_root, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    assert f"cannot read {junk}: not a valid safetensors file" in _one_line_error(capsys, str(junk))

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(run / "deployed.safetensors")), str(bare))  # weights without teskd's metadata
    assert "lacks the metadata arch, num_classes, width_mult" in _one_line_error(capsys, str(bare))

    err = _one_line_error(capsys, str(tmp_path / "absent.safetensors"))
    assert f"no such export file: {tmp_path / 'absent.safetensors'}" in err

    teacher = str(run / "deployed.safetensors")
    err = _one_line_error(capsys, teacher, f"data.root={data_root}", "data.dataset=cifar10")
    assert "has a 100-class head, but cifar10 has 10 classes" in err
    assert "test split only" in _one_line_error(capsys, teacher, "--split", "val")


def test_run_without_checkpoints_points_at_its_teacher(capsys, tmp_path):
    folder = tmp_path / "shipped"
    folder.mkdir()
    (folder / "deployed.safetensors").write_bytes(b"")
    err = _one_line_error(capsys, str(folder))
    assert f"its deployed weights alone: {folder / 'deployed.safetensors'}" in err


def test_validation_split_is_described(data_root):
    from teskd.config import DataConfig
    from teskd.evaluation import describe_data, load_eval_split

    loader, info = load_eval_split(DataConfig(root=str(data_root), val_per_class=1), "val", torch.device("cpu"))
    assert info["images"] == info["split_images"] == 100 and info["full_split"] is True
    assert loader.labels.tolist() == list(range(100))  # the last image of each class (file order 0..99 x 3)
    assert describe_data(info) == (f"cifar100: the full val split, 100 images (last 1 training image of each "
                                   f"class, held out from training), read from {data_root.resolve()}")
    with pytest.raises(TeskdError, match="no validation split"):
        load_eval_split(DataConfig(root=str(data_root)), "val", torch.device("cpu"))


def test_deployed_teacher_reads_the_default_data_folder(capsys, run, data_root, monkeypatch):
    # no data.root: ${TESKD_DATA}/<dataset from the file's metadata>
    monkeypatch.setenv("TESKD_DATA", str(data_root.parent))
    result = eval_json(capsys, str(run / "deployed.safetensors"), "data.test_subset_per_class=2")
    assert result["data_root"] == str(data_root.resolve()) and result["images"] == 200
    assert result["selection"] == "first 2 test images of each class" and result["full_split"] is False
