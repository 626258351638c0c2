"""Checking an export against the PyTorch network it came from: same random inputs, logits compared."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from teskd.errors import TeskdError

# Absolute bound on |logit difference|, float32. Measured (torch 2.14, onnxruntime 1.32, CPU):
# * pt2 reproduces eager PyTorch exactly (0.0): the same aten kernels run;
# * ONNX (onnxruntime) differs by float32 reordering (fused conv+BN, its own GEMM/conv kernels), which
#   scales with the logits' size: 2e-9 .. 3e-8 on the width-0.125 test networks (logits ~0.1),
#   5.7e-6 on resnet18_imagenet (logits ~11), 7.6e-6 (resnet18 CIFAR, resnet50_imagenet at 224 px) and
#   1.1e-5 (vgg16) at width 1.0 with logits scaled to ~15 like a trained network's.
# 1e-4 leaves ~10x headroom over the worst of those while every real fault (a wrong or missing weight,
# train-mode BN, a wrong layout or preprocessing baked in) moves logits by 1e-2 or more.
DEFAULT_BOUND = 1e-4


def max_abs_diff(reference: nn.Module, candidate: nn.Module, input_size: int,
                 batch_sizes: Sequence[int] = (1, 3), seed: int = 0) -> float:
    """Largest |logit difference| between the two networks over random normal batches of each size.

    More than one batch size (and sizes other than the export's example batch of 2) proves the dynamic batch
    dimension works.
    """
    generator = torch.Generator().manual_seed(seed)
    reference.eval()
    candidate.eval()
    worst = 0.0
    with torch.no_grad():
        for n in batch_sizes:
            x = torch.randn(n, 3, input_size, input_size, generator=generator)
            expected = reference(x).float().cpu()
            got = candidate(x).float().cpu()
            if got.shape != expected.shape:
                raise TeskdError(f"output shape {tuple(got.shape)} differs from PyTorch's {tuple(expected.shape)} "
                                 f"at batch size {n}")
            diff = (got - expected).abs().max().item()
            if not math.isfinite(diff):
                return math.inf  # a NaN anywhere: unfaithful, whatever the other batches say
            worst = max(worst, diff)
    return worst


def check_close(diff: float, bound: float, what: str) -> None:
    """Raise unless ``diff`` is a finite number at most ``bound``."""
    if not math.isfinite(diff) or diff > bound:
        raise TeskdError(f"{what}: outputs differ from PyTorch by up to {diff:.3g} (bound {bound:g}); "
                         f"the export is not faithful")
