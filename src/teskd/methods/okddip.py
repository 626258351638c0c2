"""OKDDip (Online Knowledge Distillation with Diverse Peers, Chen et al., AAAI 2020).

Official code: DefangChen/OKDDip-AAAI2020 (``models/model_cifar/resnet_GL.py`` / ``vgg_GL.py`` with
``en=False``, ``train_GL.py``, ``utils.py: KL_Loss``; ``--num_branches 4`` = 3 peers + 1 leader). On a
4-stage backbone the network branches before stage 4::

    t3 = stages 1-3 (shared, the backbone's own)
    peer j = 1..n ("peer<j>"): fresh copies of stage 4 + head; f_j = gap(stage4_j(t3)), z_j = head_j(f_j)
    leader ("leader", deployed): the backbone's own stage 4 + head, z_l

Attention (the official forward): one query and one key projection shared by the peers, both
``Linear(C, C // 8, bias=False)`` on the peer's pooled feature f_j (the head's input; C = the last
stage's channels)::

    q_j = W_q f_j,  k_j = W_k f_j,  a_ij = softmax_j(q_i . k_j)   (no 1/sqrt(d) scaling)
    target_i = sum_j a_ij z_j                                     (logits; j runs over all peers, i included)

Loss (``train_GL.py: train``), with T = 3, alpha = 1 and the ramp w of :func:`teskd.losses.sigmoid_ramp`::

    sum_j CE(z_j) + CE(z_l)
      + alpha * w(epoch) * [ sum_i KL_T(target_i || z_i) + KL_T(mean_j z_j || z_l) ]
    KL_T(t || z) = T^2 * KL(softmax(t / T) + 1e-7 || softmax(z / T)), summed over classes, batch mean

The leader's target is the mean of the peers' *logits*. As in the official code the targets are NOT
detached: the KL gradients reach the other peers, the attention projections and (through the
leader's term) every peer. Parts: ``ce``, ``kd`` (the weighted, ramped KL terms). Eval also reports
``peers_ensemble``, the mean of the peers' logits (the official ensemble accuracy).

Differences from the official code: its peers and leader are all separate copies of the last stage
on a 3-stage CIFAR ResNet; here the leader is the backbone's own stage 4 + head, so the deployed
network is the plain backbone. The copies are re-initialised (PyTorch defaults, then the backbone
family's ``weight_init``); the projections keep PyTorch's default Linear init, as in the official
ResNet code (its VGG code draws them from N(0, 0.01), like its other Linear layers).
The official code's 0-based epoch ramp is kept (w = exp(-5) in the first epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from teskd.config import MethodParams
from teskd.losses import kd_kl, sigmoid_ramp
from teskd.methods.base import Method, StepOutput, register_method
from teskd.methods.one import fresh_copy, last_stage_and_head, run_branch, shared_trunk


def peer_attention(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(B, n, d) queries and keys -> (B, n, n) weights a_ij = softmax_j(q_i . k_j)."""
    return F.softmax(torch.bmm(query, key.transpose(1, 2)), dim=-1)


def peer_targets(peers: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(B, n, K) peer logits, (B, n, d) queries and keys -> (B, n, K) targets ``sum_j a_ij z_j``."""
    return torch.bmm(peer_attention(query, key).to(peers.dtype), peers)


def okddip_loss(leader: torch.Tensor, peers: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                temperature: float, eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_j CE(z_j) + CE(z_l), sum_i KL_T(target_i || z_i) + KL_T(mean_j z_j || z_l))``, targets not
    detached; the caller weights the second by alpha and the ramp."""
    ce = F.cross_entropy(leader, labels)
    kd = leader.new_zeros((), dtype=torch.float32)
    for i in range(peers.shape[1]):
        ce = ce + F.cross_entropy(peers[:, i], labels)
        kd = kd + kd_kl(peers[:, i], targets[:, i], temperature, eps=eps)  # not detached (official)
    kd = kd + kd_kl(leader, peers.mean(dim=1), temperature, eps=eps)
    return ce, kd


@dataclass
class OkddipParams(MethodParams):
    name: str = "okddip"
    num_peers: int = 3  # the official --num_branches 4 = 3 peers + the leader
    temperature: float = 3.0
    alpha: float = 1.0
    ramp_epochs: float = 80.0  # R of the ramp w(epoch) (official --length 80); 0: w = 1
    kl_eps: float = 1e-7
    proj_factor: int = 8  # the projections map C -> max(1, C // proj_factor)

    def validate(self) -> None:
        self.require(positive=["temperature"], non_negative=["alpha", "ramp_epochs", "kl_eps"],
                     at_least={"num_peers": 1, "proj_factor": 1})


@register_method
class OKDDip(Method):
    name = "okddip"
    params_class = OkddipParams
    deploy_branch = "leader"

    def __init__(self, backbone, num_classes: int, params: OkddipParams, input_size: int = 32):
        super().__init__(backbone, num_classes, params, input_size)
        stage, head = last_stage_and_head(backbone)
        init = backbone.weight_init
        self.peer_stages = nn.ModuleList(fresh_copy(stage, init) for _ in range(params.num_peers))
        self.peer_heads = nn.ModuleList(fresh_copy(head, init) for _ in range(params.num_peers))
        channels = backbone.num_features
        dim = max(1, channels // params.proj_factor)
        self.query = nn.Linear(channels, dim, bias=False)
        self.key = nn.Linear(channels, dim, bias=False)  # PyTorch's default init (official ResNet code)
        self.register_buffer("kd_ramp", torch.tensor(sigmoid_ramp(0, params.ramp_epochs)), persistent=False)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self.kd_ramp.fill_(sigmoid_ramp(self.epoch, self.params.ramp_epochs))

    def peer_names(self) -> list[str]:
        return [f"peer{j}" for j in range(1, self.params.num_peers + 1)]

    def _branches(self, images: torch.Tensor):
        """Leader logits, peers' logits (B, n, K) and pooled features (B, n, C)."""
        t3 = shared_trunk(self.backbone, images)
        leader = self.backbone.forward_head(getattr(self.backbone, self.backbone.stage_info[-1].module)(t3))[0]
        outs = [run_branch(s, h, t3) for s, h in zip(self.peer_stages, self.peer_heads)]
        logits = torch.stack([z for z, _ in outs], dim=1)
        features = torch.stack([f for _, f in outs], dim=1)
        return leader, logits, features

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        p = self.params
        leader, peers, features = self._branches(images)
        targets = peer_targets(peers, self.query(features), self.key(features))
        ce, kd = okddip_loss(leader, peers, targets, labels, p.temperature, p.kl_eps)
        parts = {"ce": ce, "kd": p.alpha * self.kd_ramp * kd}
        loss = parts["ce"] + parts["kd"]
        logits = {"leader": leader, **dict(zip(self.peer_names(), peers.unbind(dim=1)))}
        return StepOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()}, logits=logits)

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        leader, peers, _ = self._branches(images)
        out = {"leader": leader, **dict(zip(self.peer_names(), peers.unbind(dim=1)))}
        if self.params.num_peers > 1:
            out["peers_ensemble"] = peers.mean(dim=1)
        return out
