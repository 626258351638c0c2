"""Deep mutual learning (Zhang et al., 2018; YingZhangDUT/Deep-Mutual-Learning) with two peers.

The backbone is peer 1 (branch ``peer1``, the deployed network); peer 2 (branch ``peer2``) is a
second network, by default of the same architecture and width, starting from different random
weights. Each peer k learns from the labels and from the other peer's prediction (T = 1):

    L_k = CE(z_k) + KL(sg softmax(z_other) || softmax(z_k))      (summed over classes, batch mean)

The total loss is L_1 + L_2, from one forward of both peers on the batch, with one backward and one
optimizer step. That equals updating the peers in turn from that same forward: every KL target is
detached, so L_1 depends on peer 1's parameters only and L_2 on peer 2's only, the gradient of
L_1 + L_2 with respect to each peer is that peer's own gradient, and SGD (momentum and weight decay
included) acts on each parameter separately.

What the official TensorFlow loop (``train_models.py``) does differently: it runs one session step
per peer in turn, and each step re-runs the graph, so peer 2 learns from peer 1's prediction *after*
peer 1's update (and, as each run dequeues its own input batch, on the next batch). Its KL is
``sum p_j log(1e-8 + p_j / (p_i + 1e-8))``; the exact KL is used here. Its optimizer for peer i only
touches peer i's variables, which is what detaching the target does here.

Peer 2's weights: from ``build_backbone(peer_arch, ..., peer_width_mult)`` when either is set. With both
unset (same architecture and width) and a backbone that does not record its registry name (attributes
``arch`` and ``width_mult``), peer 2 is a deep copy of the backbone re-initialised from the global RNG
(every module's ``reset_parameters``, then the family's ``weight_init``); it is drawn after the
backbone, so the two start from different weights, both fixed by ``train.seed``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from teskd.config import MethodParams
from teskd.losses import soft_kl
from teskd.errors import TeskdError
from teskd.methods.base import Method, StepOutput, register_method
from teskd.models.backbones.base import Backbone


@dataclass
class DMLParams(MethodParams):
    name: str = "dml"
    peer_arch: str | None = None  # peer 2's architecture; None: the backbone's (model.arch)
    peer_width_mult: float | None = None  # peer 2's width; None: the backbone's (model.width_mult)

    def validate(self) -> None:
        if self.peer_width_mult is not None and not self.peer_width_mult > 0:
            raise TeskdError(f"method.peer_width_mult must be > 0 (or null for the model's), got "
                             f"{self.peer_width_mult}")
        if self.peer_arch is not None:
            from teskd.models.registry import BACKBONES, is_known_arch

            if not is_known_arch(self.peer_arch):
                raise TeskdError(f"method.peer_arch: unknown architecture {self.peer_arch!r}; known: "
                                 f"{', '.join(BACKBONES.names())}, or tv:NAME / timm:NAME")


def reinitialise(module: nn.Module, weight_init=None) -> None:
    """Fresh random weights from the global RNG: every submodule's ``reset_parameters`` (PyTorch's default
    initialisation, BN statistics reset too), then the family's own ``weight_init`` if it has one."""
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats") and callable(m.reset_running_stats):
            m.reset_running_stats()
    if weight_init is not None:
        weight_init(module)


def build_peer(backbone: nn.Module, num_classes: int, arch: str | None, width: float | None) -> nn.Module:
    """Peer 2: a new network from the registry, or (same architecture and width, when the backbone does not
    record its registry name) a deep copy of the backbone with fresh random weights."""
    from teskd.models import build_backbone

    # a Backbone knows the registry name and width that built it; any other network is copied
    own_arch, own_width = (backbone.arch, backbone.width_mult) if isinstance(backbone, Backbone) else (None, None)
    if arch is None and width is None and own_arch is None:
        peer = copy.deepcopy(backbone)
        reinitialise(peer, type(backbone).weight_init if hasattr(type(backbone), "weight_init") else None)
        return peer
    arch = arch if arch is not None else own_arch
    width = width if width is not None else own_width
    if arch is None:
        raise TeskdError("method.peer_width_mult needs method.peer_arch too (the backbone does not say its "
                         "architecture name): set method.peer_arch to model.arch")
    if width is None:
        raise TeskdError("method.peer_arch needs method.peer_width_mult too (the backbone does not say its "
                         "width): set method.peer_width_mult, e.g. to model.width_mult")
    return build_backbone(arch, num_classes, width)


@register_method
class DML(Method):
    name = "dml"
    params_class = DMLParams
    deploy_branch = "peer1"

    def __init__(self, backbone, num_classes: int, params: DMLParams, input_size: int = 32):
        super().__init__(backbone, num_classes, params, input_size)
        # built after the backbone, so it draws later numbers of the RNG: different initial weights
        self.peer2 = build_peer(backbone, num_classes, params.peer_arch, params.peer_width_mult)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        z1 = self.backbone(images)
        z2 = self.peer2(images)
        ce = F.cross_entropy(z1.float(), labels) + F.cross_entropy(z2.float(), labels)
        kl = soft_kl(z1, z2) + soft_kl(z2, z1)
        return StepOutput(loss=ce + kl, parts={"ce": ce.detach(), "kl": kl.detach()},
                          logits={"peer1": z1, "peer2": z2})

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"peer1": self.backbone(images), "peer2": self.peer2(images)}
