"""Training methods. Importing this package registers the built-in ones."""

from teskd.methods.base import METHODS, Method, StepOutput, register_method
from teskd.methods import ce, teskd  # noqa: F401  (registration)


def build_method(name: str, backbone, num_classes: int, params) -> Method:
    from teskd.config import method_params_class  # validates the name

    method_params_class(name)
    return METHODS[name](backbone, num_classes, params)


__all__ = ["METHODS", "Method", "StepOutput", "register_method", "build_method"]
