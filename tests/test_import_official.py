"""`teskd import-official`: an official-layout state dict lands tensor by tensor where it belongs.

The official key names and shapes below are written out from the official model
definition (CIFAR ResNet-18 in ``classification/models/resnet_our.py``), not generated
from this project's modules, so a naming difference would fail here.
"""

import fractions
import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from teskd.cli import main
from teskd.errors import TeskdError
from teskd.models import list_backbones
from teskd.official import map_official_key, read_official


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def official_resnet18_shapes(classes=100, C=512):
    shapes = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64)}
    in_ch = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if (layer > 1 and block == 0) else 1
            p = f"layer{layer}.{block}"
            shapes[f"{p}.conv1.weight"] = (planes, in_ch, 3, 3)
            shapes.update(_bn(f"{p}.bn1", planes))
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update(_bn(f"{p}.bn2", planes))
            if stride != 1 or in_ch != planes:
                shapes[f"{p}.downsample.0.weight"] = (planes, in_ch, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", planes))
            in_ch = planes
    shapes["fc.weight"], shapes["fc.bias"] = (classes, 512), (classes,)
    for i, c in enumerate((64, 128, 256, 512)):
        shapes[f"laterals.{i}.0.weight"] = (C, c, 1, 1)
        shapes.update(_bn(f"laterals.{i}.1", C))
    for j in range(3):
        shapes[f"upsample.{j}.1.weight"] = (C, C, 1, 1)
        shapes.update(_bn(f"upsample.{j}.2", C))
    for level, k in ((1, 8), (2, 4), (3, 2)):
        shapes[f"fuse_{level}.0.weight"] = (C, 2 * C, 1, 1)
        shapes.update(_bn(f"fuse_{level}.1", C))
        shapes[f"downsample{level}.0.weight"] = (C, C, k, k)
        shapes[f"downsample{level}.0.bias"] = (C,)
        shapes.update(_bn(f"downsample{level}.1", C))
        shapes[f"downsample{level}.3.weight"] = (C, C, 1, 1)
        shapes[f"downsample{level}.3.bias"] = (C,)
        shapes.update(_bn(f"downsample{level}.4", C))
        shapes[f"fc_b{level}.weight"], shapes[f"fc_b{level}.bias"] = (classes, C), (classes,)
    return shapes


def fake_official_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(0, 10_000, (), generator=g)
        elif key.endswith("running_var"):  # a variance: positive (a negative one gives NaN logits)
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    state = fake_official_state(official_resnet18_shapes())
    # the parameter count of the official model, from the spec
    n = sum(v.numel() for k, v in state.items() if "running_" not in k and "num_batches" not in k)
    assert n == 37_050_832
    path = tmp_path_factory.mktemp("official") / "final_state.pth"
    torch.save(state, path)
    return path, state


def test_every_tensor_lands_where_it_should(official_file, tmp_path, capsys):
    path, state = official_file
    out = tmp_path / "imported.pt"
    assert main(["import-official", str(path), "--arch", "resnet18", "--out", str(out)]) == 0
    model = torch.load(out, weights_only=True)["model"]
    assert len(model) == len(state)  # nothing left over, nothing missing
    for key, value in state.items():
        target = map_official_key(key)
        assert torch.equal(model[target], value), key
    assert model["students.downsample1.0.weight"].shape[-1] == 8  # the shallowest student's 8x8 branch
    assert map_official_key("layer2.0.downsample.0.weight") == "backbone.layer2.0.downsample.0.weight"
    assert map_official_key("downsample2.3.bias") == "students.downsample2.3.bias"


def test_run_directory_output_exports_the_teacher_and_evaluates(official_file, tmp_path, capsys, cifar100_root):
    path, state = official_file
    run = tmp_path / "run"
    assert main(["import-official", str(path), "--arch", "resnet18", "--out", str(run)]) == 0
    teacher = load_file(str(run / "deployed.safetensors"))
    backbone_keys = {k for k in state if map_official_key(k).startswith("backbone.")}
    assert set(teacher) == backbone_keys
    for key in backbone_keys:
        assert torch.equal(teacher[key], state[key])
    # the run's config names its data root absolutely (null in the defaults), as the trainer's runs do
    assert Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]).is_absolute()
    capsys.readouterr()
    assert main(["eval", str(run), f"data.root={cifar100_root}", "data.test_subset_per_class=1",
                 "train.progress=false", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 100 and result["epoch"] == 0
    assert set(result["accuracy"]) == {"teacher", "student1", "student2", "student3", "students_ensemble"}


def test_wrappers_and_dataparallel_prefix_are_accepted(official_file, tmp_path):
    path, state = official_file
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 200}, wrapped)
    out = tmp_path / "t.safetensors"
    assert main(["import-official", str(wrapped), "--arch", "resnet18", "--out", str(out)]) == 0
    assert torch.equal(load_file(str(out))["fc.weight"], state["fc.weight"])


