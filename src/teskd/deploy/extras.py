"""Optional dependencies (``pip install 'teskd[<extra>]'``): imported on first use, with a one-line error if absent."""

from __future__ import annotations

import importlib
import sys
import types

from teskd.errors import TeskdError, one_line


def require(module: str, purpose: str, extra: str) -> types.ModuleType:
    """Import ``module`` for ``purpose``; if it is not installed, say which extra brings it in."""
    # sys.modules[name] = None is how Python (and monkeypatch in tests) marks a module as unimportable
    if module in sys.modules and sys.modules[module] is None:
        raise TeskdError(_missing(module, purpose, extra))
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing is None or module == missing or module.startswith(missing + "."):
            raise TeskdError(_missing(module, purpose, extra)) from exc
        # installed but broken (a dependency of it missing, a bad binary): say so, not "not installed"
        raise TeskdError(f"{purpose} needs the optional package {module.split('.')[0]}, which failed to import "
                         f"({one_line(exc, 200)}): pip install 'teskd[{extra}]'") from exc


def _missing(module: str, purpose: str, extra: str) -> str:
    package = module.split(".")[0]
    return f"{purpose} needs the optional package {package}, which is not installed: pip install 'teskd[{extra}]'"
