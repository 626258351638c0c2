"""The export formats teskd writes and reads: name -> :class:`ExportFormat`, one module each.

Adding a format is one module that ends with ``register_format(ExportFormat(...))`` plus one import line in
:mod:`teskd.deploy.builtin_formats` (or a ``TESKD_PLUGINS`` module): ``teskd export --format`` offers it,
``export`` writes and verifies it, and (given ``load``) ``predict``, ``eval`` and :func:`teskd.load` read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from teskd.deploy.metadata import DeployInfo
from teskd.registry import Registry


@dataclass(frozen=True)
class ExportFormat:
    name: str  # --format NAME
    suffix: str  # the file suffix, with its dot (".onnx"); a loadable format is recognised by it
    summary: str  # a few words for ``teskd export --help``
    # write(model, info, out, **options) -> the network read back from ``out`` (what export verifies); ``model``
    # is the deployed network (float32, CPU, eval mode); the write must be atomic (see teskd.fileio)
    write: Callable[..., nn.Module]
    # load(path) -> (network in eval mode, its DeployInfo); None: teskd writes but does not read the format
    load: Callable[[Path], tuple[nn.Module, DeployInfo]] | None = None
    exact: bool = False  # the same weights: outputs must be identical (else within export's --bound)
    # recognises(path) -> whether ``path`` is a teskd export of this format (``--overwrite`` replaces only those);
    # None: it loads and its metadata carries teskd_version
    recognises: Callable[[Path], bool] | None = None
    options: tuple[str, ...] = ()  # the keyword options ``write`` takes (e.g. "opset")
    requires: tuple[str, ...] = ()  # optional packages (extra "export") checked before any work
    movable: bool = True  # a loaded network may move to another device (compiled graphs run on the CPU)

    def __post_init__(self):
        if not (self.suffix.startswith(".") and len(self.suffix) > 1 and self.suffix == self.suffix.lower()):
            raise ValueError(f"export format {self.name!r}: suffix {self.suffix!r} must be '.' + lowercase letters")

    def is_export(self, path: Path) -> bool:
        """Whether ``path`` is a teskd export of this format; an unreadable file is not."""
        try:
            if self.recognises is not None:
                return bool(self.recognises(path))
            return self.load is not None and self.load(path)[1].teskd_version is not None
        except Exception:  # noqa: BLE001 - unreadable means "not ours"
            return False


FORMATS: Registry[ExportFormat] = Registry("export format", "teskd.deploy.builtin_formats", "known formats")


def register_format(fmt: ExportFormat) -> ExportFormat:
    # not FORMATS.names(): that would import the built-ins while one of them is registering
    taken = next((f.name for f in list(FORMATS._entries.values())
                  if f.load is not None and fmt.load is not None and f.suffix == fmt.suffix and f.name != fmt.name),
                 None)
    if taken is not None:
        raise ValueError(f"export format {fmt.name!r}: suffix {fmt.suffix} is read as format {taken!r} already")
    return FORMATS.register(fmt.name)(fmt)


def get_format(name: str) -> ExportFormat:
    return FORMATS.get(name)


def format_names() -> list[str]:
    return FORMATS.names()


def readable_format(path: Path | str) -> ExportFormat | None:
    """The loadable format ``path``'s suffix names (case-insensitive), or None (a run folder, a checkpoint)."""
    suffix = Path(path).suffix.lower()
    return next((f for f in map(FORMATS.get, FORMATS.names()) if f.load is not None and f.suffix == suffix), None)


def formats_help() -> str:
    """``name (summary), ...`` of every format: the ``--format`` help of ``teskd export``."""
    return ", ".join(f"{f.name} ({f.summary})" for f in map(FORMATS.get, FORMATS.names()))
