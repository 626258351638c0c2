"""The deployed network as ONNX (needs ``teskd[export]``): one self-contained ``.onnx`` with teskd's metadata.

The graph takes ``images`` (float32, N x 3 x S x S, N dynamic) and returns ``logits``; the metadata
(:class:`~teskd.deploy.metadata.DeployInfo` as strings) is stored in the model's ``metadata_props``.
"""

from __future__ import annotations

import copy
import contextlib
import io
import logging
import os
import re
from pathlib import Path

import torch

from teskd import fileio
from teskd.deploy.extras import require
from teskd.deploy.formats import ExportFormat, register_format
from teskd.deploy.metadata import DeployInfo
from teskd.errors import TeskdError

ONNX_LIMIT = 2 << 30  # protobuf cannot serialise a single-file model over 2 GiB

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the exporter's warnings about converting down to an older opset (we check the result ourselves)
_CHATTY_LOGGERS = ("torch.onnx._internal.exporter._compat", "onnxscript.version_converter")


def _short(exc: BaseException, root_cause: bool = False) -> str:
    """The first line of an exception (exporter errors run to pages), at most ~200 characters.

    ``root_cause``: of the innermost ``raise ... from`` cause; the exporter wraps the real reason
    (e.g. torch.export's) in a generic "step 1/3 failed" error, colour codes included.
    """
    while root_cause and exc.__cause__ is not None:
        exc = exc.__cause__
    lines = _ANSI.sub("", str(exc)).strip().splitlines()
    first = " ".join(lines[0].split())[:200] if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]):
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(model: torch.nn.Module, input_size: int, out: Path, metadata: dict[str, str],
                opset: int | None = None) -> Path:
    """Export ``model`` (eval mode, CPU, float32) to ``out`` atomically; ``opset=None``: the exporter's default."""
    onnx = require("onnx", "ONNX export", "export")
    require("onnxscript", "ONNX export", "export")  # the exporter's own dependency: fail with our message first
    out = Path(out)
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's network stays as it was
    batch = torch.export.Dim("batch", min=1)
    example = (torch.randn(2, 3, input_size, input_size),)  # 2, not 1: a size-1 dim would be specialised
    kwargs = {} if opset is None else {"opset_version": int(opset)}
    try:
        # the exporter has reported progress on stdout (verbose=True, and in some versions regardless);
        # errors still surface as the exception raised below
        with contextlib.redirect_stdout(io.StringIO()), _quiet(_CHATTY_LOGGERS), torch.no_grad():
            program = torch.onnx.export(model, example, None, dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                        external_data=False, verbose=False, **kwargs)
        proto = program.model_proto
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
        raise TeskdError(f"ONNX export of {type(model).__name__} failed: {_short(exc, root_cause=True)}") from exc
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != int(opset):
        # the exporter writes its own opset and converts to the one asked for; when that fails it keeps its own
        raise TeskdError(f"ONNX export at opset {opset} is not possible for this network: the exporter wrote "
                         f"opset {written} and could not convert it to {opset}; try another --opset "
                         f"(or none for the default)")
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=str(key), value=str(value))

    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fileio.fault_point("write", tmp)
        onnx.save_model(proto, os.fspath(tmp), save_as_external_data=False)  # weights inside: one file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fileio.replace(tmp, out)
    except Exception as exc:  # noqa: BLE001 - protobuf's size limit and a full disk both land here
        reason = fileio.describe_os_error(exc, out)  # before the removal frees space
        tmp.unlink(missing_ok=True)
        raise TeskdError(f"could not write {out}: {reason}") from exc
    return out


def _uses_external_data(onnx, proto) -> bool:
    """Whether any tensor (initializers, constants in attributes, subgraphs, sparse ones) points outside the file."""
    from onnx import external_data_helper

    tensors = list(external_data_helper._get_all_tensors(proto))  # private, but the walk onnx itself uses
    for sparse in proto.graph.sparse_initializer:
        tensors += [sparse.values, sparse.indices]
    return any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in tensors)


class OnnxModule(torch.nn.Module):
    """An onnxruntime session (CPU) as a module: float32 NCHW images in, logits out, both torch tensors."""

    def __init__(self, session, source: str = "the ONNX export") -> None:
        super().__init__()
        self.session, self.source = session, source
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            (logits,) = self.session.run([self.output_name], {self.input_name: x})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types: a wrong input size, a missing kernel
            raise TeskdError(f"onnxruntime could not run {self.source} on a batch of shape {tuple(x.shape)}: "
                             f"{_short(exc)}") from exc
        return torch.from_numpy(logits)


def load_onnx(path: Path) -> tuple[OnnxModule, dict[str, str]]:
    """The network of an ONNX export and its ``metadata_props``.

    The file must be self-contained: a model pointing at external data files is refused, so a file from
    anyone cannot make us read other files on this machine.
    """
    onnx = require("onnx", "loading an ONNX export", "export")
    ort = require("onnxruntime", "loading an ONNX export", "export")
    path = Path(path)
    data = fileio.read_bytes(path, "ONNX file", ONNX_LIMIT)
    try:
        proto = onnx.load_model_from_string(data)
        if not proto.graph.node and not proto.graph.output:  # protobuf parses many byte strings as "empty"
            raise ValueError("no graph in the file")
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise TeskdError(f"{path} is not a valid ONNX file ({_short(exc)})") from exc
    if _uses_external_data(onnx, proto):
        raise TeskdError(f"{path} keeps its weights in external data files; teskd reads self-contained ONNX only")
    metadata = {p.key: p.value for p in proto.metadata_props}
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    try:
        # from the bytes already read and checked, not the path: the file cannot change in between
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise TeskdError(f"{path} cannot be run by onnxruntime: {_short(exc)}") from exc
    return OnnxModule(session, str(path)).eval(), metadata


def _write(model: torch.nn.Module, info: DeployInfo, out: Path, opset: int | None = None) -> torch.nn.Module:
    export_onnx(model, info.input_size, out, info.to_metadata(), opset=opset)
    return load_onnx(out)[0]


def _load(path: Path) -> tuple[torch.nn.Module, DeployInfo]:
    model, meta = load_onnx(path)
    return model, DeployInfo.from_metadata(meta, str(path))


register_format(ExportFormat("onnx", ".onnx", "needs teskd[export]", _write, _load, options=("opset",),
                             requires=("onnx", "onnxscript", "onnxruntime"), movable=False))