def test_mismatches_are_clear_errors(official_file, tmp_path, capsys):
    path, state = official_file
    out = str(tmp_path / "x.pt")
    assert main(["import-official", str(path), "--arch", "resnet34", "--out", out]) == 2
    assert "does not match the official model of this architecture" in capsys.readouterr().err
    partial = dict(state)
    del partial["fuse_2.0.weight"]
    bad = tmp_path / "partial.pth"
    torch.save(partial, bad)
    assert main(["import-official", str(bad), "--arch", "resnet18", "--out", out]) == 2
    assert "missing from the file (e.g. students.fuse_2.0.weight)" in capsys.readouterr().err
    assert main(["import-official", str(path), "--arch", "resnet18", "--out", out, "data.dataset=cifar10"]) == 2
    assert "100-way heads but data.dataset=cifar10 has 10 classes" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    assert main(["import-official", str(junk), "--arch", "resnet18", "--out", out]) == 2
    assert f"cannot read {junk}" in capsys.readouterr().err


def test_unknown_architecture_is_the_first_complaint(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"keep")
    known = ", ".join(list_backbones())
    assert "resnet18" in known and "vgg16" in known
    # an unreadable file, an existing --out and a class-count mismatch would all be errors too
    for path in (junk, tmp_path / "missing.pth"):
        argv = ["import-official", str(path), "--arch", "resnet99", "--out", str(existing), "data.dataset=cifar10"]
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: unknown architecture 'resnet99'; known: {known}\n"
    assert existing.read_bytes() == b"keep"


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


GARBAGE = {
    "junk": b"junk",
    "text": b"hello world\n" * 10,
    "plain_pickle": pickle.dumps({"w": 1}, protocol=4),  # torch's message: "Re-running ... weights_only ..."
    "object": _torch_bytes({"w": fractions.Fraction(1, 3)}),  # likewise
    "truncated": _torch_bytes({"w": torch.ones(3)})[:200],
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_file_is_one_line_and_never_suggests_weights_only(tmp_path, capsys, name):
    path = tmp_path / f"{name}.pth"
    path.write_bytes(GARBAGE[name])
    out = tmp_path / "out.pt"
    assert main(["import-official", str(path), "--arch", "resnet18", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read {path}: not a PyTorch state dict file, or one that holds objects "
                          f"other than tensors")
    assert err.endswith("\n") and "\n" not in err[:-1] and len(err) < 400
    assert "weights_only" not in err and "weights only" not in err.lower() and "Warning" not in err
    if name in ("plain_pickle", "object"):  # torch's reason is all about weights_only: left out
        assert err.endswith("other than tensors\n")
    if name == "truncated":  # torch's first sentence, when it is a reason
        assert "(RuntimeError: PytorchStreamReader failed reading zip archive" in err
    assert not out.exists()
    with pytest.raises(TeskdError) as info:
        read_official(path)
    assert info.value.__cause__ is not None  # torch's exception is kept as the cause (--debug shows it)


def test_empty_state_dict_file(tmp_path, capsys):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert main(["import-official", str(path), "--arch", "resnet18", "--out", str(tmp_path / "o.pt")]) == 2
    assert capsys.readouterr().err == f"error: cannot read {path}: the file is empty\n"


@pytest.mark.parametrize("name", ["model.pt", "deployed.safetensors", "weights.bin", "run"])
def test_existing_out_file_is_refused_not_overwritten(tmp_path, capsys, name):
    junk = tmp_path / "junk.pth"  # refused before the state dict is even read
    junk.write_bytes(b"junk")
    out = tmp_path / name
    out.write_bytes(b"precious")
    assert main(["import-official", str(junk), "--arch", "resnet18", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: --out {out} already exists; choose a new path\n"
    assert out.read_bytes() == b"precious"


def test_existing_out_directories(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    odd = tmp_path / "model.pt"  # a folder where a checkpoint file would go
    odd.mkdir()
    assert main(["import-official", str(junk), "--arch", "resnet18", "--out", str(odd)]) == 2
    assert capsys.readouterr().err == f"error: --out {odd} already exists; choose a new path\n"
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["import-official", str(junk), "--arch", "resnet18", "--out", str(run)]) == 2
    assert capsys.readouterr().err == f"error: {run} already exists and is not empty; choose a new run directory\n"
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    # an empty run directory is fine: it gets as far as reading the file
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["import-official", str(junk), "--arch", "resnet18", "--out", str(empty)]) == 2
    assert f"cannot read {junk}" in capsys.readouterr().err


def test_arch_override_must_agree(official_file, tmp_path, capsys):
    path, _ = official_file
    out = tmp_path / "x.pt"
    assert main(["import-official", str(path), "--arch", "resnet18", "--out", str(out), "model.arch=vgg16"]) == 2
    assert capsys.readouterr().err == ("error: --arch resnet18 and the override model.arch=vgg16 disagree; "
                                       "give the architecture with --arch only\n")
    assert not out.exists()
