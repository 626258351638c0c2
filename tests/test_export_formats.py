"""ONNX and torch.export (pt2) exports: faithful to PyTorch, metadata round-trips, atomic writes, clean errors."""

from __future__ import annotations

import io
import json
import math
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from teskd import fileio
from teskd.deploy.extras import require
from teskd.deploy.verify import DEFAULT_BOUND, check_close, max_abs_diff
from teskd.errors import TeskdError
from teskd.models import build_backbone

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from teskd.deploy.onnx_format import export_onnx, load_onnx  # noqa: E402
from teskd.deploy.pt2_format import export_pt2, load_pt2  # noqa: E402

METADATA = {
    "arch": "resnet18",
    "num_classes": "10",
    "classes": json.dumps(["café", "naïve", "dog"], ensure_ascii=False),
    "mean": "0.5071,0.4865,0.4409",
    "std": "0.2673,0.2564,0.2762",
}
MODELS = {"resnet18": 32, "vgg16": 32, "resnet18_imagenet": 64}


def trained(arch: str, size: int) -> torch.nn.Module:
    """A tiny network after a few SGD steps, so its BN running statistics are not the defaults."""
    torch.manual_seed(0)
    model = build_backbone(arch, 10, 0.125)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny() -> torch.nn.Module:
    """The smallest conv+BN classifier: for the tests of writing and errors, where the network does not matter."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)).eval()


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return request.param, MODELS[request.param], trained(request.param, MODELS[request.param])


@pytest.fixture(scope="module")
def resnet18():
    return trained("resnet18", 32)


@pytest.fixture(scope="module")
def exported(resnet18, tmp_path_factory):
    """A good export of each format (resnet18, 32 px), written once; tests copy it before changing it."""
    folder = tmp_path_factory.mktemp("exports")
    return {"onnx": export_onnx(resnet18, 32, folder / "good.onnx", METADATA),
            "pt2": export_pt2(resnet18, 32, folder / "good.pt2", METADATA)}


def only_file(folder: Path, name: str) -> None:
    """``name`` is the folder's one entry: no external-data side file, no leftover temp."""
    assert sorted(p.name for p in folder.iterdir()) == [name]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_is_faithful_and_keeps_metadata(model, fmt, tmp_path):
    arch, size, net = model
    out = tmp_path / f"teacher.{fmt}"
    export, load = (export_onnx, load_onnx) if fmt == "onnx" else (export_pt2, load_pt2)
    assert export(net, size, out, METADATA) == out
    only_file(tmp_path, out.name)
    loaded, meta = load(out)
    assert meta == METADATA
    assert json.loads(meta["classes"])[0] == "café"
    # batch sizes other than the export's example batch of 2: the batch dimension is really dynamic
    batches = (1, 3, 5) if arch == "resnet18" else (1, 3)
    diff = max_abs_diff(net, loaded, size, batch_sizes=batches)
    assert diff <= DEFAULT_BOUND, f"{arch} {fmt}: {diff}"
    with torch.no_grad():
        assert loaded(torch.randn(5, 3, size, size)).shape == (5, 10)
    assert not loaded.training


def test_onnx_graph_interface_and_opset(resnet18, exported, tmp_path):
    import onnx

    net, default = resnet18, exported["onnx"]
    pinned = export_onnx(net, 32, tmp_path / "pinned.onnx", METADATA, opset=18)

    def opset(path):
        return {o.domain: o.version for o in onnx.load(path).opset_import}[""]

    assert opset(pinned) == 18
    assert opset(default) >= 18
    proto = onnx.load(pinned)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert not any(t.external_data for t in proto.graph.initializer)  # weights inside the file
    assert max_abs_diff(net, load_onnx(pinned)[0], 32) <= DEFAULT_BOUND


