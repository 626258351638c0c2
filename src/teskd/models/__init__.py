"""Models: backbones (the deployable teachers) and TESKD's students."""

from teskd.models.backbones import resnet as _resnet  # noqa: F401  (registers the ResNets)
from teskd.models.backbones import resnet_imagenet as _resnet_imagenet  # noqa: F401  (the ImageNet ResNets)
from teskd.models.backbones import senet as _senet, resnext as _resnext  # noqa: F401
from teskd.models.backbones import vgg as _vgg  # noqa: F401
from teskd.models.backbones.base import Backbone, Features, StageInfo
from teskd.models.complexity import count_macs, count_params
from teskd.models.backbones.library import LibraryBackbone, wrap_backbone
from teskd.models.stage_probe import StageTap, probe_stages
from teskd.models.registry import build_backbone, is_known_arch, list_backbones, register_backbone
from teskd.models.students import LEVELS, HierarchicalStudents

__all__ = [
    "LEVELS",
    "Backbone",
    "Features",
    "HierarchicalStudents",
    "LibraryBackbone",
    "StageInfo",
    "StageTap",
    "build_backbone",
    "count_macs",
    "count_params",
    "is_known_arch",
    "list_backbones",
    "probe_stages",
    "register_backbone",
    "wrap_backbone",
]
