"""Training methods. Importing this package registers the built-in ones (in :data:`teskd.registry.METHODS`)."""

from teskd.methods import ce, teskd  # noqa: F401  (registration)
from teskd.methods.base import Method, StepOutput, register_method
from teskd.registry import METHODS


def build_method(name: str, backbone, num_classes: int, params, input_size: int = 32) -> Method:
    return METHODS.get(name)(backbone, num_classes, params, input_size)


__all__ = ["METHODS", "Method", "StepOutput", "register_method", "build_method"]
