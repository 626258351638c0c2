"""``--format torchvision``: the state dict of the torchvision network (a ``tv:NAME`` run, or the ImageNet
ResNets), with torchvision's own state-dict version table, so it loads the usual way::

    net = torchvision.models.get_model(NAME, weights=None, num_classes=N)
    net.load_state_dict(torch.load(PATH, weights_only=True))

A state dict without that table (e.g. the safetensors export read with ``safetensors.torch.load_file``)
loads into most torchvision networks too, but not into MNASNet, whose loader needs the layout version:
for MNASNet, load the ``.pth`` above. teskd writes this format but reads it back only to verify it (it holds
no metadata: use safetensors to hand teskd a network).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from teskd import fileio
from teskd.deploy.formats import ExportFormat, register_format
from teskd.deploy.metadata import DeployInfo
from teskd.errors import TeskdError

# teskd's ImageNet ResNets are torchvision's networks, module for module (see resnet_imagenet.py)
TORCHVISION_ARCHS = {"resnet18_imagenet": "resnet18", "resnet34_imagenet": "resnet34",
                     "resnet50_imagenet": "resnet50"}


def torchvision_twin(info: DeployInfo) -> torch.nn.Module:
    """The torchvision network ``info`` describes, freshly initialised."""
    import torchvision

    if info.arch.startswith("tv:"):  # a torchvision network trained as itself
        return torchvision.models.get_model(info.arch[3:], weights=None, num_classes=info.num_classes)
    name = TORCHVISION_ARCHS.get(info.arch)
    if name is None or info.width_mult != 1.0:
        raise TeskdError(f"--format torchvision is for tv:NAME networks and the ImageNet ResNets at width 1.0 "
                         f"({', '.join(TORCHVISION_ARCHS)}); this network is {info.arch} at width_mult "
                         f"{info.width_mult:g} (use safetensors, onnx or pt2)")
    return getattr(torchvision.models, name)(num_classes=info.num_classes)


def write_torchvision(model: torch.nn.Module, info: DeployInfo, out: Path) -> torch.nn.Module:
    """Write ``out`` and return the torchvision network loaded from it."""
    twin = torchvision_twin(info)
    state = model.state_dict()  # an OrderedDict: it can carry the version table below
    for key, value in state.items():
        state[key] = value.detach().cpu().contiguous()
    # torchvision's own version table, as torch.save(net.state_dict()) writes it: MNASNet's loader reads its
    # layout version there and refuses a state dict without one
    state._metadata = twin.state_dict()._metadata
    twin.load_state_dict(state, strict=True)  # proves the layout before anything is written
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fileio.atomic_write_bytes(out, buffer.getvalue())  # the project's one atomic write (fsync, kill points)
    twin.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
    return twin.eval()


def is_torchvision_export(path: Path) -> bool:
    """A plain state dict of tensors with a ResNet-style ``layer1.`` (what ``--overwrite`` may replace)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()) \
        and any(k.startswith("layer1.") for k in state)


register_format(ExportFormat("torchvision", ".pth", "plain state dict of the ImageNet ResNets", write_torchvision,
                             exact=True, recognises=is_torchvision_export))
