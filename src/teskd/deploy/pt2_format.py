"""The deployed network as a ``torch.export`` program (``.pt2``), teskd's metadata inside as ``teskd_metadata.json``.

Loading a ``.pt2`` from someone else. ``torch.export.load`` is not safe on such a file (its docstring: "uses
pickle under the hood ... never load data from an untrusted source"): in torch 2.14 a crafted archive runs code
through pickled weights/constants/sample inputs, ``data/aotinductor/`` libraries, ``guards_code`` that
``ExportedProgram.module()`` ``exec``-s, and shape expressions that ``sympy.sympify`` ``eval``-s. And the graph
itself is code: ``aten.from_file(path, shared=True)`` maps a file and a ``copy_`` writes through to it; a file
becomes logits with ``aten.from_file("/etc/passwd")``.

What :func:`load_pt2` guarantees: it never calls ``torch.export.load``, torch never reads the archive, nothing in
it is unpickled, and no graph that reads or writes files, seeds or prints, draws random numbers, or changes its
inputs, weights or buffers is accepted. How:

1. The archive is read here (``zipfile`` on the bytes read once; stored entries only, so no zip bomb): the file
   names ``torch.export.save`` writes for one program and nothing else, no payload flagged as a pickle, no custom
   or opaque objects, no guards code, shape expressions that are plain arithmetic on size symbols, little-endian
   raw tensors that lie inside their stored bytes. The sample inputs (a pickle) are never unpickled: their opcodes
   are parsed (``pickletools``) and may name only what a batch of tensors needs.
2. The graph must pass :func:`teskd.deploy.pt2_operators.check_graph` (see that module): aten operators only, none
   that touches files, storages, seeds or printing, draws random numbers or writes to an ``out=`` tensor; no
   in-place write to an input, weight or buffer (or a view of one); arguments where the schema puts them; one
   image input, one result and no declared mutations. A file failing these is refused even where its graph would
   not run.
3. **Rebuilt, not run**: when the metadata names a network teskd can build here (its registry, ``tv:``/``timm:``
   with the library installed), the network is first built on the meta device, where every tensor made meanwhile
   is forced (even a constructor asking for real tensors cannot allocate), and its state dict must equal the
   archive's weights and buffers key for key, in shape and dtype; only then is it built for real and the stored
   tensors (decoded from their raw bytes) loaded strictly. So a 1 KB file claiming 50 million classes or width
   x200 is refused before anything large exists (a claim of more classes than stored numbers even before the meta
   build); a teskd architecture whose metadata cannot be built at all is refused. No graph runs: the logits are
   the network's own, exactly those of the exported network.
4. Otherwise (an architecture teskd cannot build here: registered only in the exporting program, a library not
   installed, a library network that needs real tensors to be built, such as torchvision's RegNets) the graph
   runs, but only if every operator is in :data:`teskd.deploy.pt2_operators.OPERATORS`, what teskd's own exports
   contain (with their required constants: ``batch_norm`` in eval mode, ``dropout`` off). The program is
   deserialized from the checked JSON and the decoded tensors (``torch._export.serde``, private: a torch upgrade
   must re-read it), node metadata dropped, and ``.module(check_guards=False)`` generates no guard code.

``teskd export`` reads back the file it has just written with ``run_graph=True``: the graph (what a serving stack
runs) is verified, not a rebuild; every check but the operator list applies. Every refusal is one line saying
teskd loads ``.pt2`` files only as ``teskd export --format pt2`` writes them. Limits: route 4 runs a graph of
listed operators, which cannot touch files or state but could be made slow or large (e.g. a huge padding); this
rests on torch 2.14's serialized schema and must be re-checked on a torch upgrade.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import math
import os
import pickletools
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from teskd import fileio
from teskd.deploy.formats import ExportFormat, register_format
from teskd.deploy.metadata import DeployInfo
from teskd.deploy.pt2_operators import Refused, check_graph
from teskd.errors import TeskdError

METADATA_FILE = "teskd_metadata.json"
MODEL_NAME = "model"  # torch.export.save's name for the single program in the archive

# every file torch.export.save writes for one plain program (relative to the archive's root folder)
_ALLOWED_FILES = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    rf"|extra/{re.escape(METADATA_FILE)})")
_PROGRAM = f"models/{MODEL_NAME}.json"
_WEIGHTS = ("data/weights/", f"data/weights/{MODEL_NAME}_weights_config.json", "weight_")
_CONSTANTS = ("data/constants/", f"data/constants/{MODEL_NAME}_constants_config.json", "tensor_")
_JSON_LIMIT = 256 << 20  # the program of a large network is a few MB of JSON
# a symbolic size as torch 2.14 writes it: Symbol('s77', positive=True, integer=True), maybe with arithmetic
_SYMBOL = re.compile(r"Symbol\('[a-z]+\d+'(, [a-z_]+=(True|False))*\)")
_SAFE_EXPR_REST = re.compile(r"[0-9\s+\-*/(),]*")
_SAFE_FUNCTIONS = re.compile(r"\b(Max|Min|FloorDiv|CeilDiv|Mod|PythonMod|CleanDiv|Integer)\(")
# torch._export.serde.schema's ScalarType numbers of the dtypes a network's weights and buffers have
_DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
           7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16}
_STRIDED = 7  # schema.Layout.Strided


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = " ".join(lines[0].split())[:200] if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def export_pt2(model: torch.nn.Module, input_size: int, out: Path, metadata: dict[str, str]) -> Path:
    """``torch.export`` ``model`` (eval mode, CPU, float32; dynamic batch) to ``out`` atomically, with ``metadata``."""
    out = Path(out)
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's network stays as it was
    example = (torch.randn(2, 3, input_size, input_size),)  # 2, not 1: a size-1 dim would be specialised
    try:
        with torch.no_grad():
            program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as exc:  # noqa: BLE001 - export raises many types; all mean "cannot export"
        raise TeskdError(f"torch.export of {type(model).__name__} failed: {_short(exc)}") from exc
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        # into memory first: torch.export.save warns about a file name not ending in .pt2 (our temp name)
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(dict(metadata))})
        fileio.fault_point("write", tmp)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        fileio.replace(tmp, out)
    except Exception as exc:  # noqa: BLE001 - a full disk surfaces as RuntimeError from the zip writer
        tmp.unlink(missing_ok=True)
        raise TeskdError(f"could not write {out}: {fileio.describe_os_error(exc, out)}") from exc
    return out


def load_pt2(path: Path, run_graph: bool = False) -> tuple[Pt2Module, dict[str, str]]:
    """The network of a ``.pt2`` written by :func:`export_pt2` and its metadata; any other archive is refused
    (see the module docstring for what is checked, and when the network is rebuilt rather than its graph run).

    ``run_graph``: run the archive's graph even where teskd could rebuild the network, without the operator list
    (every other check stays). Only for ``teskd export`` verifying the file it has just written from the user's
    own network: the graph is what a serving stack will run, and a library network may use operators beyond
    the list."""
    path = Path(path)
    data = fileio.read_bytes(path, "pt2 file")
    try:
        archive = _Archive(data)
        _check_sample_inputs(archive)
        program = archive.json(_PROGRAM)
        _check_program(program)
        weights, constants = _stored_tensors(archive, program["graph_module"]["signature"])
        metadata = _metadata(archive, path)
        network = None if run_graph else _rebuild(archive, weights, metadata)
        if network is None:  # not a network teskd can build here: its graph runs, if made of teskd's operators
            check_graph(program["graph_module"], listed_only=not run_graph)
            network = _deserialize(program, _decode(archive, weights, _WEIGHTS[0]),
                                   _decode(archive, constants, _CONSTANTS[0]))
    except (_Unsafe, Refused) as exc:
        raise TeskdError(f"refusing to load {path}: {exc}; teskd loads .pt2 files only as `teskd export --format pt2` "
                         f"writes them, since a graph from elsewhere is code") from exc
    except TeskdError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise TeskdError(f"{path} is not a valid pt2 export ({_short(exc)})") from exc
    return Pt2Module(network), metadata


class Pt2Module(torch.nn.Module):
    """A loaded ``.pt2`` network as an inference-only module (rebuilt, or the graph of an exported program).

    ``ExportedProgram.module()`` raises on ``.eval()`` (and so does any parent's ``.eval()``); its graph was traced
    in eval mode, so eval is what it already is, and training mode cannot be had. A rebuilt network behaves alike.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.training = False

    def train(self, mode: bool = True) -> Pt2Module:
        if mode:
            raise TeskdError("a pt2 export is inference-only: its batch norms are fixed in eval mode")
        return self  # not recursing: the exported module refuses train()/eval() itself

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


class _Unsafe(Exception):
    """The archive is not what :func:`export_pt2` writes; the message says how."""


class _Archive:
    """The entries of a ``.pt2`` zip that has one root folder of the files torch.export.save writes, all stored."""

    def __init__(self, data: bytes) -> None:
        self.zip = zipfile.ZipFile(io.BytesIO(data))
        infos = self.zip.infolist()
        names = [i.filename for i in infos]
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or len(set(names)) != len(names):
            raise _Unsafe("the archive is not a single folder of unique files")
        self.root = roots.pop() + "/"
        self.sizes = {}
        for info in infos:
            name = info.filename[len(self.root):] if info.filename.startswith(self.root) else None
            if name is None or not _ALLOWED_FILES.fullmatch(name):
                raise _Unsafe(f"unexpected file {info.filename[:120]!r} in the archive")
            if info.compress_type != zipfile.ZIP_STORED:  # torch stores; a compressed entry could be a zip bomb
                raise _Unsafe(f"{name} is compressed")
            self.sizes[name] = info.file_size
        for name, value in (("archive_format", "pt2"), ("archive_version", "0"), ("byteorder", sys.byteorder)):
            if self.read(name, 64) != value.encode():
                raise _Unsafe(f"its {name} is not {value!r}")

    def read(self, name: str, limit: int | None = None) -> bytes:
        if name not in self.sizes:
            raise _Unsafe(f"it lacks {name}")
        if limit is not None and self.sizes[name] > limit:
            raise _Unsafe(f"{name} is {self.sizes[name]:,} bytes")
        return self.zip.read(self.root + name)

    def json(self, name: str):
        return json.loads(self.read(name, _JSON_LIMIT).decode("utf-8"))


# what torch.save writes for the example batch: tensors in tuples and a dict (sample inputs are never unpickled;
# a file whose pickle names anything else was not written by torch.export.save and is refused as tampered)
_SAMPLE_GLOBALS = re.compile(r"torch\._utils _rebuild_tensor_v2|torch [A-Za-z]+Storage|collections OrderedDict")
_CALLING_OPCODES = frozenset({"STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "BUILD"})


def _check_sample_inputs(archive: _Archive) -> None:
    """Read the pickle's opcodes (``pickletools`` parses, it never executes) for what a batch of tensors needs."""
    name = f"data/sample_inputs/{MODEL_NAME}.pt"
    if name not in archive.sizes:
        return
    with zipfile.ZipFile(io.BytesIO(archive.read(name))) as inner:
        pickles = [i for i in inner.infolist() if i.filename.endswith(".pkl")]
        if len(pickles) != 1 or pickles[0].compress_type != zipfile.ZIP_STORED or pickles[0].file_size > 1 << 20:
            raise _Unsafe("its sample inputs are not plain tensors")
        data = inner.read(pickles[0])
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in _CALLING_OPCODES or (opcode.name == "GLOBAL" and not _SAMPLE_GLOBALS.fullmatch(str(arg))):
            raise _Unsafe("its sample inputs are not plain tensors")


def _check_program(program: dict) -> None:
    """What every archive's program must pass, whether its graph will run or not (module docstring, 1-2)."""
    if program.get("guards_code"):
        raise _Unsafe("it carries guard code")
    _check_json(program)
    check_graph(program["graph_module"], listed_only=False)


def _check_json(value) -> None:
    """Walk the program: no subgraphs, operators as values, custom objects; shape expressions plain arithmetic."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("as_graph", "as_operator", "as_custom_obj", "as_custom_objs"):
                raise _Unsafe(f"it holds a {key[3:]} argument")
            if key == "expr_str" and not _plain_expression(str(item)):
                raise _Unsafe(f"shape expression {str(item)[:80]!r} is not plain arithmetic")
            _check_json(item)
    elif isinstance(value, list):
        for item in value:
            _check_json(item)


def _plain_expression(expr: str) -> bool:
    rest = _SAFE_FUNCTIONS.sub("(", _SYMBOL.sub("0", expr))
    return "**" not in expr and _SAFE_EXPR_REST.fullmatch(rest) is not None


@dataclass(frozen=True)
class _Stored:
    """One weight, buffer or constant as the archive describes it (its bytes not yet read)."""

    file: str  # e.g. weight_3; tensors may share one
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    is_param: bool
    requires_grad: bool

    @property
    def numel(self) -> int:
        return math.prod(self.size)


def _shown(name) -> str:
    """A name from the file, as a message shows it: quoted, cut short."""
    return repr(str(name)[:80])


def _ints(values, what: str) -> tuple[int, ...]:
    out = tuple(v.get("as_int") if isinstance(v, dict) and len(v) == 1 else None for v in values)
    if not all(type(v) is int and 0 <= v < 1 << 48 for v in out):
        raise _Unsafe(f"{_shown(what)} has sizes or strides that are not plain integers")
    return out


def _payload(archive: _Archive, layout: tuple[str, str, str]) -> dict[str, _Stored]:
    """The raw tensors a payload config lists: no pickles or objects, each inside its stored bytes."""
    folder, config_file, prefix = layout
    config = archive.json(config_file)
    entries = config.get("config") if isinstance(config, dict) and set(config) == {"config"} else None
    if not isinstance(entries, dict):
        raise _Unsafe(f"{config_file} is not a payload config")
    stored, dtypes = {}, {}
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise _Unsafe(f"{_shown(fqn)} is stored as a pickle")
        name, meta = entry.get("path_name"), entry.get("tensor_meta") or {}
        if not (isinstance(name, str) and re.fullmatch(rf"{prefix}\d+", name) and folder + name in archive.sizes):
            raise _Unsafe(f"{_shown(fqn)} is not a stored tensor")
        dtype = _DTYPES.get(meta.get("dtype"))
        if dtype is None or meta.get("layout") != _STRIDED or meta.get("device") != {"type": "cpu", "index": None}:
            raise _Unsafe(f"{_shown(fqn)} is not a dense CPU tensor of a plain dtype")
        size, stride = _ints(meta.get("sizes", ()), fqn), _ints(meta.get("strides", ()), fqn)
        (offset,) = _ints([meta.get("storage_offset")], fqn)
        item = _Stored(name, dtype, size, stride, offset, entry.get("is_param") is True,
                       meta.get("requires_grad") is True)
        nbytes = archive.sizes[folder + name]
        if dtypes.setdefault(name, dtype) != dtype or nbytes % dtype.itemsize \
                or len(size) != len(stride) or len(size) > 8:
            raise _Unsafe(f"{_shown(fqn)} does not fit its stored bytes")
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if item.numel else 0
        if extent * dtype.itemsize > nbytes:  # torch would fill a short record with zeros: 1 KB -> any size
            raise _Unsafe(f"{_shown(fqn)} claims more than its {nbytes:,} stored bytes")
        stored[fqn] = item
    return stored


def _stored_tensors(archive: _Archive, signature: dict) -> tuple[dict[str, _Stored], dict[str, _Stored]]:
    """The weights (parameters, persistent buffers) and constants (other buffers), exactly as the graph lists them."""
    weights, constants = _payload(archive, _WEIGHTS), _payload(archive, _CONSTANTS)
    params, persistent, other = set(), set(), set()
    for spec in signature["input_specs"]:
        if "parameter" in spec:
            params.add(spec["parameter"]["parameter_name"])
        elif "buffer" in spec:
            (persistent if spec["buffer"].get("persistent") is not False else other).add(spec["buffer"]["buffer_name"])
    if set(weights) != params | persistent or {k for k, v in weights.items() if v.is_param} != params \
            or set(constants) != other:
        raise _Unsafe("its stored tensors differ from the weights and buffers its graph takes")
    return weights, constants


def _decode(archive: _Archive, stored: dict[str, _Stored], folder: str) -> dict[str, torch.Tensor]:
    """The stored tensors from their raw bytes (no pickle), sharing storage where the archive shares a file."""
    flat: dict[str, torch.Tensor] = {}
    out = {}
    for fqn, item in stored.items():
        if item.file not in flat:
            raw = archive.read(folder + item.file)
            flat[item.file] = torch.frombuffer(bytearray(raw), dtype=item.dtype) if raw else \
                torch.empty(0, dtype=item.dtype)
        tensor = torch.as_strided(flat[item.file], item.size, item.stride, item.offset)
        out[fqn] = torch.nn.Parameter(tensor, requires_grad=item.requires_grad) if item.is_param else tensor
    return out


def _metadata(archive: _Archive, path: Path) -> dict[str, str]:
    try:
        metadata = json.loads(archive.read(f"extra/{METADATA_FILE}", 16 << 20).decode("utf-8"))
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise ValueError("not a JSON object of strings")
    except (ValueError, _Unsafe) as exc:
        raise TeskdError(f"{path} has no valid teskd metadata ({METADATA_FILE}: {_short(exc)})") from exc
    return metadata


def _network_spec(metadata: dict[str, str]) -> tuple[str, int, float] | None:
    """(arch, num_classes, width_mult) as the metadata gives them, or None where they are missing or not numbers."""
    try:
        arch, classes, width = metadata["arch"], int(metadata["num_classes"]), float(metadata["width_mult"])
    except (KeyError, ValueError):
        return None
    return (arch, classes, width) if classes >= 1 and 0 < width < math.inf else None


def _rebuild(archive: _Archive, weights: dict[str, _Stored], metadata: dict[str, str]) -> torch.nn.Module | None:
    """The network the metadata names, built by teskd with the archive's weights; None when teskd cannot build it
    here. Refused when the metadata and the stored weights disagree, before anything of the claimed size exists."""
    from teskd.engine.checkpoint import load_model_weights
    from teskd.models import build_backbone, list_backbones
    from teskd.models.meta_build import build_on_meta

    spec = _network_spec(metadata)
    if spec is None:
        return None
    arch, num_classes, width = spec
    total = sum(item.numel for item in weights.values())
    if num_classes > total:  # every class has at least one weight in the head
        raise _Unsafe(f"its metadata claims {num_classes:,} classes but it stores only {total:,} numbers")
    if arch.startswith(("tv:", "timm:")):  # imported outside the meta mode: no module-level tensor made there
        try:
            importlib.import_module("torchvision.models" if arch.startswith("tv:") else "timm")
        except ImportError:
            return None
    claimed = f"{arch} (width_mult {width:g}, {num_classes} classes)"
    try:
        skeleton = build_on_meta(lambda: build_backbone(arch, num_classes, width))
    except Exception as exc:  # noqa: BLE001 - unknown arch, missing library, a constructor that needs real tensors
        if arch in list_backbones():  # teskd's own: every export of it builds, so the metadata is wrong
            raise _Unsafe(f"its metadata's {_shown(claimed)} cannot be built ({_short(exc)})") from exc
        return None
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        names = ", ".join(map(_shown, missing[:2] or extra[:2]))
        raise _Unsafe(f"its weights are not those of its metadata's {claimed}: "
                      + (f"{len(missing)} missing ({names})" if missing else f"{len(extra)} unexpected ({names})"))
    for key, (shape, dtype) in expected.items():
        if (weights[key].size, weights[key].dtype) != (shape, dtype):
            raise _Unsafe(f"its weights are not those of its metadata's {claimed}: {key} is "
                          f"{list(weights[key].size)} {weights[key].dtype} in the file, {list(shape)} {dtype} there")
    with torch.device("cpu"):
        network = build_backbone(arch, num_classes, width)
    load_model_weights(network, {k: v.detach() for k, v in _decode(archive, weights, _WEIGHTS[0]).items()},
                       f"pt2 weights of {claimed}")
    return network.eval()


def _deserialize(program: dict, weights: dict[str, torch.Tensor], constants: dict[str, torch.Tensor]):
    """The checked program as a runnable module: from its JSON and the decoded tensors, never the archive."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    program = copy.copy(program)
    graph_module = program["graph_module"] = dict(program["graph_module"], metadata={})
    graph = graph_module["graph"] = dict(graph_module["graph"])
    graph["nodes"] = [dict(node, metadata={}) for node in graph["nodes"]]  # stack traces, module paths: unneeded
    exported = ExportedProgramDeserializer().deserialize(_dict_to_dataclass(schema.ExportedProgram, program),
                                                         weights, constants, None)
    return exported.module(check_guards=False)  # no guard code is generated or exec-ed


def _write(model: torch.nn.Module, info: DeployInfo, out: Path) -> torch.nn.Module:
    export_pt2(model, info.input_size, out, info.to_metadata())
    return load_pt2(out, run_graph=True)[0]  # verify the graph a serving stack runs, not a rebuild


def _load(path: Path) -> tuple[torch.nn.Module, DeployInfo]:
    model, meta = load_pt2(path)
    return model, DeployInfo.from_metadata(meta, str(path))


register_format(ExportFormat("pt2", ".pt2", "torch.export", _write, _load, movable=False))
