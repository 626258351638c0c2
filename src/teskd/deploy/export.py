"""``teskd export``: the deployed network alone, in the format a serving stack takes, verified after writing.

Every export is read back and run against the PyTorch network on random inputs (batch sizes 1 and 3,
so a dynamic batch dimension is exercised): weight formats must match exactly, compiled graphs
(ONNX, torch.export) within an absolute bound on the logits.

``--format torchvision`` writes the state dict of the torchvision network (a ``tv:NAME`` run, or the
ImageNet ResNets), with torchvision's own state-dict version table, so it loads the usual way::

    net = torchvision.models.get_model(NAME, weights=None, num_classes=N)
    net.load_state_dict(torch.load(PATH, weights_only=True))

A state dict without that table (e.g. the safetensors export read with ``safetensors.torch.load_file``)
loads into most torchvision networks too, but not into MNASNet, whose loader needs the layout version:
for MNASNet, load the ``.pth`` above.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import torch

from teskd.deploy.metadata import DeployInfo
from teskd.deploy.source import Deployed, load_deployed
from teskd.errors import TeskdError

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "pt2": ".pt2", "torchvision": ".pth"}
# teskd's ImageNet ResNets are torchvision's networks, module for module (see resnet_imagenet.py)
TORCHVISION_ARCHS = {"resnet18_imagenet": "resnet18", "resnet34_imagenet": "resnet34",
                     "resnet50_imagenet": "resnet50"}


def default_out(deployed: Deployed, fmt: str, which: str) -> Path:
    """``./<run name>-teacher[-best].<ext>`` (a checkpoint or export: ``./<file stem>.<ext>``)."""
    src = deployed.source
    if deployed.kind == "checkpoint" and src.parent.name == "checkpoints":  # inside a run folder
        stem = f"{src.parent.parent.resolve().name}-teacher" + ("-best" if src.stem.startswith("best") else "")
    else:
        stem = src.stem
    return Path(f"{stem}{FORMATS[fmt]}")


def _existing_is_export(path: Path, fmt: str) -> bool:
    """Whether ``path`` is a teskd export that ``--overwrite`` may replace (never a user's other file)."""
    try:
        if fmt == "torchvision":
            state = torch.load(path, map_location="cpu", weights_only=True)
            return isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()) \
                and any(k.startswith("layer1.") for k in state)
        if fmt == "safetensors":
            from teskd.deploy.safetensors_format import read_safetensors

            return read_safetensors(path)[1].teskd_version is not None
        return "teskd_version" in load_deployed(path).info.to_metadata()
    except Exception:  # noqa: BLE001 - unreadable means "not ours"
        return False


def _check_out(out: Path, fmt: str, overwrite: bool) -> None:
    if out.is_dir():
        raise TeskdError(f"--out {out} is a folder; give a file name, e.g. {out / ('teacher' + FORMATS[fmt])}")
    if not out.parent.is_dir():
        raise TeskdError(f"the folder of --out {out} does not exist")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise TeskdError(f"{out} exists; pass --overwrite to replace it (only a teskd export is replaced)")
        if out.is_symlink() or not out.is_file() or not _existing_is_export(out, fmt):
            raise TeskdError(f"refusing to overwrite {out}: it is not a teskd {fmt} export")


def _staging_prefix(out: Path) -> str:
    return f".{out.stem}.unverified."


def _remove_stale_staging(out: Path) -> None:
    """Remove staged files of exports to ``out`` that were killed mid-way (their process is gone)."""
    prefix = _staging_prefix(out)
    with contextlib.suppress(OSError):
        for leftover in out.parent.iterdir():
            name = leftover.name.removeprefix(".") if leftover.name.startswith("." + prefix) else leftover.name
            pid = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""  # also the writer's .tmp
            if pid.isdigit() and not _alive(int(pid)) and leftover.is_file() and not leftover.is_symlink():
                leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _torchvision_twin(info: DeployInfo) -> torch.nn.Module:
    import torchvision

    if info.arch.startswith("tv:"):  # a torchvision network trained as itself
        return torchvision.models.get_model(info.arch[3:], weights=None, num_classes=info.num_classes)
    name = TORCHVISION_ARCHS.get(info.arch)
    if name is None or info.width_mult != 1.0:
        raise TeskdError(f"--format torchvision is for tv:NAME networks and the ImageNet ResNets at width 1.0 "
                         f"({', '.join(TORCHVISION_ARCHS)}); this network is {info.arch} at width_mult "
                         f"{info.width_mult:g} (use safetensors, onnx or pt2)")
    return getattr(torchvision.models, name)(num_classes=info.num_classes)


