"""A new export format is one registration (issue 22): the toy ``npz`` format below is registered from this test
alone (the state dict as NumPy arrays, teskd's metadata as JSON beside them) and ``teskd export`` offers it,
writes and verifies it, refuses to overwrite a file that is not one, and ``predict`` / ``teskd.load`` read it."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import teskd
from teskd import fileio
from teskd.cli import main
from teskd.deploy.formats import FORMATS, ExportFormat, get_format, register_format
from teskd.deploy.metadata import DeployInfo
from teskd.deploy.safetensors_format import save_safetensors
from teskd.deploy.source import build_deployed, load_deployed
from teskd.models import build_backbone

META_KEY = "__teskd_metadata__"


def write_npz(model: torch.nn.Module, info: DeployInfo, out: Path) -> torch.nn.Module:
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{META_KEY: np.array(json.dumps(info.to_metadata()))})
    fileio.atomic_write_bytes(out, buffer.getvalue())
    return load_npz(out)[0]


def load_npz(path: Path) -> tuple[torch.nn.Module, DeployInfo]:
    with np.load(path, allow_pickle=False) as data:  # arrays and one string: nothing is unpickled
        info = DeployInfo.from_metadata(json.loads(str(data[META_KEY])), str(path))
        weights = {k: torch.from_numpy(data[k].copy()) for k in data.files if k != META_KEY}
    return build_deployed(weights, info, str(path)), info


@pytest.fixture
def npz_format():
    fmt = register_format(ExportFormat("npz", ".npz", "NumPy arrays + JSON metadata", write_npz, load_npz,
                                       exact=True))
    yield fmt
    FORMATS.unregister("npz")  # this test's entry must not outlive it


@pytest.fixture
def source(tmp_path) -> Path:
    torch.manual_seed(0)
    net = build_backbone("resnet18", 10, 0.0625)
    net.train()
    with torch.no_grad():  # BN statistics away from their defaults: a lost buffer changes the outputs
        net(torch.randn(4, 3, 32, 32))
    info = DeployInfo("resnet18", 10, 0.0625, input_size=32, resize=36, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4),
                      classes=tuple(f"class{i}" for i in range(10)), dataset="cifar10", teskd_version="test")
    return save_safetensors(net.eval(), info, tmp_path / "net.safetensors")


def test_export_help_lists_a_registered_format(npz_format, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "{npz,onnx,pt2,safetensors,torchvision}" in out
    assert "npz (NumPy arrays + JSON metadata)" in out


def test_a_registered_format_exports_verifies_loads_and_predicts(npz_format, source, tmp_path, capsys):
    out = tmp_path / "net.npz"
    assert main(["export", str(source), "--format", "npz", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["format"], result["out"], result["bound"], result["max_abs_diff"]) == ("npz", str(out), 0.0, 0.0)
    assert result["bytes"] == out.stat().st_size > 0
    original, exported = load_deployed(source), load_deployed(out)
    assert (exported.kind, exported.info) == ("npz", original.info)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported.model(x), original.model(x))
    model, preprocess, classes = teskd.load(out)
    assert classes == [f"class{i}" for i in range(10)] and preprocess.info == original.info
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    (tmp_path / "img.png").write_bytes(_png(image))
    assert main(["predict", str(out), str(tmp_path / "img.png"), "--json", "--topk", "3"]) == 0
    predicted = json.loads(capsys.readouterr().out)["results"][0]
    assert main(["predict", str(source), str(tmp_path / "img.png"), "--json", "--topk", "3"]) == 0
    assert predicted == json.loads(capsys.readouterr().out)["results"][0]  # the same network, the same answer
    assert len(predicted["top"]) == 3


def test_overwrite_replaces_only_an_export_of_the_format(npz_format, source, tmp_path, capsys):
    out = tmp_path / "net.npz"
    assert main(["export", str(source), "--format", "npz", "--out", str(out)]) == 0
    assert main(["export", str(source), "--format", "npz", "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    np.savez(other := tmp_path / "mine.npz", a=np.zeros(3))  # a user's own arrays
    before = other.read_bytes()
    assert main(["export", str(source), "--format", "npz", "--out", str(other), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == f"error: refusing to overwrite {other}: it is not a teskd npz export"
    assert other.read_bytes() == before
    assert get_format("npz").is_export(out) and not get_format("npz").is_export(other)


def test_a_second_reader_of_a_suffix_is_refused(npz_format):
    with pytest.raises(ValueError, match=r"suffix \.npz is read as format 'npz' already"):
        register_format(ExportFormat("npz2", ".npz", "again", write_npz, load_npz))


def _png(image: torch.Tensor) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()
