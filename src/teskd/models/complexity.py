"""Model size and cost: parameters and multiply-adds (MACs) per image."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in module.parameters())


def count_macs(
    module: nn.Module,
    input_shape: Sequence[int] = (1, 3, 32, 32),
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> int:
    """Multiply-adds per image of one forward pass, as executed.

    Counted per ATen op (``FlopCounterMode``), so functional code counts too: convolutions
    and matrix products (Linear included); biases, BN, activations, pooling and upsampling
    are not. The module runs in eval mode under no_grad on zeros of ``input_shape`` (on the
    device and dtype of its first parameter, so 'meta' costs nothing) through
    ``forward(module, x)`` (default ``module(x)``); its mode is restored. Students built
    with ``fast=False`` give the model's reference arithmetic, ``fast=True`` what the exact
    rewrites execute.
    """
    param = next(module.parameters(), None)
    x = torch.zeros(tuple(input_shape), device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None and param.is_floating_point() else None)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x) if forward is None else forward(module, x)
    finally:
        module.train(was_training)
    return counter.get_total_flops() // 2 // max(int(input_shape[0]), 1)