def _write(model: torch.nn.Module, info: DeployInfo, fmt: str, out: Path, opset: int | None) -> torch.nn.Module:
    """Write ``out`` and return the network read back from it."""
    meta = info.to_metadata()
    if fmt == "safetensors":
        from teskd.deploy.safetensors_format import save_safetensors

        save_safetensors(model, info, out)
        return load_deployed(out).model
    if fmt == "onnx":
        from teskd.deploy.onnx_format import export_onnx, load_onnx

        export_onnx(model, info.input_size, out, meta, opset=opset)
        return load_onnx(out)[0]
    if fmt == "pt2":
        from teskd.deploy.pt2_format import export_pt2, load_pt2

        export_pt2(model, info.input_size, out, meta)
        return load_pt2(out, run_graph=True)[0]  # verify the graph a serving stack runs, not a rebuild
    import io

    from teskd import fileio

    twin = _torchvision_twin(info)
    state = model.state_dict()  # an OrderedDict: it can carry the version table below
    for key, value in state.items():
        state[key] = value.detach().cpu().contiguous()
    # torchvision's own version table, as torch.save(net.state_dict()) writes it: MNASNet's loader reads its
    # layout version there and refuses a state dict without one
    state._metadata = twin.state_dict()._metadata
    twin.load_state_dict(state, strict=True)  # proves the layout before anything is written
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fileio.atomic_write_bytes(out, buffer.getvalue())  # the project's one atomic write (fsync, kill points)
    twin.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
    return twin.eval()


def export(target: Path | str, fmt: str, out: Path | str | None = None, which: str = "last",
           opset: int | None = None, overwrite: bool = False, bound: float | None = None) -> dict:
    """Export the deployed network of ``target`` (run folder, checkpoint or ``.safetensors``) as ``fmt``."""
    from teskd import fileio
    from teskd.deploy.verify import DEFAULT_BOUND, check_close, max_abs_diff

    if fmt not in FORMATS:
        raise TeskdError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise TeskdError("--opset applies to --format onnx only")
    if fmt == "onnx":  # every package it needs, before any work (verification runs onnxruntime)
        from teskd.deploy.extras import require

        for module in ("onnx", "onnxscript", "onnxruntime"):
            require(module, "ONNX export", "export")
    deployed = load_deployed(target, which)
    if deployed.kind not in ("checkpoint", "safetensors"):
        raise TeskdError(f"{deployed.source} is already a {deployed.kind} export; export from the run folder, a "
                         f"checkpoint or a .safetensors")
    out = Path(out) if out is not None else default_out(deployed, fmt, which)
    _check_out(out, fmt, overwrite)
    model = deployed.model.float().cpu().eval()
    exact = fmt in ("safetensors", "torchvision")  # the same weights: any difference is a bug
    limit = 0.0 if exact else (DEFAULT_BOUND if bound is None else bound)
    # written and verified under a hidden name of this process's own first: a failed check never replaces a
    # good export, and two exports to one file never share (or delete) each other's staged file
    _remove_stale_staging(out)
    staged = out.with_name(f"{_staging_prefix(out)}{os.getpid()}.{secrets.token_hex(4)}{out.suffix}")
    try:
        loaded = _write(model, deployed.info, fmt, staged, opset)
        diff = max_abs_diff(model, loaded, deployed.info.input_size)
        check_close(diff, limit, f"{fmt} export {out}")
        digest = fileio.file_digest(staged)
        fileio.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
        staged.with_name(f".{staged.name}.tmp").unlink(missing_ok=True)
    if fileio.file_digest(out) != digest:  # the file that took the name is not the one verified
        raise TeskdError(f"{out} was replaced by another export while this one finished; it does not hold the "
                         f"network of {deployed.source}: run this export again")
    return {"format": fmt, "out": str(out), "bytes": out.stat().st_size, "source": str(deployed.source),
            "epoch": deployed.epoch, "arch": deployed.info.arch, "num_classes": deployed.info.num_classes,
            "input_size": deployed.info.input_size, "max_abs_diff": diff, "bound": limit}
