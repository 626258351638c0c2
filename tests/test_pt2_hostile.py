"""A ``.pt2`` never reads or writes files: hostile archives (built here from a real tiny export) are refused before
anything in them runs, while teskd's own exports are rebuilt from their weights (metadata naming a network teskd
builds) or, for an architecture teskd cannot build, run only when their graph is made of teskd's operators.

Each hostile archive is first shown to be live: ``torch.export.load`` of a twin archive (aimed at a twin target)
does the harm. Then teskd, through ``teskd predict`` and ``teskd.load``, refuses it in one line and the target keeps
its bytes and mtime.
"""

from __future__ import annotations

import json
import resource
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn
from PIL import Image

import teskd
from teskd.cli import main
from teskd.deploy.metadata import DeployInfo
from teskd.deploy.pt2_format import export_pt2, load_pt2
from teskd.deploy.pt2_operators import OPERATORS, Refused, check_graph, graph_operators
from teskd.errors import TeskdError
from teskd.models import Backbone, build_backbone, list_backbones

# the metadata's arch decides how teskd loads an archive: rebuilt (teskd builds it) or its graph run (it cannot)
ROUTES = {"rebuilt": "resnet18", "graph": "net_registered_only_where_it_was_exported"}
WIDTH = 0.125
TAIL = ("; teskd loads .pt2 files only as `teskd export --format pt2` writes them, since a graph from elsewhere "
        "is code")
# every architecture teskd exports: its registry, and library networks its tests train or that bring the common
# operators of torchvision's small CNNs (add_, dropout/dropout_ switched off, hardsigmoid, hardswish_, hardtanh_)
ARCHS = [*list_backbones(), "tv:resnet18", "tv:mobilenet_v3_small", "tv:mobilenet_v2"]


def metadata(arch: str, **override) -> dict[str, str]:
    info = DeployInfo(arch=arch, num_classes=10, width_mult=1.0 if ":" in arch else WIDTH, input_size=32, resize=32)
    return {**info.to_metadata(), **override}


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    net = build_backbone("resnet18", 10, WIDTH)
    randomize_bn(net)
    return net.eval()


@pytest.fixture(scope="module")
def exports(network, tmp_path_factory):
    """A real export of ``network`` per route, differing only in the metadata's arch."""
    folder = tmp_path_factory.mktemp("pt2")
    return {route: export_pt2(network, 32, folder / f"{route}.pt2", metadata(arch)) for route, arch in ROUTES.items()}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
                    .numpy()).save(path)
    return path


def rewrite(src: Path, dst: Path, program=None, meta: dict | None = None) -> Path:
    """Copy an archive, changing its program JSON with ``program(dict)`` and/or its teskd metadata."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if program and item.filename.endswith("models/model.json"):
                loaded = json.loads(data)
                program(loaded)
                data = json.dumps(loaded).encode()
            if meta is not None and item.filename.endswith("extra/teskd_metadata.json"):
                data = json.dumps(meta).encode()
            zout.writestr(item.filename, data)
    return dst


def tensor_meta(dtype: int, n: int) -> dict:
    return {"dtype": dtype, "sizes": [{"as_int": n}], "requires_grad": False, "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7}


def node(target: str, inputs: list, out: str) -> dict:
    return {"target": f"torch.ops.aten.{target}", "name": out, "metadata": {}, "is_hop_single_tensor_return": None,
            "inputs": [{"name": k, "arg": v, "kind": kind} for k, v, kind in inputs],
            "outputs": [{"as_tensor": {"name": out}}]}


def graph(program: dict) -> dict:
    return program["graph_module"]["graph"]


def set_result(program: dict, name: str) -> None:
    """Make ``name`` the graph's one result (the logits)."""
    graph(program)["outputs"] = [{"as_tensor": {"name": name}}]
    program["graph_module"]["signature"]["output_specs"] = [{"user_output": {"arg": {"as_tensor": {"name": name}}}}]


def result(program: dict) -> str:
    return graph(program)["outputs"][0]["as_tensor"]["name"]


# --- the hostile edits: each returns (edit, control) where control(module, files) proves the edit is live ---------

SECRET = torch.arange(10, dtype=torch.float32) * 7  # the bytes of the file read into the logits