def test_an_opset_the_exporter_cannot_reach_is_an_error(tmp_path):
    # the exporter writes opset 18 and converts; when converting fails it silently keeps 18
    with pytest.raises(TeskdError, match="ONNX export at opset 14 is not possible") as err:
        export_onnx(tiny(), 16, tmp_path / "old.onnx", METADATA, opset=14)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_export_leaves_the_callers_network_alone(tmp_path):
    net = tiny().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export_pt2(net, 16, tmp_path / "m.pt2", METADATA)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_check_close():
    check_close(0.0, DEFAULT_BOUND, "x")
    check_close(DEFAULT_BOUND / 2, DEFAULT_BOUND, "x")
    check_close(DEFAULT_BOUND, DEFAULT_BOUND, "x")
    for bad in (2 * DEFAULT_BOUND, 0.5, math.nan, math.inf):
        with pytest.raises(TeskdError, match="onnx export a.onnx: outputs differ from PyTorch by up to") as err:
            check_close(bad, DEFAULT_BOUND, "onnx export a.onnx")
        assert "\n" not in str(err.value) and "not faithful" in str(err.value)


def test_max_abs_diff_sees_a_real_difference_and_nan():
    net, other = tiny(), tiny()
    assert max_abs_diff(net, other, 16) == 0.0  # same seed, same network
    with torch.no_grad():
        other[-1].bias.add_(1e-3)
    assert max_abs_diff(net, other, 16) == pytest.approx(1e-3, rel=1e-2)
    with torch.no_grad():
        other[-1].bias[0] = math.nan
    assert max_abs_diff(net, other, 16) == math.inf


def test_require_names_the_extra(monkeypatch):
    assert require("json", "anything", "export") is json
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(TeskdError) as err:
        require("onnxruntime", "ONNX export", "export")
    msg = str(err.value)
    assert msg == ("ONNX export needs the optional package onnxruntime, which is not installed: "
                   "pip install 'teskd[export]'")
    with pytest.raises(TeskdError, match="not installed"):
        require("teskd_no_such_package_xyz", "x", "export")


@pytest.mark.parametrize("module", ["onnx", "onnxscript", "onnxruntime"])
def test_onnx_paths_without_the_extra(module, exported, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)
    calls = [lambda: load_onnx(exported["onnx"])] if module != "onnxscript" else []  # loading needs no exporter
    if module != "onnxruntime":  # exporting does not run the model
        calls.append(lambda: export_onnx(tiny(), 16, tmp_path / "new.onnx", METADATA))
    for call in calls:
        with pytest.raises(TeskdError) as err:
            call()
        assert "pip install 'teskd[export]'" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("content", [b"not an onnx file", b"", b"PK\x03\x04 truncated zip"])
