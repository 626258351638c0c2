"""Shipping the teacher: export metadata, predict from an export alone, the Python API, evaluation precision."""

import json
import signal

import numpy as np
import pytest
import torch

import teskd
from teskd.cli import main
from teskd.config import load_config
from teskd.deploy.metadata import DeployInfo, config_hash
from teskd.deploy.safetensors_format import read_safetensors, save_safetensors
from teskd.errors import TeskdError
from teskd.models import build_backbone

from conftest import IMAGENETTE, REPO, SHARED_CIFAR100, train_imagenette

CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_teskd.yaml")
TINY = ["model.width_mult=0.125", "data.subset_per_class=3", "data.test_subset_per_class=2", "data.batch_size=50",
        "data.eval_batch_size=100", "train.progress=false", "train.threads=1", "train.epochs=1"]


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100}")
    out = tmp_path_factory.mktemp("deploy") / "run"
    assert main(["train", CONFIG, f"data.root={SHARED_CIFAR100}", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def cifar_pngs(tmp_path_factory):
    """Six CIFAR-100 test images as PNG files (named by index), with their arrays."""
    from PIL import Image

    if not (SHARED_CIFAR100 / "test.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100}")
    folder = tmp_path_factory.mktemp("pngs")
    with np.load(SHARED_CIFAR100 / "test.npz") as z:
        x = torch.from_numpy(z["x"][:6]).permute(0, 3, 1, 2).contiguous()
    for i, image in enumerate(x):  # PNG is lossless: the files hold exactly these pixels
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
    return folder, x


def _teacher_logits(run, images_uint8):
    """The run's teacher branch on raw uint8 images, through the training code's own normalisation."""
    from teskd.build import build_model
    from teskd.config import from_dict
    from teskd.data.augment import normalize
    from teskd.data.registry import get_dataset_spec
    from teskd.engine.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / "last.pt")
    cfg = from_dict(state["config"])
    method = build_model(cfg, 100)
    method.load_state_dict(state["model"])
    spec = get_dataset_spec("cifar100")
    with torch.no_grad():
        return method.eval()(normalize(images_uint8, spec.mean, spec.std))["teacher"]


# --- metadata --------------------------------------------------------------------------------------


def test_metadata_round_trips_and_rejects_bad_values():
    info = DeployInfo(arch="resnet18", num_classes=3, width_mult=0.125, input_size=32, resize=36,
                      mean=(0.5, 0.25, 0.125), std=(0.2, 0.3, 0.4), classes=("café", "dog", "x,y"),
                      dataset="imagefolder", config_hash="ab" * 32, teskd_version="0.1.0")
    meta = info.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert DeployInfo.from_metadata(meta, "f") == info
    for key, value, needle in (("num_classes", "x", "num_classes"), ("width_mult", "-1", "width_mult"),
                               ("classes", '["a"]', "classes"), ("std", "1,0,1", "std"),
                               ("mean", "1,2", "mean"), ("resize", "8", "resize")):
        with pytest.raises(TeskdError, match=needle) as err:
            DeployInfo.from_metadata({**meta, key: value}, "model.bin")
        assert "model.bin" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TeskdError, match="lacks the metadata arch"):
        DeployInfo.from_metadata({k: v for k, v in meta.items() if k != "arch"}, "f")
    # an older export (no resize key): the crop is resized to itself
    old = {k: v for k, v in meta.items() if k not in ("resize", "config_hash")}
    assert DeployInfo.from_metadata(old, "f").resize == 32


def test_config_hash_follows_the_settings_not_the_data_folder():
    a = load_config(CONFIG, ["data.root=/somewhere"])
    assert config_hash(a) == config_hash(load_config(CONFIG, ["data.root=/elsewhere"]))
    assert config_hash(a) != config_hash(load_config(CONFIG, ["data.root=/somewhere", "train.epochs=7"]))
    assert len(config_hash(a)) == 64


# --- export: safetensors and the torchvision state dict ------------------------------------------


