"""Model size and cost: parameters and multiply-adds (MACs) per image."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in module.parameters())


def count_macs(
    module: nn.Module,
    input_shape: Sequence[int] = (1, 3, 32, 32),
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> int:
    """Multiply-adds per image of one forward pass, counted with hooks.

    Counted: Conv2d (output elements x in_channels/groups x kh x kw) and Linear
    (in_features x out_features per row); biases, BN, activations, pooling and
    upsampling are not. The module runs in eval mode under no_grad on zeros of
    ``input_shape`` (on the device of its first parameter, so 'meta' works too)
    through ``forward(module, x)`` (default ``module(x)``); its mode is restored.
    Students are counted in their reference formulation (the model's arithmetic, module by
    module); ``executed_macs`` counts what the exact faster formulation runs.
    """
    from teskd.models.students import HierarchicalStudents

    total = 0

    def conv_hook(m: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += output.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))

    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = module.training
    module.eval()
    fast = [m for m in module.modules() if isinstance(m, HierarchicalStudents) and m.fast]
    for m in fast:
        m.fast = False  # the fast path calls functional ops the hooks cannot see
    try:
        x = torch.zeros(tuple(input_shape), device=device, dtype=dtype)
        with torch.no_grad():
            if forward is None:
                module(x)
            else:
                forward(module, x)
    finally:
        for h in handles:
            h.remove()
        for m in fast:
            m.fast = True
        module.train(was_training)
    batch = int(input_shape[0]) if len(input_shape) else 1
    return total // max(batch, 1)


def executed_macs(module: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32),
                  forward: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> int:
    """Multiply-adds per image that the forward actually executes (convolutions and matrix
    products, counted per ATen op, so functional rewrites are seen too)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        x = torch.zeros(tuple(input_shape), device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x) if forward is None else forward(module, x)
    finally:
        module.train(was_training)
    return counter.get_total_flops() // 2 // max(int(input_shape[0]), 1)
