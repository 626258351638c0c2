"""Models: backbones (the deployable teachers), TESKD's students, the joint network."""

from teskd.models.backbones import resnet as _resnet  # noqa: F401  (registers the ResNets)
from teskd.models.backbones import senet as _senet, resnext as _resnext  # noqa: F401
from teskd.models.backbones import vgg as _vgg  # noqa: F401
from teskd.models.backbones.base import Backbone, StageInfo
from teskd.models.complexity import count_macs, count_params
from teskd.models.network import NetworkOutput, TeskdNetwork, default_student_width
from teskd.models.registry import build_backbone, list_backbones, register_backbone
from teskd.models.students import HierarchicalStudents

__all__ = [
    "Backbone",
    "HierarchicalStudents",
    "NetworkOutput",
    "StageInfo",
    "TeskdNetwork",
    "build_backbone",
    "count_macs",
    "count_params",
    "default_student_width",
    "list_backbones",
    "register_backbone",
]