def read_a_file(files: dict):
    """(a) ``aten.from_file`` of a file the test made, added to the logits."""
    def edit(program):
        graph(program)["tensor_values"].update({"leak": tensor_meta(7, 10), "leaked": tensor_meta(7, 10)})
        graph(program)["nodes"] += [
            node("from_file.default", [("filename", {"as_string": str(files["secret"])}, 1),
                                       ("shared", {"as_bool": False}, 1), ("size", {"as_int": 10}, 1),
                                       ("dtype", {"as_scalar_type": 7}, 2)], "leak"),
            node("add.Tensor", [("self", {"as_tensor": {"name": result(program)}}, 1),
                                ("other", {"as_tensor": {"name": "leak"}}, 1)], "leaked")]
        set_result(program, "leaked")

    def control(module, net, x):
        assert torch.allclose(module(x) - net(x), SECRET.expand(len(x), 10), atol=1e-4)
    return edit, control


def write_through(files: dict):
    """(b) ``from_file(target, shared=True)`` + ``copy_``: overwrite a file; a second mapping creates a marker."""
    size = files["target"].stat().st_size

    def edit(program):
        graph(program)["tensor_values"].update({k: tensor_meta(1, size) for k in ("mapped", "payload", "copied")})
        graph(program)["tensor_values"]["marked"] = tensor_meta(1, 4)
        graph(program)["nodes"][:0] = [
            node("from_file.default", [("filename", {"as_string": str(files["target"])}, 1),
                                       ("shared", {"as_bool": True}, 1), ("size", {"as_int": size}, 1),
                                       ("dtype", {"as_scalar_type": 1}, 2)], "mapped"),
            node("full.default", [("size", {"as_ints": [size]}, 1), ("fill_value", {"as_float": 65.0}, 1),
                                  ("dtype", {"as_scalar_type": 1}, 2)], "payload"),
            node("copy_.default", [("self", {"as_tensor": {"name": "mapped"}}, 1),
                                   ("src", {"as_tensor": {"name": "payload"}}, 1)], "copied"),
            node("from_file.default", [("filename", {"as_string": str(files["marker"])}, 1),
                                       ("shared", {"as_bool": True}, 1), ("size", {"as_int": 4}, 1),
                                       ("dtype", {"as_scalar_type": 1}, 2)], "marked")]

    def control(module, net, x):
        module(x)
        assert files["target"].read_bytes() == b"A" * size and files["marker"].exists()
    return edit, control


def unlisted_operator(files: dict):
    """(c) an aten operator that looks harmless but is not one teskd's exports contain (silu_ for a relu_)."""
    def edit(program):
        first = next(n for n in graph(program)["nodes"] if n["target"] == "torch.ops.aten.relu_.default")
        first["target"] = "torch.ops.aten.silu_.default"

    def control(module, net, x):
        assert not torch.allclose(module(x), net(x), atol=1e-3)
    return edit, control


def buffer_mutation(files: dict):
    """(d) a graph whose signature writes a new value into a buffer (bn1.running_mean doubles at every call)."""
    def edit(program):
        graph(program)["tensor_values"]["doubled"] = dict(graph(program)["tensor_values"]["b_bn1_running_mean"])
        graph(program)["nodes"].insert(0, node("add.Tensor", [
            ("self", {"as_tensor": {"name": "b_bn1_running_mean"}}, 1),
            ("other", {"as_tensor": {"name": "b_bn1_running_mean"}}, 1)], "doubled"))
        graph(program)["outputs"].insert(0, {"as_tensor": {"name": "doubled"}})
        program["graph_module"]["signature"]["output_specs"].insert(0, {"buffer_mutation": {
            "arg": {"name": "doubled"}, "buffer_name": "bn1.running_mean"}})

    def control(module, net, x):
        before = dict(module.named_buffers())["bn1.running_mean"].clone()
        module(x)
        assert torch.allclose(dict(module.named_buffers())["bn1.running_mean"], 2 * before)
    return edit, control


def input_mutation(files: dict):
    """(d) an allowed in-place operator aimed at the caller's image batch (relu_ on the input)."""
    def edit(program):
        graph(program)["tensor_values"]["clobbered"] = dict(graph(program)["tensor_values"]["x"])
        graph(program)["nodes"].insert(0, node("relu_.default", [("self", {"as_tensor": {"name": "x"}}, 1)],
                                               "clobbered"))

    def control(module, net, x):
        x = x.clone()
        module(x)
        assert x.min() == 0  # the caller's tensor lost its negative values
    return edit, control


HOSTILE = {  # name -> (builder, the refusal's reason; None: loads on that route)
    "read_a_file": (read_a_file, "it calls aten.from_file.default, which reaches files, storages or global state"),
    "write_through": (write_through, "it calls aten.from_file.default, which reaches files, storages or global state"),
    "unlisted_operator": (unlisted_operator, "operator aten.silu_.default is not one teskd's exports contain"),
    "buffer_mutation": (buffer_mutation, "its signature declares a buffer_mutation output: the graph would change "
                                         "its buffers or inputs"),
    "input_mutation": (input_mutation, "it writes in place to its input or weights (aten.relu_.default on x)"),
}


