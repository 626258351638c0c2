"""The method contract: the module that trains.

A method is an ``nn.Module`` whose ``forward`` does all trainable work, so
``DistributedDataParallel(method)`` and ``torch.compile(method)`` wrap it like any module:

* training mode: ``method(images, labels, index)`` returns a :class:`StepOutput` (the loss,
  its named parts, and every branch's logits);
* eval mode: ``method(images)`` returns ``{branch: scores}``; ``deploy_branch`` names the
  branch that ships and ``deploy_module`` is that network alone. The branch is named for its role:
  ``teacher`` where it teaches the other branches (TESKD, BYOT), ``student`` where a separate teacher
  teaches it (KD), the role the method's paper gives it among peers (DML ``peer1``, ONE ``branch1``,
  OKDDip ``leader``, FRSKD ``classifier``), and ``deployed`` (the default) for a single network (CE,
  label smoothing, CS-KD, PS-KD) or one whose branches teach each other alike (DKS). Runs written
  before this naming call it ``teacher`` whatever the method (:func:`teskd.runfiles.deployed_key`).

A method also says what the optimizer sees (:meth:`param_groups`; frozen modules stay out
of it and in eval mode) and may replace the default training step, one backward and one
optimizer step (:meth:`training_step`), e.g. to step two peer networks in turn.

Hooks for methods that depend on training progress or on the data: :meth:`setup_data` (the
training-set size, once, before a checkpoint is loaded), :meth:`on_epoch_start` (the epoch, for
loss-weight ramps), :meth:`training_state_dict` / :meth:`load_training_state` (state that is not
part of the network, e.g. PS-KD's per-sample predictions, saved in checkpoints and restored on
resume) and ``batch_pairing`` (CS-KD: each training batch followed by a same-class partner per
sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from teskd.config import MethodParams
from teskd.registry import METHODS


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to backpropagate
    parts: dict[str, torch.Tensor]  # named, weighted loss terms (for logs); they sum to ``loss``
    logits: dict[str, torch.Tensor]  # per branch
    # the labels the logits are scored against; None: the batch's labels (a method that scores only
    # part of the batch, such as CS-KD's first half, passes that part's labels)
    labels: torch.Tensor | None = None


class Method(nn.Module):
    """Subclasses implement ``forward_train`` and ``forward_eval``; callers use ``forward`` (``method(...)``)."""

    name: ClassVar[str]
    params_class: ClassVar[type[MethodParams]]
    deploy_branch: ClassVar[str] = "deployed"
    # "same_class": the training loader yields 2B images per batch, sample i followed (at i + B) by a
    # random training sample of the same class (possibly itself), as CS-KD's pair sampler does
    batch_pairing: ClassVar[str | None] = None

    def __init__(self, backbone: nn.Module, num_classes: int, params: MethodParams, input_size: int = 32):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.params = params
        self.input_size = input_size  # the training image size (helpers sized from feature maps need it)
        self.epoch, self.epochs = 0, 1  # set by on_epoch_start (0-based current epoch, total epochs)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> StepOutput | dict[str, torch.Tensor]:
        if self.training:
            if labels is None:
                raise ValueError(f"{type(self).__name__} in training mode needs labels")
            return self.forward_train(images, labels, index)
        return self.forward_eval(images)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor,
                      index: torch.Tensor | None = None) -> StepOutput:
        raise NotImplementedError

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores per branch (argmax = prediction); must include ``deploy_branch``."""
        raise NotImplementedError

    @property
    def deploy_module(self) -> nn.Module:
        """The network that ships: the plain backbone, helpers dropped."""
        return self.backbone

    # --- hooks the trainer calls ----------------------------------------------------------------

    def setup_data(self, num_train_samples: int, world_size: int = 1) -> None:
        """Called once with the training set's size (all ranks together), before any checkpoint is loaded."""

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called before each training epoch (also the first one after a resume); ``epoch`` is 0-based."""
        self.epoch, self.epochs = int(epoch), int(epochs)

    def training_state_dict(self) -> dict[str, Any]:
        """State outside the network that training needs to continue (tensors/numbers); saved in checkpoints."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`training_state_dict` on resume (an empty dict for checkpoints without one)."""

    # --- what trains ----------------------------------------------------------------------------

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that never train (e.g. a pretrained teacher in classic KD): no optimizer, eval mode."""
        return []

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups; by default every parameter outside the frozen modules."""
        frozen = {id(p) for m in self.frozen_modules() for p in m.parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in frozen and p.requires_grad]}]

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def training_step(self, model: nn.Module, batch, opt) -> StepOutput:
        """One optimisation step on ``batch``. ``model`` is this method or its DDP/compiled wrapper: call it
        (not ``self``) so that gradients are synchronised. ``opt`` is an :class:`~teskd.engine.step.Optimization`."""
        with opt.autocast():
            out = model(batch[0], batch[1], batch[2] if len(batch) > 2 else None)
        opt.zero_grad()
        opt.backward(out.loss)
        opt.step()
        return out


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method.name=<cls.name>`` (with its ``params_class``)."""
    return METHODS.register(cls.name)(cls)
