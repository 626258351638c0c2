"""Device, precision, seeding and determinism settings from the config."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from teskd.config import TrainConfig
from teskd.errors import TeskdError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TeskdError(f"train.device={name} but no CUDA GPU is available (use train.device=cpu or auto)")
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


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure(cfg: TrainConfig, device: torch.device) -> None:
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


def prepare_model(method, cfg: TrainConfig, device: torch.device):
    """Move to the device and apply the execution switches (channels_last, torch.compile).

    Compiling wraps ``forward_train``/``forward_eval`` on the instance; parameters and
    the state dict are untouched, so checkpoints are the same with or without it.
    """
    method.to(device)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    if cfg.compile:
        method.forward_train = torch.compile(method.forward_train)
        method.forward_eval = torch.compile(method.forward_eval)
    return method