def test_corrupt_file_is_a_clean_error(fmt, content, tmp_path):
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(content)
    with pytest.raises(TeskdError) as err:
        (load_onnx if fmt == "onnx" else load_pt2)(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_missing_file_is_a_clean_error(fmt, tmp_path):
    path = tmp_path / f"absent.{fmt}"
    with pytest.raises(TeskdError, match="absent") as err:
        (load_onnx if fmt == "onnx" else load_pt2)(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_truncated_export_is_a_clean_error(fmt, exported, tmp_path):
    data = exported[fmt].read_bytes()
    path = tmp_path / f"t.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeskdError, match=f"t.{fmt}") as err:
        (load_onnx if fmt == "onnx" else load_pt2)(path)
    assert "\n" not in str(err.value)


def _fail_after_partial_write():
    """A save function that writes half a file, then fails like a full disk."""
    def save(_obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"partial")
        else:
            Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    return save


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(fmt, monkeypatch, tmp_path):
    import onnx

    out = tmp_path / f"teacher.{fmt}"
    out.write_bytes(b"the previous export")
    export = export_onnx if fmt == "onnx" else export_pt2
    if fmt == "onnx":
        monkeypatch.setattr(onnx, "save_model", _fail_after_partial_write())
    else:
        monkeypatch.setattr(torch.export, "save", _fail_after_partial_write())
    with pytest.raises(TeskdError, match=r"could not write .*teacher\.\w+: No space left on device") as err:
        export(tiny(), 16, out, METADATA)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"the previous export"
    only_file(tmp_path, out.name)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_failed_rename_leaves_no_temp(fmt, monkeypatch, tmp_path):
    """The temp file is complete but the final rename fails: the old file stays, the temp goes."""
    out = tmp_path / f"teacher.{fmt}"
    out.write_bytes(b"the previous export")
    seen = []

    def hook(op, path):
        seen.append((op, Path(path).name))
        if op == "replace":
            assert (tmp_path / f".{out.name}.tmp").stat().st_size > 500  # the full export was written
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(fileio, "fault_hook", hook)
    with pytest.raises(TeskdError, match="Input/output error"):
        (export_onnx if fmt == "onnx" else export_pt2)(tiny(), 16, out, METADATA)
    assert ("replace", out.name) in seen
    assert out.read_bytes() == b"the previous export"
    only_file(tmp_path, out.name)


def test_exporter_failure_is_one_line(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: neither exporter can trace it
                return x.mean(dim=(2, 3))
            return -x.mean(dim=(2, 3))

    for fmt, export in (("ONNX export", export_onnx), ("torch.export", export_pt2)):
        with pytest.raises(TeskdError) as err:
            export(Unexportable(), 8, tmp_path / "x.out", {})
        msg = str(err.value)
        assert msg.startswith(f"{fmt} of Unexportable failed:") and "\n" not in msg and len(msg) < 300
    assert list(tmp_path.iterdir()) == []


def _rewrite_pt2(src: Path, dst: Path, edit) -> None:
    """Copy a .pt2 archive, letting ``edit(name, data) -> data | None`` change or drop entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = edit(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item.filename, data)


def test_pt2_refuses_archives_that_could_run_code(exported, tmp_path):
    good = exported["pt2"]
    root = zipfile.ZipFile(good).namelist()[0].split("/")[0]
    canary = tmp_path / "ran"

    class Payload:  # unpickling this creates the file `canary`: code from the file ran
        def __reduce__(self):
            return (open, (str(canary), "w"))

    buf = io.BytesIO()
    torch.save(Payload(), buf)
    pickled = buf.getvalue()

    def pickle_weight(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            config["config"]["conv1.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return pickled
        return data

    def program_edit(change):
        def edit(name, data):
            if name.endswith("models/model.json"):
                program = json.loads(data)
                change(program)
                return json.dumps(program).encode()
            return data
        return edit

    def guards(program):
        program["guards_code"] = [f"__import__('pathlib').Path({str(canary)!r}).touch() or True"]

    def target(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.load_library"

    def sym_expr(program):
        text = json.dumps(program)
        sym = text.split("Symbol('")[1].split("'")[0]
        evil = f"__import__('pathlib').Path({str(canary)!r}).touch()"
        program.clear()
        program.update(json.loads(text.replace(f"Symbol('{sym}', positive=True, integer=True)", evil, 1)))

    cases = {
        "pickled weight": pickle_weight,
        "pickled sample inputs": lambda n, d: pickled if n.endswith("sample_inputs/model.pt") else d,
        "aoti library": None,
        "guards code": program_edit(guards),
        "non-aten target": program_edit(target),
        "shape expression": program_edit(sym_expr),
    }
    for case, edit in cases.items():
        bad = tmp_path / "bad.pt2"
        if edit is None:
            _rewrite_pt2(good, bad, lambda n, d: d)
            with zipfile.ZipFile(bad, "a") as z:
                z.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
        else:
            _rewrite_pt2(good, bad, edit)
        with pytest.raises(TeskdError, match="refusing to load .*bad.pt2") as err:
            load_pt2(bad)
        assert "\n" not in str(err.value), case
        assert not canary.exists(), case
    # the rewriting itself keeps a good archive loadable: the refusals above are about the payloads
    _rewrite_pt2(good, tmp_path / "copy.pt2", lambda n, d: d)
    assert load_pt2(tmp_path / "copy.pt2")[1] == METADATA


def test_pt2_module_is_inference_only(exported):
    loaded, _ = load_pt2(exported["pt2"])
    assert loaded.eval() is loaded and not loaded.training
    torch.nn.Sequential(loaded).eval()  # a parent's eval() does not reach the exported module's refusal
    with pytest.raises(TeskdError, match="inference-only"):
        loaded.train()
