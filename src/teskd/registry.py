"""One registry class for every pluggable concept (architectures, methods, datasets).

Entries register themselves with a decorator where they are defined. A registry names the
module whose import registers the built-in entries and imports it on the first lookup, so a
lookup never depends on import order and no module has to import the plug-ins statically.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from teskd.errors import TeskdError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtins: str, known: str = "known"):
        self.kind, self.known = kind, known  # for messages: "unknown <kind> 'x'; <known>: a, b"
        self.builtins = builtins
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

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
            raise TeskdError(f"unknown {self.kind} {shown!r}; {self.known}: {', '.join(self.names())}") from exc


METHODS: Registry = Registry("method.name", "teskd.methods", "known methods")
