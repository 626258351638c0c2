"""ONE (On-the-fly Native Ensemble, Lan et al., NeurIPS 2018): branches sharing the low layers, gated into an ensemble.

Official code: Lan1991Xu/ONE_NeurIPS2018 (``models/cifar/resnet.py: ONE_ResNet``, ``cifar_one.py``,
``loss/kl_loss.py``). On a 4-stage backbone the network branches before stage 4::

    t3 = stages 1-3 (shared, the backbone's own)
    branch 1 ("branch1", deployed): the backbone's own stage 4 + head
    branch i = 2..m ("branch<i>"):  fresh copies of stage 4 + head (same structure, re-initialised)
    gate     = softmax(relu(bn1d(fc(gap(t3)))))           # (B, m); sees the pooled *input* of the
                                                          # branching point, as the official gate reads
                                                          # avgpool(layer2 output), the input of its
                                                          # branched layer3
    ensemble = sum_i gate_i * z_i                         # logits, mixed per sample

Loss (``cifar_one.py: train``), with T = 3 and the ramp w of :func:`teskd.losses.sigmoid_ramp`::

    sum_i CE(z_i) + CE(ensemble) + w(epoch) * sum_i T^2 KL(sg softmax(ensemble / T) + 1e-7 || softmax(z_i / T))

the KL summed over classes and averaged over the batch (the official ``KLLoss``: the target's
probabilities get +1e-7, not renormalised, and are detached). The gate learns only from CE(ensemble).
Parts: ``ce`` (all CE terms), ``kd`` (the ramped KL terms).

Differences from the official code: its network is a 3-stage CIFAR ResNet whose m = 3 branches are all
separate copies of the last stage; here branch 1 *is* the backbone's stage 4 + head, so the deployed
network is the plain backbone (the official code reports branch and ensemble accuracies; the paper
deploys one branch). The copies are re-initialised with the backbone family's ``weight_init`` (after
PyTorch's defaults), so they start from weights different from branch 1's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from teskd.config import MethodParams
from teskd.errors import TeskdError
from teskd.losses import kd_kl, sigmoid_ramp
from teskd.methods._auxiliary import pooled
from teskd.methods.base import Method, StepOutput, register_method


def fresh_copy(module: nn.Module, init: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """A deep copy of ``module`` with new weights: every submodule's ``reset_parameters`` (PyTorch's
    defaults, BN statistics included), then ``init`` (a backbone family's ``weight_init``) if given."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    if init is not None:
        init(clone)
    return clone


def last_stage_and_head(backbone: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The backbone's stage-4 module and its head module (the templates of the extra branches)."""
    if not backbone.splittable:
        raise TeskdError(f"{backbone.arch or type(backbone).__name__} runs as one library network, "
                         f"so its stage 4 and head cannot be copied into branches (ONE, OKDDip); use a method "
                         f"that reads stage maps (teskd, byot, dks, frskd) or plain ones (ce, kd, dml, ...)")
    return getattr(backbone, backbone.stage_info[-1].module), getattr(backbone, backbone.head_name)


def shared_trunk(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The stem and stages 1-3 of ``backbone``: the input of stage 4 (t3)."""
    x = backbone.forward_stem(images)
    for info in backbone.stage_info[:-1]:
        x = getattr(backbone, info.module)(x)
    return x


def run_branch(stage: nn.Module, head: nn.Module, t3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, pooled feature)`` of a stage-4 + head branch on t3 (as ``Backbone.forward_head``)."""
    feature = pooled(stage(t3))
    return head(feature), feature


def gated_ensemble(logits: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(B, m, K) branch logits and (B, m) gate weights -> (B, K) ``sum_i gate_i * z_i``."""
    return (logits * gate.unsqueeze(-1).to(logits.dtype)).sum(dim=1)


def one_loss(branch_logits: list[torch.Tensor], ensemble: torch.Tensor, labels: torch.Tensor,
             temperature: float, eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i CE(z_i) + CE(ensemble), sum_i T^2 KL(sg softmax(ensemble/T) + eps || softmax(z_i/T)))``;
    the caller weights the second by the ramp."""
    target = ensemble.detach()
    ce = F.cross_entropy(ensemble, labels)
    kd = ensemble.new_zeros((), dtype=torch.float32)
    for logits in branch_logits:
        ce = ce + F.cross_entropy(logits, labels)
        kd = kd + kd_kl(logits, target, temperature, eps=eps)
    return ce, kd


@dataclass
class OneParams(MethodParams):
    name: str = "one"
    num_branches: int = 3  # m, branch 1 being the backbone's own stage 4 + head
    temperature: float = 3.0
    ramp_epochs: float = 80.0  # R of the KL ramp w(epoch); 0: w = 1 throughout
    kl_eps: float = 1e-7  # added to the ensemble's softened probabilities (official)

    def validate(self) -> None:
        self.require(positive=["temperature"], non_negative=["ramp_epochs", "kl_eps"], at_least={"num_branches": 2})


@register_method
class ONE(Method):
    name = "one"
    params_class = OneParams
    deploy_branch = "branch1"  # the paper's branches are peers; the backbone's own is the first

    def __init__(self, backbone, num_classes: int, params: OneParams, input_size: int = 32):
        super().__init__(backbone, num_classes, params, input_size)
        stage, head = last_stage_and_head(backbone)
        init = backbone.weight_init
        extra = params.num_branches - 1
        self.branch_stages = nn.ModuleList(fresh_copy(stage, init) for _ in range(extra))
        self.branch_heads = nn.ModuleList(fresh_copy(head, init) for _ in range(extra))
        gate_in = backbone.stage_info[-2].channels
        self.gate = nn.Sequential(nn.Linear(gate_in, params.num_branches), nn.BatchNorm1d(params.num_branches))
        if init is not None:
            init(self.gate)
        # the ramp as a tensor, so a compiled forward does not recompile when it changes
        self.register_buffer("kd_ramp", torch.tensor(sigmoid_ramp(0, params.ramp_epochs)), persistent=False)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self.kd_ramp.fill_(sigmoid_ramp(self.epoch, self.params.ramp_epochs))

    def branch_names(self) -> list[str]:
        return [f"branch{i}" for i in range(1, self.params.num_branches + 1)]

    def _branches(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every branch's logits and the gated ensemble's logits."""
        t3 = shared_trunk(self.backbone, images)
        outs = [self.backbone.forward_head(getattr(self.backbone, self.backbone.stage_info[-1].module)(t3))[0]]
        outs += [run_branch(s, h, t3)[0] for s, h in zip(self.branch_stages, self.branch_heads)]
        gate = F.softmax(F.relu(self.gate(pooled(t3))), dim=1)  # (B, m)
        ensemble = gated_ensemble(torch.stack(outs, dim=1), gate)
        return dict(zip(self.branch_names(), outs)), ensemble

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        p = self.params
        branches, ensemble = self._branches(images)
        ce, kd = one_loss(list(branches.values()), ensemble, labels, p.temperature, p.kl_eps)
        parts = {"ce": ce, "kd": self.kd_ramp * kd}
        loss = parts["ce"] + parts["kd"]
        return StepOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()},
                          logits={**branches, "ensemble": ensemble})

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        branches, ensemble = self._branches(images)
        return {**branches, "ensemble": ensemble}
