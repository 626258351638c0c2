"""A new dataset is one registration (issue 22): a tiny image-folder dataset with its own evaluation transform,
sizes and normalisation, registered from this test alone, trains, evaluates, reports and exports, and its
exports carry the spec's preprocessing (DeployInfo input_size / resize / mean / std)."""

import json

import pytest
import torch
from PIL import Image

import teskd
from teskd.cli import main
from teskd.data.augment import normalize
from teskd.data.imagefolder import FolderTransforms, folder_dataset
from teskd.data.registry import DATASETS, get_dataset_spec, register_dataset
from teskd.deploy.source import load_deployed

from conftest import REPO

CONFIG = str(REPO / "configs" / "imagefolder" / "small_resnet18_teskd.yaml")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CROP, RESIZE = 32, 40  # the dataset's own: data.image_size / data.eval_resize do not change them
CLASSES = ["ant", "bee", "cat"]


class CountingCrop:
    """Resize the shorter side, centre-crop (what exports describe), counting the images it sees."""

    calls: list[tuple[int, int]] = []  # (size, resize) of every transform built
    images = 0

    def __init__(self, size: int, resize: int):
        from torchvision.transforms import v2

        CountingCrop.calls.append((size, resize))
        self.crop = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        CountingCrop.images += 1
        return self.crop(image)


@pytest.fixture
def tiny_dataset(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (48 + 4 * i, 44), (80 * c, 30 * i, 200 - 60 * c)).save(
                    tmp_path / "data" / split / name / f"{i}.png")
    CountingCrop.calls, CountingCrop.images = [], 0
    spec = register_dataset(folder_dataset("tinyfolder", None, MEAN, STD, CROP,
                                           transforms=FolderTransforms(evaluation=CountingCrop),
                                           sizes=lambda cfg, spec: (CROP, RESIZE)))
    yield spec, tmp_path / "data"
    DATASETS.unregister("tinyfolder")  # this test's entry must not outlive it


def test_the_spec_answers_what_others_ask(tiny_dataset):
    from teskd.config import DataConfig

    spec, root = tiny_dataset
    cfg = DataConfig(dataset="tinyfolder", root=str(root), image_size=64)
    assert get_dataset_spec("tinyfolder") is spec
    assert (spec.class_count(cfg), spec.class_names(cfg), spec.image_sizes(cfg)) == (3, CLASSES, (CROP, RESIZE))
    assert spec.checkpoint_minutes == 30.0 and get_dataset_spec("cifar100").checkpoint_minutes == 0.0
    p = spec.preprocessing(cfg)
    assert (p.input_size, p.resize, p.mean, p.std) == (CROP, RESIZE, MEAN, STD)


def test_a_registered_folder_dataset_trains_evaluates_reports_and_exports(tiny_dataset, tmp_path, capsys):
    _, root = tiny_dataset
    run = tmp_path / "run"
    assert main(["train", CONFIG, "data.dataset=tinyfolder", f"data.root={root}", "data.batch_size=4",
                 "data.workers=0", "model.width_mult=0.0625", "train.epochs=1", "schedule.warmup_epochs=0",
                 "train.progress=false", "train.threads=1", "--out", str(run)]) == 0
    assert CountingCrop.calls and set(CountingCrop.calls) == {(CROP, RESIZE)} and CountingCrop.images >= 6
    capsys.readouterr()

    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert (evaluated["dataset"], evaluated["images"]) == ("tinyfolder", 6)

    assert main(["report", str(run), "--format", "json"]) == 0
    assert "tinyfolder" in capsys.readouterr().out

    out = tmp_path / "tiny.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    info = load_deployed(out).info
    assert (info.dataset, info.classes, info.num_classes) == ("tinyfolder", tuple(CLASSES), 3)
    assert (info.input_size, info.resize, info.mean, info.std) == (CROP, RESIZE, MEAN, STD)

    _, preprocess, _ = teskd.load(out)  # what a deployer runs equals the dataset's own evaluation transform
    image = torch.randint(0, 256, (3, 50, 61), dtype=torch.uint8)
    assert torch.equal(preprocess(image), normalize(CountingCrop(CROP, RESIZE)(image)[None], MEAN, STD)[0])

    capsys.readouterr()
    assert main(["eval", str(out), f"data.root={root}", "data.workers=0", "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    [(branch, accuracy)] = from_export["accuracy"].items()  # the export's one branch: "deployed"
    deployed = json.loads((run / "summary.json").read_text())["deployed_branch"]  # the run's name for it
    assert branch == "deployed" and deployed == "teacher"  # TESKD's
    assert from_export["images"] == 6 and accuracy == evaluated["accuracy"][deployed]
