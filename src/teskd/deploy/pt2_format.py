"""The deployed network as a ``torch.export`` program (``.pt2``), teskd's metadata inside as ``teskd_metadata.json``.

Safety of loading. ``torch.export.load`` in torch 2.14 is NOT safe on a file from someone else (its own
docstring says "uses pickle under the hood ... never load data from an untrusted source"). Reading its source
(torch/export/__init__.py, torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py,
torch/export/_unlift.py), a crafted archive can run code through:

* weights or constants flagged ``use_pickle`` in the archive's JSON configs: ``torch.load(weights_only=False)``;
* constants named ``opaque_obj_*``: ``pickle.loads``; ``custom_obj_*``: TorchScript's unpickler;
* legacy weight/constant files (``data/weights/<model>.pt``) and the sample inputs: ``torch.load`` retried with
  ``weights_only=False`` when the safe load fails; likewise the pre-2.8 zip layout it falls back to;
* ``data/aotinductor/``: compiled shared libraries, loaded into the process;
* ``guards_code``: Python source ``exec``-ed by ``ExportedProgram.module()``;
* symbolic shape expressions: ``sympy.sympify`` (which ``eval``-s its string);
* node targets resolved as any attribute chain below ``torch`` (e.g. ``torch.ops.load_library``), called at run time.

So :func:`load_pt2` first checks the archive against what :func:`export_pt2` writes (an allowlist of file
names, no pickled payloads, no guards code, ``aten`` operators only, plain symbol expressions, sample inputs
that load with ``weights_only=True``) and refuses anything else, then hands the very bytes it checked to
``torch.export.load``. This is a check against the known paths in torch 2.14, not a proof; a torch upgrade must
re-read those files.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import zipfile
from pathlib import Path

import torch

from teskd import fileio
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
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")
# a symbolic size as torch 2.14 writes it: Symbol('s77', positive=True, integer=True), maybe with arithmetic
_SYMBOL = re.compile(r"Symbol\('[a-z]+\d+'(, [a-z_]+=(True|False))*\)")
_SAFE_EXPR_REST = re.compile(r"[0-9\s+\-*/(),]*")
_SAFE_FUNCTIONS = re.compile(r"\b(Max|Min|FloorDiv|CeilDiv|Mod|PythonMod|CleanDiv|Integer)\(")


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


def load_pt2(path: Path) -> tuple[Pt2Module, dict[str, str]]:
    """The network of a ``.pt2`` written by :func:`export_pt2` and its metadata; any other archive is refused."""
    path = Path(path)
    data = fileio.read_bytes(path, "pt2 file")
    try:
        _check_archive(data)
    except _Unsafe as exc:
        raise TeskdError(f"refusing to load {path}: {exc}; teskd loads .pt2 files only as `teskd export "
                         f"--format pt2` writes them, since others can run code when loaded") from exc
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise TeskdError(f"{path} is not a valid pt2 export ({_short(exc)})") from exc
    extra = {METADATA_FILE: ""}
    try:
        # the bytes checked above, not the path: the file cannot be swapped in between
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
        module = Pt2Module(program.module())
    except Exception as exc:  # noqa: BLE001
        raise TeskdError(f"{path} is not a valid pt2 export ({_short(exc)})") from exc
    try:
        metadata = json.loads(extra[METADATA_FILE])
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise ValueError("not a JSON object of strings")
    except ValueError as exc:
        raise TeskdError(f"{path} has no valid teskd metadata ({METADATA_FILE}: {_short(exc)})") from exc
    return module, metadata


class Pt2Module(torch.nn.Module):
    """An exported program as an inference-only module.

    ``ExportedProgram.module()`` raises on ``.eval()`` (and so does any parent's ``.eval()``); its graph was
    traced in eval mode, so eval is what it already is, and training mode cannot be had.
    """

    def __init__(self, program: torch.nn.Module) -> None:
        super().__init__()
        self.program = program
        self.training = False

    def train(self, mode: bool = True) -> Pt2Module:
        if mode:
            raise TeskdError("a pt2 export is inference-only: its batch norms are fixed in eval mode")
        return self  # not recursing: the exported module refuses train()/eval() itself

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.program(images)


class _Unsafe(Exception):
    """The archive holds something that could run code when loaded."""


def _check_archive(data: bytes) -> None:
    """Raise :class:`_Unsafe` unless ``data`` holds only what :func:`export_pt2` writes (see the module docstring)."""
    from torch.export.pt2_archive._package import PT2ArchiveReader  # private: the reader torch.export.load uses

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or len(set(names)) != len(names):
        raise _Unsafe("the archive is not a single folder of unique files")
    root = roots.pop() + "/"
    for name in names:
        if not (name.startswith(root) and _ALLOWED_FILES.fullmatch(name[len(root):])):
            raise _Unsafe(f"unexpected file {name!r} in the archive")

    reader = PT2ArchiveReader(io.BytesIO(data))
    files = set(reader.get_file_names())
    for config in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
        entries = json.loads(reader.read_string(config))["config"] if config in files else {}
        for key, payload in entries.items():
            if payload.get("use_pickle") or not re.fullmatch(r"(weight|tensor)_\d+", str(payload.get("path_name"))):
                raise _Unsafe(f"{key!r} is stored as a pickle")
    sample_inputs = f"data/sample_inputs/{MODEL_NAME}.pt"
    if sample_inputs in files:  # torch retries a failed safe load unsafely; make sure the safe load succeeds
        try:
            torch.load(io.BytesIO(reader.read_bytes(sample_inputs)), weights_only=True)
        except Exception as exc:
            raise _Unsafe("its sample inputs are not plain tensors") from exc

    program = json.loads(reader.read_string(f"models/{MODEL_NAME}.json"))
    if program.get("guards_code"):
        raise _Unsafe("it carries guard code")
    graph = program["graph_module"]["graph"]
    if graph.get("custom_obj_values"):
        raise _Unsafe("it holds custom objects")
    for node in graph["nodes"]:
        if not _ATEN_TARGET.fullmatch(str(node.get("target"))) or "__" in node["target"]:
            raise _Unsafe(f"operator {str(node.get('target'))[:80]!r} is not an aten operator")
    _check_json(program)


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
