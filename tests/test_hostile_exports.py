"""Export files from strangers: metadata that asks for gigabytes, implausibly large or non-regular files, integer
weights, concurrent exports to one file, an ONNX graph that fails at run time, eval of an export."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import teskd
from teskd.cli import main
from teskd.deploy.metadata import DeployInfo
from teskd.deploy.safetensors_format import save_safetensors
from teskd.errors import TeskdError
from teskd.models import build_backbone

from conftest import REPO


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("resnet18", 10, 0.0625).eval()


def _info(**kw) -> DeployInfo:
    return DeployInfo(arch="resnet18", num_classes=10, width_mult=0.0625, mean=(0.5, 0.5, 0.5),
                      std=(0.25, 0.25, 0.25), teskd_version="test", **kw)


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()).save(path)
    return path


def _error(capsys, argv) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    return err


def _forged(tmp_path, name: str, **meta) -> str:
    """A small export whose metadata was edited: the tiny network's weights, ``meta`` replacing its keys."""
    model = _tiny()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / name
    save_file(state, str(path), metadata={**_info().to_metadata(), **meta})
    return str(path)


def _builds_on(monkeypatch) -> list[str]:
    """Records the device of every backbone teskd builds while loading (meta: shapes only, no memory)."""
    import teskd.models as models

    devices, real = [], models.build_backbone

    def spy(*args, **kwargs):
        net = real(*args, **kwargs)
        devices.append(next(net.parameters()).device.type)
        return net

    monkeypatch.setattr(models, "build_backbone", spy)
    return devices


def test_metadata_past_its_bounds_is_refused_before_anything_is_built(tmp_path, image, capsys, monkeypatch):
    devices = _builds_on(monkeypatch)
    cases = {"num_classes": ("50000000", "at most 1e+06"), "width_mult": ("200", "at most 16"),
             "image_size": ("40000", "at most 4096"), "resize": ("99999", "at most 4096")}
    for key, (value, bound) in cases.items():
        evil = _forged(tmp_path, f"{key}.safetensors", **{key: value})
        err = _error(capsys, ["predict", evil, str(image)])
        assert f"bad metadata {key}='{value}' (expected a positive finite number {bound})" in err, err
    assert devices == []


def test_metadata_within_bounds_but_not_matching_the_weights_is_refused_on_the_meta_device(tmp_path, image,
                                                                                           capsys, monkeypatch):
    """900,000 classes at width 16 would be ~30 GB of parameters: the shapes are compared before any is made."""
    devices = _builds_on(monkeypatch)
    evil = _forged(tmp_path, "big.safetensors", num_classes="900000", width_mult="16")
    err = _error(capsys, ["predict", evil, str(image)])
    assert "does not match resnet18 (width_mult 16, 900000 classes): " in err and "shape mismatches" in err, err
    assert devices == ["meta"]
    with pytest.raises(TeskdError, match="shape mismatches"):
        teskd.load(evil)