def test_safetensors_export_is_the_backbone_with_what_a_deployer_needs(cifar_run, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    assert main(["export", str(cifar_run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "identical outputs" in text
    weights, info = read_safetensors(out)
    plain = build_backbone("resnet18", 100, 0.125)
    assert sorted(weights) == sorted(plain.state_dict())  # no student, no training state
    cfg = load_config(cifar_run / "config.yaml")
    assert info.config_hash == config_hash(cfg) and info.teskd_version == teskd.__version__
    with np.load(SHARED_CIFAR100 / "test.npz") as z:
        assert list(info.classes) == [str(c) for c in z["classes"].tolist()]
    assert (info.arch, info.num_classes, info.input_size, info.resize) == ("resnet18", 100, 32, 32)
    from teskd.data.registry import get_dataset_spec

    assert (info.mean, info.std) == (get_dataset_spec("cifar100").mean, get_dataset_spec("cifar100").std)
    # the run's own deployed.safetensors (written at the end of training) carries the same metadata
    assert read_safetensors(cifar_run / "deployed.safetensors")[1] == info


def test_export_refuses_to_overwrite_a_user_file_and_replaces_its_own(cifar_run, tmp_path):
    user = tmp_path / "notes.safetensors"
    user.write_text("my notes")
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(cifar_run), "--out", str(user), *extra]) == 2
        assert user.read_text() == "my notes"
    own = tmp_path / "own.safetensors"
    assert main(["export", str(cifar_run), "--out", str(own)]) == 0
    assert main(["export", str(cifar_run), "--out", str(own)]) == 2  # exists: needs --overwrite
    before = own.stat().st_mtime_ns
    assert main(["export", str(cifar_run), "--checkpoint", "best", "--out", str(own), "--overwrite"]) == 0
    assert own.stat().st_mtime_ns >= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors", "own.safetensors"]


def test_default_export_name_is_beside_the_caller(cifar_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(cifar_run), "--checkpoint", "best"]) == 0
    assert (tmp_path / "run-deployed-best.safetensors").is_file()


def test_torchvision_state_dict_loads_strictly_into_torchvision(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = build_backbone("resnet18_imagenet", 10, 1.0).eval()
    src = save_safetensors(net, DeployInfo("resnet18_imagenet", 10, 1.0, input_size=64, resize=73), tmp_path / "r.safetensors")
    out = tmp_path / "r18.pth"
    assert main(["export", str(src), "--format", "torchvision", "--out", str(out)]) == 0
    twin = torchvision.models.resnet18(num_classes=10)
    twin.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), net(x))
    narrow = save_safetensors(build_backbone("resnet18", 10, 0.125), DeployInfo("resnet18", 10, 0.125),
                              tmp_path / "narrow.safetensors")
    with pytest.raises(TeskdError, match="width 1.0"):
        teskd.export(narrow, "torchvision", tmp_path / "n.pth")
    assert not (tmp_path / "n.pth").exists()


def _content(path):
    weights, info = read_safetensors(path)
    return {k: v.tolist() for k, v in weights.items()}, info


_KILLER = """
import os, signal, sys
from teskd import fileio
from teskd.cli import main
at, count = int(sys.argv[1]), [0]
def hook(op, path):
    count[0] += 1
    if count[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
fileio.fault_hook = hook
sys.exit(main(sys.argv[2:]))
"""


def test_export_killed_at_each_file_operation_leaves_the_old_or_the_new_export(cifar_run, tmp_path):
    """SIGKILL before every file operation of `teskd export --overwrite` in turn (a fresh process each time: a
    fork of this one could deadlock in torch's thread pool): the export file is always the previous one, byte
    for byte, or the complete new one; the next export leaves no litter."""
    import subprocess
    import sys

    from teskd import fileio

    out = tmp_path / "t.safetensors"
    assert main(["export", str(cifar_run), "--out", str(out)]) == 0
    old = out.read_bytes()
    args = ["export", str(cifar_run), "--checkpoint", "best", "--out", str(out), "--overwrite"]
    ops: list = []
    fileio.fault_hook = lambda op, path: ops.append(op)
    try:
        assert main(args) == 0
    finally:
        fileio.fault_hook = None
    new = _content(out)  # safetensors' header order differs from write to write: compare what it holds
    out.write_bytes(old)
    assert len(ops) >= 2
    for n in range(1, len(ops) + 1):
        done = subprocess.run([sys.executable, "-c", _KILLER, str(n), *args], capture_output=True, text=True)
        assert done.returncode == -signal.SIGKILL, f"operation {n} was not reached: {done.stderr[-500:]}"
        assert out.read_bytes() == old or _content(out) == new, f"killed at operation {n} ({ops[n - 1]}): damaged"
        out.write_bytes(old)
    assert main(args) == 0 and _content(out) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


