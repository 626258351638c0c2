"""End to end on real JPEGs (../shared/data/imagenette-mini) with the ImageNet pipeline at a small size:
train, evaluate the run and its exported teacher, and drop the teacher into torchvision's ResNet."""

import json

import pytest
import torch

from teskd.cli import main
from teskd.engine.checkpoint import load_checkpoint

from conftest import IMAGENETTE, REPO, train_imagenette

CONFIG = str(REPO / "configs" / "imagefolder" / "small_resnet18_teskd.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_imagenette(tmp_path_factory.mktemp("folder") / "run")


def test_image_folder_run_records_the_folders_classes(run):
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    classes = sorted(p.name for p in (IMAGENETTE / "train").iterdir() if p.is_dir())
    assert state["num_classes"] == len(classes) and state["classes"] == classes
    record = json.loads((run / "metrics.jsonl").read_text())
    assert 0.0 <= record["data_wait_share"] <= 1.0 and record["train_images_per_sec"] > 0


def test_run_and_exported_teacher_evaluate_alike(run, capsys):
    assert main(["eval", str(run), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run / "deployed.safetensors"), f"data.root={IMAGENETTE}", "data.image_size=32",
                 "data.eval_resize=36", "data.test_subset_per_class=2", "data.workers=0", "--json"]) == 0
    from_teacher = json.loads(capsys.readouterr().out)
    assert from_run["images"] == from_teacher["images"] == 2 * state_classes(run)
    assert from_run["accuracy"]["teacher"] == from_teacher["accuracy"]["deployed"]  # TESKD deploys its teacher


def state_classes(run) -> int:
    return load_checkpoint(run / "checkpoints" / "last.pt")["num_classes"]


def test_deployed_teacher_is_a_torchvision_resnet(run):
    import torchvision
    from safetensors.torch import load_file

    from teskd.models import build_backbone

    weights = load_file(str(run / "deployed.safetensors"))
    ours = build_backbone("resnet18_imagenet", state_classes(run), 1.0)
    full = {k: torch.zeros_like(v) if v.dtype.is_floating_point else v for k, v in ours.state_dict().items()}
    assert set(weights) == set(full)  # same keys as the full-width network, narrower tensors
    tv = torchvision.models.resnet18(num_classes=state_classes(run))
    assert set(tv.state_dict()) == set(weights)


def _tree(root, classes, per_class=3, bad=None):
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (20 + i, 18), (40 * i, 100, 7)).save(root / split / c / f"{i}.png")
    if bad:
        (root / "train" / classes[0] / bad).write_bytes(b"\xff\xd8 not a jpeg")


FOLDER_ARGS = ["data.image_size=32", "data.eval_resize=36", "data.batch_size=4", "data.workers=0",
               "model.width_mult=0.0625", "train.epochs=1", "schedule.warmup_epochs=0", "train.progress=false",
               "train.threads=1"]


def test_corrupt_image_is_skipped_counted_and_training_goes_on(tmp_path, capsys):
    _tree(tmp_path / "data", ["a", "b"], bad="broken.jpg")
    run = tmp_path / "run"
    assert main(["train", CONFIG, f"data.root={tmp_path / 'data'}", "data.on_bad_image=skip", *FOLDER_ARGS,
                 "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image" in out and "broken.jpg" in out
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert main(["train", CONFIG, f"data.root={tmp_path / 'data'}", "data.on_bad_image=stop", *FOLDER_ARGS,
                 "--out", str(tmp_path / "stopped")]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and len(err.strip().splitlines()) == 1


def test_resume_on_other_class_folders_is_refused(tmp_path, capsys):
    _tree(tmp_path / "data", ["a", "b"])
    run = tmp_path / "run"
    assert main(["train", CONFIG, f"data.root={tmp_path / 'data'}", *FOLDER_ARGS, "--out", str(run)]) == 0
    (tmp_path / "data" / "train" / "b").rename(tmp_path / "data" / "train" / "c")
    (tmp_path / "data" / "val" / "b").rename(tmp_path / "data" / "val" / "c")
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "class 1: 'b' in the checkpoint, 'c' in" in err


def test_too_small_images_for_the_students_are_a_one_line_error(tmp_path, capsys):
    _tree(tmp_path / "data", ["a", "b"])
    args = [a for a in FOLDER_ARGS if not a.startswith(("data.image_size", "data.eval_resize"))]
    assert main(["train", CONFIG, f"data.root={tmp_path / 'data'}", "data.image_size=16", *args,
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot build teskd on resnet18_imagenet for 16px images" in err and len(err.strip().splitlines()) == 1
