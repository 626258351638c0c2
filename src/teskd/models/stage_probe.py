"""Find the four stage maps of any CNN by watching one forward pass (a shape probe).

TESKD's students need T1..T4: four feature maps at increasing reductions (strides). A
library network does not label them, so they are found from what its modules do: hooks
on every submodule record the input and output shapes of one pass on a square
``probe_size`` image (on the 'meta' device, so no memory and no compute). Then:

- the **levels** are the reductions (probe / map size) of every module output that is a
  square map of at least 2x2; T1..T4 are the deepest four levels R1 < R2 < R3 < R4;
- for i = 1..3, **T_i is the input of the first module called with a map at R_i that
  returns a map at R_(i+1)**: the outermost module that downsamples, e.g. ``layer2`` of a
  ResNet or ``features.9`` of MobileNetV3 (its input is the previous block's output,
  not the expansion conv inside the downsampling block, and squeeze-excitation pools,
  which return 1x1 maps, do not count);
- **T4 is the input of the last module called with a map at R4 that returns something
  else** (the global pool); when the pool is functional code (DenseNet), T4 is the output
  of the last module to return a map at R4.

Modules called more than once in a pass (a shared ReLU) are never chosen. The result is a
``StageTap`` per stage: where to hook (module name, its input or its output), channels and
reduction. A network whose maps do not give four levels (a transformer, a net that pools
early) gets a one-line error.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from teskd.errors import TeskdError

# a multiple of 32 that is not 224, so VGG's fixed 7x7 pool is not mistaken for a stage; 224 is the
# fallback for networks that accept only that size
PROBE_SIZES = (256, 224)


@dataclass(frozen=True)
class StageTap:
    """Where stage map T_i of a wrapped network is read."""

    module: str  # dotted submodule name
    where: Literal["input", "output"]  # the module's first positional input, or its output
    channels: int
    reduction: int


@dataclass
class _Call:
    name: str
    start: int
    end: int = -1
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None


def _reduction(shape: tuple[int, ...] | None, size: int) -> int | None:
    """probe / map size for a square (B, C, H, H) map of at least 2x2 that divides the probe."""
    if shape is None or len(shape) != 4 or shape[2] != shape[3] or shape[2] < 2 or size % shape[2]:
        return None
    return size // shape[2]


def _record(model: nn.Module, x: torch.Tensor) -> tuple[list[_Call], object]:
    calls: list[_Call] = []
    open_calls: dict[int, list[_Call]] = {}
    counter = itertools.count()
    handles = []

    def shape_of(value) -> tuple[int, ...] | None:
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    for name, module in model.named_modules():
        if not name:
            continue

        def pre(mod, args, name=name):
            call = _Call(name, next(counter), in_shape=shape_of(args[0]) if args else None)
            calls.append(call)
            open_calls.setdefault(id(mod), []).append(call)

        def post(mod, args, output):
            call = open_calls[id(mod)].pop()
            call.end, call.out_shape = next(counter), shape_of(output)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        for h in handles:
            h.remove()
    return calls, output


def _probe_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy on the meta device (shapes only); the caller's model is untouched."""
    return copy.deepcopy(model).to("meta").eval()


def _run_probe(model: nn.Module, what: str) -> tuple[list[_Call], object, int]:
    probe, first_error = _probe_copy(model), None
    for size in PROBE_SIZES:
        try:
            return (*_record(probe, torch.zeros(2, 3, size, size, device="meta")), size)
        except Exception as exc:  # an op without a meta kernel, or a network that wants another size
            first_error = first_error or exc
    try:  # a real copy, still without grad, on the first size
        size = PROBE_SIZES[0]
        return (*_record(copy.deepcopy(model).cpu().float().eval(), torch.zeros(2, 3, size, size)), size)
    except Exception:
        raise TeskdError(f"cannot probe the stages of {what}: its forward failed on a {PROBE_SIZES[0]}x"
                         f"{PROBE_SIZES[0]} image ({type(first_error).__name__}: {first_error})") from first_error


def probe_stages(model: nn.Module, what: str) -> tuple[StageTap, ...]:
    """The four stage taps of ``model`` (see the module docstring); ``what`` names it in errors."""
    calls, output, probe_size = _run_probe(model, what)
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise TeskdError(f"{what} must return a (batch, classes) logits tensor in eval mode, "
                         f"got {type(output).__name__}{'' if not isinstance(output, torch.Tensor) else tuple(output.shape)}")
    once = Counter(c.name for c in calls)
    calls = [c for c in calls if once[c.name] == 1]
    levels = sorted({r for c in calls if (r := _reduction(c.out_shape, probe_size)) is not None})
    if len(levels) < 4:
        found = f"only at reductions {levels}" if levels else "none that divides the probe evenly"
        raise TeskdError(f"cannot split {what} into 4 stages: of its modules' square feature maps it returns "
                         f"{found} (TESKD needs a CNN whose maps shrink at least 4 times, e.g. strides 4, 8, "
                         f"16, 32)")
    deepest = levels[-4:]
    taps: list[StageTap] = []
    for r, r_next in zip(deepest[:-1], deepest[1:]):
        down = [c for c in calls if _reduction(c.in_shape, probe_size) == r
                and _reduction(c.out_shape, probe_size) == r_next]
        if not down:
            raise TeskdError(f"cannot split {what} into 4 stages: no module takes its stride-{r} map to stride "
                             f"{r_next} (the maps are not one chain of stages)")
        first = min(down, key=lambda c: c.start)
        taps.append(StageTap(first.name, "input", first.in_shape[1], r))
    last = deepest[-1]
    pools = [c for c in calls if _reduction(c.in_shape, probe_size) == last
             and _reduction(c.out_shape, probe_size) != last]
    if pools:
        pool = max(pools, key=lambda c: c.start)
        taps.append(StageTap(pool.name, "input", pool.in_shape[1], last))
    else:
        final = max((c for c in calls if _reduction(c.out_shape, probe_size) == last), key=lambda c: c.end)
        taps.append(StageTap(final.name, "output", final.out_shape[1], last))
    return tuple(taps)