def test_integer_weights_are_refused_not_cast(tmp_path, image, capsys):
    model = _tiny()
    state = {k: (v.to(torch.int8) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "int8.safetensors"
    save_file(state, str(path), metadata=_info().to_metadata())
    err = _error(capsys, ["predict", str(path), str(image)])
    assert "wrong number types" in err and "(file torch.int8, model torch.float32)" in err, err


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx", ".pt2"])
def test_sparse_huge_model_file_is_refused_unread(tmp_path, image, capsys, suffix):
    """20 GB that take no disk space: refused from the size, in one line, without reading."""
    path = tmp_path / f"sparse{suffix}"
    with open(path, "wb") as f:
        f.truncate(20 << 30)
    err = _error(capsys, ["predict", str(path), str(image)])
    assert f"refusing to read" in err and "21,474,836,480 bytes, more than" in err, err


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx", ".pt2"])
def test_fifo_as_model_file_does_not_hang(tmp_path, image, suffix):
    path = tmp_path / f"pipe{suffix}"
    os.mkfifo(path)
    proc = subprocess.run([sys.executable, "-m", "teskd", "predict", str(path), str(image)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert f"{path}: it is a FIFO (named pipe), not a regular file" in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_concurrent_replacement_is_detected_not_reported_as_verified(tmp_path, monkeypatch):
    """The file that took the name is checked: another writer replacing it in between is an error, not a
    'verified' message about a file that holds another network."""
    from teskd import fileio
    from teskd.deploy.export import export

    src_a, src_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_safetensors(_tiny(0), _info(), src_a)
    save_safetensors(_tiny(1), _info(), src_b)
    out = tmp_path / "out.safetensors"
    export(src_b, "safetensors", out)
    real = fileio.replace

    def racing(src, dst):
        real(src, dst)
        if dst == out:  # the other writer's rename lands right after ours
            other = out.with_name(".other.tmp")
            other.write_bytes(src_b.read_bytes())
            os.replace(other, out)

    monkeypatch.setattr(fileio, "replace", racing)
    with pytest.raises(TeskdError, match="was replaced by another export while this one finished"):
        export(src_a, "safetensors", out, overwrite=True)


def test_two_exports_to_one_file_at_once(tmp_path):
    """Two real processes, several rounds: each ends with exit 0 or one line; the file always holds one of the
    two networks, the one whose process reported last; no staged file is left."""
    from safetensors.torch import load_file

    srcs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for i, src in enumerate(srcs):
        save_safetensors(_tiny(i), _info(), src)
    out = tmp_path / "out.safetensors"
    wanted = [load_file(str(s)) for s in srcs]
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "teskd", "export", str(s), "--format", "safetensors",
                                   "--out", str(out), "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=tmp_path) for s in srcs]
        results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
        for stdout, stderr, code in results:
            assert code == 0 or (stderr.strip().count("\n") == 0 and stderr.startswith("error: ")), stderr
            assert "Traceback" not in stderr
        got = load_file(str(out))
        assert any(all(torch.equal(got[k], w[k]) for k in w) for w in wanted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "out.safetensors"]


def test_onnx_runtime_error_is_one_line(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from teskd.deploy.onnx_format import export_onnx, load_onnx

    path = tmp_path / "m.onnx"
    export_onnx(_tiny(), 32, path, _info().to_metadata())
    model, _ = load_onnx(path)
    with pytest.raises(TeskdError) as err:
        model(torch.zeros(1, 4, 32, 32))  # four channels: onnxruntime refuses the input
    assert str(err.value).startswith(f"onnxruntime could not run {path} on a batch of shape (1, 4, 32, 32): ")
    assert "\n" not in str(err.value)


def test_eval_evaluates_an_onnx_export_like_its_safetensors(tmp_path, capsys, cifar100_root):
    """`teskd eval x.onnx` evaluates the export (it used to say the file 'holds Python objects')."""
    pytest.importorskip("onnxruntime")
    from teskd.deploy.export import export

    info = DeployInfo(arch="resnet18", num_classes=100, width_mult=0.0625, mean=(0.5071, 0.4865, 0.4409),
                      std=(0.2673, 0.2564, 0.2762), dataset="cifar100", teskd_version="test")
    torch.manual_seed(0)
    src = tmp_path / "t.safetensors"
    save_safetensors(build_backbone("resnet18", 100, 0.0625), info, src)
    export(src, "onnx", tmp_path / "t.onnx")
    args = [f"data.root={cifar100_root}", "data.test_subset_per_class=2", "train.progress=false", "--json"]
    results = []
    for path in (src, tmp_path / "t.onnx"):
        assert main(["eval", str(path), *args]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[1]["format"] == "onnx" and results[1]["images"] == 200
    assert results[1]["accuracy"]["deployed"]["top1"] == pytest.approx(results[0]["accuracy"]["deployed"]["top1"],
                                                                      abs=0.5)
