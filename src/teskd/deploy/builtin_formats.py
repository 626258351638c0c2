"""The export formats teskd ships: importing this module registers them (see :mod:`teskd.deploy.formats`)."""

from teskd.deploy import onnx_format as _onnx  # noqa: F401
from teskd.deploy import pt2_format as _pt2  # noqa: F401
from teskd.deploy import safetensors_format as _safetensors  # noqa: F401
from teskd.deploy import torchvision_format as _torchvision  # noqa: F401