def victim_files(folder: Path) -> dict:
    folder.mkdir()
    (folder / "secret.bin").write_bytes(SECRET.numpy().tobytes())
    (folder / "target.py").write_bytes(b"print('the module the attack overwrites')\n")
    return {"secret": folder / "secret.bin", "target": folder / "target.py", "marker": folder / "marker"}


def assert_refused(evil: Path, reason: str, image: Path, capsys) -> None:
    """The CLI and the Python API refuse ``evil`` with exactly this one line."""
    message = f"refusing to load {evil}: {reason}{TAIL}"
    assert main(["predict", str(evil), str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n" and captured.out == ""
    with pytest.raises(TeskdError) as err:
        teskd.load(evil)
    assert str(err.value) == message


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_graphs_are_refused_and_touch_nothing(case, route, network, exports, image, tmp_path, capsys):
    build, reason = HOSTILE[case]
    x = torch.randn(2, 3, 32, 32)
    # the twin archive, aimed at the twin files, does its harm when torch loads and runs it: the payload is live
    twin = victim_files(tmp_path / "twin")
    edit, control = build(twin)
    live = rewrite(exports[route], tmp_path / "live.pt2", edit)
    with torch.no_grad():
        control(torch.export.load(live).module(), network, x)

    files = victim_files(tmp_path / "victim")
    before = {k: (p.read_bytes(), p.stat().st_mtime_ns) for k, p in files.items() if p.exists()}
    edit, _ = build(files)
    evil = rewrite(exports[route], tmp_path / "evil.pt2", edit)
    if case == "unlisted_operator" and route == "rebuilt":
        # rebuilt from its weights, the graph never runs: the network's own logits, not silu's
        loaded, _ = load_pt2(evil)
        assert isinstance(loaded.network, Backbone)
        with torch.no_grad():
            assert torch.equal(loaded(x), network(x))
    else:
        assert_refused(evil, reason, image, capsys)
    assert {k: (p.read_bytes(), p.stat().st_mtime_ns) for k, p in files.items() if p.exists()} == before
    assert not files["marker"].exists()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.mark.parametrize("route", list(ROUTES))
def test_metadata_claiming_huge_classes_is_refused_before_anything_is_built(route, network, exports, image,
                                                                             tmp_path, capsys):
    """(e) 50 million classes with a 10-class head: refused from the stored sizes alone (a 64 x 50M head is 12 GB)."""
    evil = rewrite(exports[route], tmp_path / "evil.pt2", meta=metadata(ROUTES[route], num_classes="50000000"))
    stored = sum(t.numel() for t in network.state_dict().values())
    before = peak_rss()
    assert_refused(evil, f"its metadata claims 50,000,000 classes but it stores only {stored:,} numbers", image,
                   capsys)
    assert peak_rss() - before < 1 << 30


def test_metadata_claiming_a_huge_width_is_refused_before_anything_is_built(network, exports, image, tmp_path,
                                                                            capsys):
    """(e) width_mult 200 with width-0.125 weights: the claimed network exists on the meta device only."""
    evil = rewrite(exports["rebuilt"], tmp_path / "evil.pt2", meta=metadata("resnet18", width_mult="200"))
    with torch.device("meta"):
        claimed = build_backbone("resnet18", 10, 200).state_dict()
    first = next(iter(claimed))
    assert list(claimed[first].shape) != list(network.state_dict()[first].shape)
    before = peak_rss()
    assert_refused(evil, f"its weights are not those of its metadata's resnet18 (width_mult 200, 10 classes): "
                         f"{first} is {list(network.state_dict()[first].shape)} torch.float32 in the file, "
                         f"{list(claimed[first].shape)} torch.float32 there", image, capsys)
    assert peak_rss() - before < 1 << 30


def test_a_library_network_built_with_tensor_arithmetic_is_checked_on_meta_not_built_for_real(exports, tmp_path):
    """torchvision's RegNet computes its widths with tensors: it is still built on the meta device (its layout
    arithmetic on the CPU), so a claim of regnet_y_128gf (644M parameters) on tiny weights is refused from the
    shapes, with nothing of that size built."""
    archive = rewrite(exports["rebuilt"], tmp_path / "regnet.pt2", meta=metadata("tv:regnet_y_128gf"))
    before = peak_rss()
    with pytest.raises(TeskdError) as err:
        load_pt2(archive)
    assert peak_rss() - before < 1 << 30
    assert str(err.value).startswith(f"refusing to load {archive}: its weights are not those of its metadata's "
                                     f"tv:regnet_y_128gf (width_mult 1, 10 classes): ")


def test_export_verification_runs_the_graph_under_every_check_but_the_list(network, exports, tmp_path):
    """``teskd export`` reads back the file it wrote with ``run_graph=True``: the graph, not a rebuild, is compared
    with the network; a hostile graph is still refused."""
    loaded, _ = load_pt2(exports["rebuilt"], run_graph=True)
    assert isinstance(loaded.network, torch.fx.GraphModule)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - network(x)).abs().max() <= 1e-6
    edit, _ = read_a_file(victim_files(tmp_path / "victim"))
    evil = rewrite(exports["rebuilt"], tmp_path / "evil.pt2", edit)
    with pytest.raises(TeskdError) as err:
        load_pt2(evil, run_graph=True)
    assert str(err.value) == f"refusing to load {evil}: {HOSTILE['read_a_file'][1]}{TAIL}"


def test_arguments_must_be_the_schemas_and_stay_in_place(exports):
    """torch's deserializer appends positional arguments in schema order: an argument given after an omitted one
    would fill the omitted slot (and escape a check made by name); a name the schema lacks is refused too."""
    def conv_call(program):
        return next(n for n in graph(program)["nodes"] if n["target"] == "torch.ops.aten.conv2d.default")

    program = program_of(exports["graph"])
    check_graph(program["graph_module"], listed_only=True)
    conv_call(program)["inputs"] = [i for i in conv_call(program)["inputs"] if i["name"] != "bias"]
    with pytest.raises(Refused, match="^a call of aten.conv2d.default passes stride in the place of an omitted "
                                      "argument$"):
        check_graph(program["graph_module"], listed_only=True)
    program = program_of(exports["graph"])
    conv_call(program)["inputs"][0]["name"] = "images"
    with pytest.raises(Refused, match="^a call of aten.conv2d.default names arguments its schema lacks$"):
        check_graph(program["graph_module"], listed_only=True)


# --- teskd's own exports ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def architecture_exports(tmp_path_factory):
    """Every architecture exported once (tiny width, 32 px) with its network."""
    folder = tmp_path_factory.mktemp("archs")
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        net = build_backbone(arch, 10, 1.0 if ":" in arch else WIDTH)
        randomize_bn(net)
        out[arch] = net.eval(), export_pt2(net, 32, folder / f"{arch.replace(':', '_')}.pt2", metadata(arch))
    return out


def program_of(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(next(n for n in z.namelist() if n.endswith("models/model.json"))))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_is_rebuilt_exactly_and_its_graph_would_pass(arch, architecture_exports):
    net, path = architecture_exports[arch]
    check_graph(program_of(path)["graph_module"], listed_only=True)  # the graph route would accept it too
    loaded, meta = load_pt2(path)
    assert meta == metadata(arch)
    assert isinstance(loaded.network, Backbone) and not loaded.training
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded(x), net(x))


