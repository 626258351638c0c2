"""``teskd export``: the deployed network alone, in the format a serving stack takes, verified after writing.

Every export is read back and run against the PyTorch network on random inputs (batch sizes 1 and 3,
so a dynamic batch dimension is exercised): weight formats must match exactly, compiled graphs
(ONNX, torch.export) within an absolute bound on the logits. The formats are those registered in
:mod:`teskd.deploy.formats`, one module each (e.g. :mod:`teskd.deploy.torchvision_format`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from teskd.deploy.formats import ExportFormat, get_format
from teskd.deploy.source import Deployed, load_deployed
from teskd.errors import TeskdError
from teskd.spelling import CLI, Spelling


def default_out(deployed: Deployed, fmt: str, which: str) -> Path:
    """``./<run name>-deployed[-best].<ext>`` (a checkpoint or export: ``./<file stem>.<ext>``)."""
    src = deployed.source
    if deployed.kind == "checkpoint" and src.parent.name == "checkpoints":  # inside a run folder
        stem = f"{src.parent.parent.resolve().name}-deployed" + ("-best" if src.stem.startswith("best") else "")
    else:
        stem = src.stem
    return Path(f"{stem}{get_format(fmt).suffix}")


def _check_out(out: Path, fmt: ExportFormat, overwrite: bool, spelling: Spelling = CLI) -> None:
    if out.is_dir():
        raise TeskdError(f"{spelling.out_is(out)} is a folder; give a file name, e.g. {out / ('deployed' + fmt.suffix)}")
    if not out.parent.is_dir():
        raise TeskdError(f"the folder of {spelling.out_is(out)} does not exist")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise TeskdError(f"{out} exists; pass {spelling.overwrite} to replace it (only a teskd export is replaced)")
        if out.is_symlink() or not out.is_file() or not fmt.is_export(out):
            raise TeskdError(f"refusing to overwrite {out}: it is not a teskd {fmt.name} export")


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


def _check_request(fmt: str, opset: int | None) -> ExportFormat:
    """The format asked for, its options and optional packages checked before any work."""
    from teskd.deploy.extras import require
    from teskd.deploy.formats import FORMATS

    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise TeskdError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS.names())}")
    spec = get_format(fmt)
    if opset is not None and "opset" not in spec.options:
        takers = [n for n in FORMATS.names() if "opset" in get_format(n).options]
        raise TeskdError(f"--opset applies to --format {' or '.join(takers)} only")
    for module in spec.requires:  # verification may need them too (onnxruntime)
        require(module, f"--format {spec.name}", "export")
    return spec


def export(target: Path | str, fmt: str, out: Path | str | None = None, which: str = "last",
           opset: int | None = None, overwrite: bool = False, bound: float | None = None,
           spelling: Spelling = CLI) -> dict:
    """Export the deployed network of ``target`` (run folder, checkpoint or ``.safetensors``) as ``fmt``;
    ``spelling``: how errors name ``out`` and ``overwrite`` (:mod:`teskd.spelling`)."""
    from teskd import fileio
    from teskd.deploy.verify import DEFAULT_BOUND, check_close, max_abs_diff

    spec = _check_request(fmt, opset)
    deployed = load_deployed(target, which)
    if deployed.kind not in ("checkpoint", "safetensors"):
        raise TeskdError(f"{deployed.source} is already a {deployed.kind} export; export from the run folder, a "
                         f"checkpoint or a .safetensors")
    out = Path(out) if out is not None else default_out(deployed, fmt, which)
    _check_out(out, spec, overwrite, spelling)
    model = deployed.model.float().cpu().eval()
    limit = 0.0 if spec.exact else (DEFAULT_BOUND if bound is None else bound)  # exact: any difference is a bug
    # written and verified under a hidden name of this process's own first: a failed check never replaces a
    # good export, and two exports to one file never share (or delete) each other's staged file
    _remove_stale_staging(out)
    staged = out.with_name(f"{_staging_prefix(out)}{os.getpid()}.{secrets.token_hex(4)}{out.suffix}")
    try:
        options = {"opset": opset} if opset is not None else {}
        loaded = spec.write(model, deployed.info, staged, **options)
        diff = max_abs_diff(model, loaded, deployed.info.input_size)
        check_close(diff, limit, f"{fmt} export {out}")
        digest = fileio.file_digest(staged)
        fileio.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)  # (a failed writer removes its own temporary file)
    if fileio.file_digest(out) != digest:  # the file that took the name is not the one verified
        raise TeskdError(f"{out} was replaced by another export while this one finished; it does not hold the "
                         f"network of {deployed.source}: run this export again")
    return {"format": fmt, "out": str(out), "bytes": out.stat().st_size, "source": str(deployed.source),
            "epoch": deployed.epoch, "partial": deployed.partial,  # partial: a mid-epoch checkpoint, said so
            "arch": deployed.info.arch, "num_classes": deployed.info.num_classes,
            "input_size": deployed.info.input_size, "max_abs_diff": diff, "bound": limit}
