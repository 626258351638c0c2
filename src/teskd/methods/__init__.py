"""Training methods. Importing this package registers the built-in ones (in :data:`teskd.registry.METHODS`)."""

from teskd.methods import ce, teskd  # noqa: F401  (registration)
from teskd.methods import label_smoothing  # noqa: F401
from teskd.methods import kd  # noqa: F401
from teskd.methods import dml  # noqa: F401
from teskd.methods import pskd  # noqa: F401
from teskd.methods import one  # noqa: F401
from teskd.methods import okddip  # noqa: F401
from teskd.methods import frskd  # noqa: F401
from teskd.methods import byot  # noqa: F401
from teskd.methods import dks  # noqa: F401
from teskd.methods import cskd  # noqa: F401
from teskd.methods.base import Method, StepOutput, register_method
from teskd.registry import METHODS


def build_method(name: str, backbone, num_classes: int, params, input_size: int = 32) -> Method:
    return METHODS.get(name)(backbone, num_classes, params, input_size)


__all__ = ["METHODS", "Method", "StepOutput", "register_method", "build_method"]
