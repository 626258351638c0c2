"""``model.pretrained=PATH``: start the backbone from a local weights file (nothing is downloaded).

The file is a state dict of the backbone's network as ``.safetensors`` or a PyTorch file
read with ``weights_only=True`` (tensors only, no code); a dict that nests it under
"state_dict" or "model" works too. Every key must match. The classifier head alone may
differ in shape (ImageNet weights, 1000 classes, for a 100-class task): it keeps its fresh
initialisation, and the caller is told which tensors did.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from teskd.errors import TeskdError, one_line


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TeskdError(f"model.pretrained: no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TeskdError(f"model.pretrained: cannot read {path} as weights ({one_line(exc, 160)})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeskdError(f"model.pretrained: {path} does not hold a state dict of tensors")
    return state


def head_prefix(backbone: nn.Module) -> str:
    """The name of the last Linear module (the classifier), with a trailing dot."""
    linears = [name for name, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] + "." if linears else "\0"


def load_pretrained(backbone: nn.Module, path: Path | str) -> list[str]:
    """Copy the weights of ``path`` into ``backbone``; returns the head tensors left at their init."""
    path = Path(path)
    state, own = read_state_dict(path), backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        show = lambda keys: ", ".join(keys[:4]) + (f" (+{len(keys) - 4})" if len(keys) > 4 else "")  # noqa: E731
        raise TeskdError(f"model.pretrained: {path} does not match the network"
                         + (f"; missing {show(missing)}" if missing else "")
                         + (f"; unexpected {show(unexpected)}" if unexpected else ""))
    head = head_prefix(backbone)
    skipped = [k for k in own if state[k].shape != own[k].shape]
    wrong = [k for k in skipped if not k.startswith(head)]
    if wrong:
        raise TeskdError(f"model.pretrained: {path} has other shapes for {', '.join(wrong[:4])} "
                         f"(e.g. {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})")
    backbone.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped
