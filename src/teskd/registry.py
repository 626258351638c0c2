"""One registry class for every pluggable concept (architectures, methods, datasets).

Entries register themselves with a decorator where they are defined. A registry names the
module whose import registers the built-in entries and imports it on the first lookup, so a
lookup never depends on import order and no module has to import the plug-ins statically.
"""

from __future__ import annotations

import importlib
import os
import traceback
from collections.abc import Callable
from typing import Generic, TypeVar

from teskd.errors import TeskdError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtins: str, known: str = "known", more: str = ""):
        # for messages: "unknown <kind> 'x'; <known>: a, b<more>" (more: names that need no registration)
        self.kind, self.known, self.more = kind, known, more
        self.builtins = builtins
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> T:
        """Remove and return an entry (for a test or notebook that registered one for a while)."""
        try:
            return self._entries.pop(name)
        except KeyError as exc:
            raise TeskdError(f"{self.kind} {name!r} is not registered") from exc

    def snapshot(self) -> dict[str, T]:
        return dict(self._entries)

    def restore(self, entries: dict[str, T]) -> None:
        """Back to a ``snapshot()``: what was registered since is gone, what was removed is back."""
        self._entries.clear()
        self._entries.update(entries)

    def _load(self) -> None:
        importlib.import_module(self.builtins)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except (KeyError, TypeError) as exc:
            shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:77]}..."
            raise TeskdError(f"unknown {self.kind} {shown!r}; {self.known}: {', '.join(self.names())}{self.more}") \
                from exc


METHODS: Registry = Registry("method.name", "teskd.methods", "known methods")


PLUGINS_ENV = "TESKD_PLUGINS"


def _import_failure(name: str, exc: BaseException) -> TeskdError:
    """One line: the plug-in, ``file:line`` of its failure (the syntax error, else the innermost frame), why."""
    if isinstance(exc, SyntaxError):
        where, why = f"{exc.filename}:{exc.lineno}", f"{type(exc).__name__}: {exc.msg}"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        why = f"{type(exc).__name__}: {exc}"
    return TeskdError(f"{PLUGINS_ENV} plug-in {name!r} failed to import at {where} ({' '.join(why.split())[:200]})")


def load_plugins(value: str | None = None) -> None:
    """Import the modules named in ``TESKD_PLUGINS`` (comma-separated; ``value`` instead where given): a
    user's own backbones, methods or datasets register themselves there, with no change to teskd.

    Importing a module RUNS ITS CODE, with the user's rights, in every teskd command (a plug-in is code, not
    data): name only modules you trust, and never let a shared environment or a stranger's script set the
    variable. A plug-in that fails to import (a syntax error, an exception at import) is one TeskdError line
    naming it and the file:line of the failure (``--debug`` shows the traceback)."""
    value = os.environ.get(PLUGINS_ENV, "") if value is None else value
    for name in filter(None, (n.strip() for n in value.split(","))):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):  # not there at all
                raise TeskdError(f"{PLUGINS_ENV} names {name!r}, which cannot be imported ({exc})") from exc
            raise _import_failure(name, exc) from exc  # a module the plug-in imports is missing
        except (Exception, SystemExit) as exc:  # noqa: BLE001  (any failure of the plug-in's own code)
            raise _import_failure(name, exc) from exc
