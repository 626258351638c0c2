"""teskd: Teacher Evolution via Self-Knowledge Distillation (arXiv 2110.00329).

Python API (imported on first use, so ``import teskd`` stays light): :func:`train`, :func:`load`,
:func:`export`, :func:`predict` (see :mod:`teskd.api`).
"""

from teskd.version import __version__
__all__ = ["export", "load", "predict", "train"]


def __getattr__(name: str):
    if name in __all__:
        from teskd import api

        return getattr(api, name)
    raise AttributeError(f"module 'teskd' has no attribute {name!r}")