def test_the_operator_list_is_exactly_what_the_exports_contain(architecture_exports):
    used = set().union(*(graph_operators(program_of(path)) for _, path in architecture_exports.values()))
    assert used == set(OPERATORS)
    for name, required in OPERATORS.items():  # an operator that draws random numbers is listed only switched off
        _, op, overload = name.split(".")
        if torch.Tag.nondeterministic_seeded in getattr(getattr(torch.ops.aten, op), overload).tags:
            assert required, name


@pytest.mark.parametrize("arch", ["resnet18", "tv:mobilenet_v3_small"])
def test_a_listed_graph_runs_when_teskd_cannot_build_its_arch(arch, architecture_exports, tmp_path):
    net, path = architecture_exports[arch]
    unknown = rewrite(path, tmp_path / "unknown.pt2", meta={**metadata(arch), "arch": ROUTES["graph"]})
    loaded, _ = load_pt2(unknown)
    assert isinstance(loaded.network, torch.fx.GraphModule)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - net(x)).abs().max() <= 1e-6


def test_both_routes_predict_alike_from_the_cli(exports, image, capsys):
    results = {}
    for route, path in exports.items():
        assert main(["predict", str(path), str(image), "--topk", "3", "--json"]) == 0
        results[route] = json.loads(capsys.readouterr().out)["results"]
    top = {route: [t["label"] for r in res for t in r["top"]] for route, res in results.items()}
    assert top["rebuilt"] == top["graph"]
    probs = {route: [t["prob"] for r in res for t in r["top"]] for route, res in results.items()}
    assert probs["rebuilt"] == pytest.approx(probs["graph"], abs=1e-6)
