"""The optimizer side of a training step, shared by the trainer and the benchmark so both time the same work."""

from __future__ import annotations

import torch

from teskd.config import OptimConfig
from teskd.engine import runtime


def make_optimizer(method, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD as in the paper's recipe (Nesterov momentum, weight decay) over the method's parameter groups."""
    return torch.optim.SGD(method.param_groups(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


class Optimization:
    """What a method's ``training_step`` uses: autocast, zero_grad, (scaled) backward, optimizer step.

    A method that steps twice per batch calls ``zero_grad``/``backward``/``step`` twice.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, amp_dtype: torch.dtype | None):
        self.optimizer = optimizer
        self.device = device
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def autocast(self):
        return runtime.autocast(self.device, self.amp_dtype)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