# --- predict ---------------------------------------------------------------------------------------


def test_predict_from_a_safetensors_export_alone_matches_the_trained_teacher(cifar_run, cifar_pngs, tmp_path,
                                                                             capsys):
    folder, images = cifar_pngs
    export = tmp_path / "alone" / "deployed.safetensors"
    export.parent.mkdir()
    assert main(["export", str(cifar_run), "--out", str(export)]) == 0
    capsys.readouterr()
    assert main(["predict", str(export), str(folder), "--topk", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in got["results"]] == [str(folder / f"img{i}.png") for i in range(6)]
    probs = _teacher_logits(cifar_run, images).softmax(1)
    p, labels = probs.topk(3, dim=1)
    classes = read_safetensors(export)[1].classes
    for r, pi, li in zip(got["results"], p.tolist(), labels.tolist()):
        assert [t["label"] for t in r["top"]] == li
        assert [t["class"] for t in r["top"]] == [classes[i] for i in li]
        assert [t["prob"] for t in r["top"]] == pytest.approx(pi, abs=1e-6)


def test_predict_reports_unreadable_images_and_goes_on(cifar_run, cifar_pngs, tmp_path, capsys):
    folder, _ = cifar_pngs
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["predict", str(cifar_run), str(folder / "img0.png"), str(broken), "--topk", "2"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(folder / "img0.png")) and len(lines[0].split()) == 5
    assert f"skipped {broken}:" in cap.err
    assert main(["predict", str(cifar_run), str(broken)]) == 2
    assert "none of the 1 image file(s) could be read" in capsys.readouterr().err
    assert main(["predict", str(cifar_run), str(tmp_path / "missing.png")]) == 2
    assert "no such image or folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    return train_imagenette(tmp_path_factory.mktemp("folder") / "run", eval_resize=40)


def test_predict_on_jpegs_equals_the_evaluation_pipeline(folder_run, tmp_path, capsys):
    """The export's metadata carries the image-folder preprocessing (resize 40, crop 32): predicting the test
    JPEGs from the export alone gives the logits evaluation computed from its own loader."""
    from teskd.config import from_dict
    from teskd.engine.checkpoint import load_checkpoint
    from teskd.evaluation import load_eval_split

    export = tmp_path / "folder.safetensors"
    assert main(["export", str(folder_run), "--out", str(export)]) == 0
    capsys.readouterr()
    model, preprocess, classes = teskd.load(export)
    assert (preprocess.info.resize, preprocess.info.input_size) == (40, 32)
    assert classes == sorted(p.name for p in (IMAGENETTE / "train").iterdir() if p.is_dir())
    cfg = from_dict(load_checkpoint(folder_run / "checkpoints" / "last.pt")["config"])
    loader, info = load_eval_split(cfg.data, "test", torch.device("cpu"))
    batches = list(loader)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    files = [sorted((IMAGENETTE / "val" / c).iterdir())[:2] for c in classes]
    files = [f for pair in files for f in pair]
    assert len(files) == len(x) == info["images"]
    mine = torch.stack([preprocess(f) for f in files])
    assert torch.allclose(mine, x.float(), atol=1e-6)
    with torch.no_grad():
        expected = model(x.float())
    assert main(["predict", str(export), *map(str, files), "--topk", "1", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    assert [r["top"][0]["label"] for r in got] == expected.argmax(1).tolist()
    # teskd eval of the export alone takes the image sizes from its metadata, as predict does
    assert main(["eval", str(export), f"data.root={IMAGENETTE}", "data.test_subset_per_class=2", "data.workers=0",
                 "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(["eval", str(folder_run), "--json"]) == 0
    assert alone["accuracy"]["deployed"] == json.loads(capsys.readouterr().out)["accuracy"]["teacher"]  # TESKD's
    correct = sum(r["top"][0]["label"] == label for r, label in zip(got, y.tolist()))
    assert alone["accuracy"]["deployed"]["top1"] == pytest.approx(100.0 * correct / len(got))


# --- the Python API ----------------------------------------------------------------------------------


def test_load_gives_the_same_network_from_run_checkpoint_and_export(cifar_run, cifar_pngs):
    folder, images = cifar_pngs
    m_run, pre, classes = teskd.load(cifar_run)
    m_ckpt, _, _ = teskd.load(cifar_run / "checkpoints" / "last.pt")
    m_st, pre_st, classes_st = teskd.load(cifar_run / "deployed.safetensors")
    x = torch.stack([pre(folder / f"img{i}.png") for i in range(6)])
    with torch.no_grad():
        ref = _teacher_logits(cifar_run, images)
        for m in (m_run, m_ckpt, m_st):
            assert not m.training and torch.equal(m(x), ref)
    assert classes == classes_st and len(classes) == 100
    assert "centre crop 32" in repr(pre_st)
    top = teskd.predict(cifar_run / "deployed.safetensors", folder / "img1.png", topk=2)
    assert top[0]["top"][0]["label"] == int(ref[1].argmax())
    with pytest.raises(TeskdError, match="no such run directory"):
        teskd.load(cifar_run / "nothing")


def test_train_api_returns_the_summary_with_settings_as_keywords(tmp_path):
    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100}")
    out = tmp_path / "api"
    summary = teskd.train(CONFIG, out, data={"root": str(SHARED_CIFAR100), "subset_per_class": 2,
                                             "test_subset_per_class": 1, "batch_size": 50},
                          model={"width_mult": 0.125}, **{"train.seed": 3},
                          overrides=["train.epochs=1", "train.progress=false", "train.threads=1"])
    assert summary["run_dir"] == str(out) and summary["epochs"] == 1 and summary["seed"] == 3
    assert summary["eval_precision"] == "float32"
    assert json.loads((out / "summary.json").read_text())["deployed_top1_last"] == summary["deployed_top1_last"]
    cfg = load_config(out / "config.yaml")
    assert (cfg.data.subset_per_class, cfg.model.width_mult, cfg.train.seed) == (2, 0.125, 3)
    with pytest.raises(TeskdError, match="already exists"):
        teskd.train(CONFIG, out)
    with pytest.raises(TeskdError, match="list of 'key=value'"):
        teskd.train(CONFIG, tmp_path / "x", overrides="train.epochs=1")


# --- evaluation precision ------------------------------------------------------------------------------


def test_evaluation_is_float32_unless_eval_amp_is_set():
    from teskd.engine.runtime import precision_name, resolve_eval_amp

    cuda = torch.device("cuda")  # resolving an explicit dtype needs no GPU
    assert resolve_eval_amp(load_config(None, ["train.amp=bf16"]).train, cuda) is None
    on = load_config(None, ["train.amp=bf16", "train.eval_amp=true"]).train
    assert resolve_eval_amp(on, cuda) is torch.bfloat16
    assert precision_name(None) == "float32" and precision_name(torch.float16) == "float16 autocast"


def test_eval_reports_its_precision(cifar_run, capsys):
    assert main(["eval", str(cifar_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "float32"
    assert json.loads((cifar_run / "summary.json").read_text())["eval_precision"] == "float32"


# --- compiled exports: ONNX and torch.export --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_compiled_exports_of_a_run_carry_the_metadata_and_predict_alike(fmt, cifar_run, cifar_pngs, tmp_path,
                                                                        capsys):
    folder, _ = cifar_pngs
    out = tmp_path / f"teacher.{fmt}"
    assert main(["export", str(cifar_run), "--format", fmt, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out} ({fmt}," in text and "(bound 0.0001)" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # one self-contained file, no litter
    from teskd.deploy.source import load_deployed

    assert load_deployed(out).info == read_safetensors(cifar_run / "deployed.safetensors")[1]
    runs = {}
    for model in (cifar_run / "deployed.safetensors", out):
        assert main(["predict", str(model), str(folder), "--topk", "3", "--json"]) == 0
        runs[model.suffix] = json.loads(capsys.readouterr().out)["results"]
    ref, got = runs[".safetensors"], runs[f".{fmt}"]
    assert [[t["label"] for t in r["top"]] for r in got] == [[t["label"] for t in r["top"]] for r in ref]
    assert [t["prob"] for r in got for t in r["top"]] == pytest.approx([t["prob"] for r in ref for t in r["top"]],
                                                                        abs=1e-5)
    assert main(["export", str(out), "--format", "safetensors", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert f"already a {fmt} export" in capsys.readouterr().err


def test_missing_export_extra_is_one_line_naming_the_install(cifar_run, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(cifar_run), "--format", "onnx", "--out", str(tmp_path / "t.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'teskd[export]'" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []
