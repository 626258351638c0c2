"""One optimisation step, shared by the trainer and the benchmark so both time the same work."""

from __future__ import annotations

import torch

from teskd.config import OptimConfig
from teskd.engine import runtime


def make_optimizer(method: torch.nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD as in the paper's recipe (Nesterov momentum, weight decay on every parameter)."""
    return torch.optim.SGD(method.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def train_step(method, optimizer, scaler, images, labels, device: torch.device, amp_dtype):
    """Forward under autocast, scaled backward, optimizer step; returns the method's StepOutput."""
    with runtime.autocast(device, amp_dtype):
        out = method.forward_train(images, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return out
