"""Device, precision, seeding and the process-wide torch switches, applied for a scope and then restored."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from teskd.config import TrainConfig
from teskd.errors import TeskdError


@dataclass(frozen=True)
class Placement:
    """Where and in what precision a configured model runs: resolved once from ``train.*``."""

    device: torch.device
    amp_dtype: torch.dtype | None  # training's autocast dtype; None: float32
    eval_amp_dtype: torch.dtype | None  # evaluation's; None: float32 (unless train.eval_amp)


def placement(cfg: TrainConfig, training: bool = True) -> Placement:
    """``train.device``, ``train.amp`` and ``train.eval_amp`` resolved for this process. ``training=False``
    (evaluation only) leaves ``train.amp`` alone: a GPU run's bf16 setting does not stop a CPU evaluation."""
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device) if training else None
    return Placement(device, amp, resolve_eval_amp(cfg, device))


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """``auto``: a GPU when there is one (with several processes, this process's ``cuda:LOCAL_RANK``). ``setting``:
    the option the user gave it with, named in errors (``--device`` for ``teskd predict``)."""
    from teskd.engine import distributed

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.active():
        name = f"cuda:{distributed.local_rank()}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        eq = " " if setting.startswith("-") else "="  # `--device cuda`, `train.device=cuda`
        raise TeskdError(f"{setting}{eq}{name} but no CUDA GPU is available (use {setting}{eq}cpu or auto)")
    return device


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full float32."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda":
        raise TeskdError(f"train.amp={mode} needs a CUDA device (this run uses {device}); use train.amp=off")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def resolve_eval_amp(train_cfg, device: torch.device) -> torch.dtype | None:
    """Evaluation's autocast dtype: None (float32, as the official code evaluates) unless ``train.eval_amp``,
    then ``train.amp``'s."""
    return resolve_amp(train_cfg.amp, device) if train_cfg.eval_amp else None


def precision_name(dtype: torch.dtype | None) -> str:
    """``float32``, or e.g. ``bfloat16 autocast``: what summaries and eval results record."""
    return "float32" if dtype is None else f"{str(dtype).replace('torch.', '')} autocast"


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def settings(cfg: TrainConfig, device: torch.device):
    """Apply threads, determinism and cuDNN/TF32 switches (and use the RNGs) inside the block only.

    Everything process-wide that the block may change is put back afterwards, so creating and
    running a Trainer in a notebook or a test leaves the host process as it was.
    """
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"), rng_state())
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        threads, det, warn_only, bench, tf32_mm, tf32_cudnn, cublas, rng = saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.benchmark = bench
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_mm, tf32_cudnn
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        set_rng_state(rng)


def prepare_model(method, cfg: TrainConfig, device: torch.device, distributed_ok: bool = False):
    """Move to the device and set the memory format; returns ``(method, model)``.

    ``model`` is what the engine calls: the method itself, or wrappers of it (DistributedDataParallel
    when several processes train it and ``distributed_ok``, then ``torch.compile``); the method, its
    parameters and its state dict are untouched by wrapping.
    """
    from teskd.engine import distributed

    method.to(device)
    if cfg.channels_last and device.type == "cpu" and _crashes_cpu_channels_last(method):
        _keep_nchw(method)
    elif cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    model = method
    if distributed_ok and distributed.active():
        from torch.nn.parallel import DistributedDataParallel

        # DDP makes its gradient buckets with the parameters' strides as they are when it is built: the memory
        # format is set first (above; converting after would leave every bucket in the old layout), and gradients
        # that differ from their parameter only in a size-1 dimension's stride are given the parameter's
        match_gradient_strides(method)
        model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return method, model



def match_gradient_strides(method: torch.nn.Module) -> int:
    """Make the gradient of each parameter with a size-1 dimension (a 1x1 kernel [O, I, 1, 1], a depthwise kernel
    [C, 1, k, k]) arrive with its parameter's exact strides; returns how many parameters are concerned.

    DDP copies each gradient into a bucket view made with its parameter's strides, and warns "Grad strides do not
    match bucket view strides ... may impair performance" when they differ. A size-1 dimension's stride addresses
    nothing, and autograd's layout contract ignores it: it keeps whatever strides the backward produced there
    (the CPU's, for a 1x1 convolution on 1x1 features, the NCHW ones where ``.to(memory_format=channels_last)``
    gave the parameter NHWC ones). A hook on the parameter re-labels such a gradient with the parameter's strides:
    a view of the same bytes (no copy), so DDP's copy into its bucket is a plain one and it has nothing to warn
    about. Any other difference is left alone: autograd then lays the gradient out like its parameter itself."""
    count = 0
    for p in method.parameters():
        if p.requires_grad and p.dim() >= 2 and 1 in p.shape:
            p.register_hook(_with_strides(tuple(p.shape), p.stride()))
            count += 1
    return count


def _with_strides(shape: tuple[int, ...], strides: tuple[int, ...]):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if grad.stride() == strides or grad.shape != shape or not _dense(grad):
            return grad
        if any(n != 1 and a != b for n, a, b in zip(shape, grad.stride(), strides)):
            return grad  # really another layout: not ours to relabel
        return grad.as_strided(shape, strides)  # the same elements at the same addresses

    return hook


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its storage span without gaps or overlaps (whatever the order of its dims)."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _crashes_cpu_channels_last(module: torch.nn.Module) -> bool:
    """Whether ``module`` has a 1x1 strided convolution with fewer than 8 input channels.

    torch 2.14.1's CPU kernels corrupt the heap (segfault, "double free or corruption") in the backward of
    such a convolution in channels_last (seen on an AVX2 machine: the shortcut of a ResNet-18 at width 1/16,
    4 -> 8 channels, stride 2). Such networks (tiny widths) train in NCHW on the CPU: the same function."""
    return any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
               and m.in_channels < 8 for m in module.modules())


def _keep_nchw(method: torch.nn.Module) -> None:
    if not getattr(method, "_teskd_nchw", False):
        method.register_forward_pre_hook(_contiguous_input)  # the loops hand it channels_last images
        method._teskd_nchw = True  # training says so in its log (keeps_nchw); eval and --json outputs stay as they are


def keeps_nchw(method: torch.nn.Module) -> bool:
    """Whether :func:`prepare_model` left ``method`` in NCHW although channels_last was asked for (see above)."""
    return bool(getattr(method, "_teskd_nchw", False))


NCHW_NOTE = ("note: train.channels_last is not used for this network on the CPU (torch 2.14's channels_last kernels "
             "crash on its 1x1 strided convolutions with < 8 input channels); it trains in NCHW")


def _contiguous_input(module, args):
    return (args[0].contiguous(),) + tuple(args[1:]) if args and isinstance(args[0], torch.Tensor) else None
