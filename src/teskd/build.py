"""From a config to the model that trains: backbone + method, and the one function every caller uses to
get it ready to run (training, evaluation, ``teskd info``, ``teskd bench``, ``teskd import-official``)."""

from __future__ import annotations

import torch

from teskd.config import Config
from teskd.engine import distributed, runtime
from teskd.engine.checkpoint import build_with_weights
from teskd.errors import TeskdError
from teskd.log import log
from teskd.data.pipeline import input_size
from teskd.methods import Method, build_method
from teskd.models import build_backbone
from teskd.models.pretrained import load_pretrained


def build_model(cfg: Config, num_classes: int, pretrained: bool = False) -> Method:
    """The method module of ``cfg`` (backbone inside), sized for ``cfg.data.dataset``'s images.

    ``pretrained``: start the backbone from ``model.pretrained`` (training does; evaluation and
    inspection load their weights from a checkpoint, so they do not read that file).
    """
    backbone = build_backbone(cfg.model.arch, num_classes, cfg.model.width_mult)
    if pretrained and cfg.model.pretrained and next(backbone.parameters()).device.type != "meta":
        skipped = load_pretrained(backbone, cfg.model.pretrained)
        if skipped:
            log.warning(f"model.pretrained: {len(skipped)} head tensor(s) of another shape keep their fresh "
                        f"initialisation ({', '.join(skipped)})")
    size = input_size(cfg.data)
    try:
        return build_method(cfg.method.name, backbone, num_classes, cfg.method, size)
    except ValueError as exc:  # e.g. students that cannot be built for such small feature maps
        raise TeskdError(f"cannot build {cfg.method.name} on {cfg.model.arch} for {size}px images: {exc}") from exc


def assemble_model(cfg: Config, num_classes: int, place: runtime.Placement | None = None, *,
                   pretrained: bool = False, weights: dict | None = None, mismatch: str = "",
                   train_samples: int | None = None, world: int = 1,
                   distributed_ok: bool = False) -> tuple[Method, torch.nn.Module]:
    """``(method, model)`` of ``cfg``: built, given ``weights`` (checked against the network first: a
    ``mismatch`` error names what did not fit), told its training set (``train_samples`` over ``world``
    processes), then placed as ``place`` says (``model``: what the loops call; see
    :func:`teskd.engine.runtime.prepare_model`). Without ``place`` both are the unplaced method.
    ``distributed_ok``: wrap for several processes (and ``train.sync_bn``), as training does."""
    def build() -> Method:
        return build_model(cfg, num_classes, pretrained=pretrained)

    method = build() if weights is None else build_with_weights(build, weights, mismatch)
    if train_samples is not None:
        method.setup_data(train_samples, world)
    if place is None:
        return method, method
    if distributed_ok and cfg.train.sync_bn and distributed.world_size() > 1:
        if place.device.type != "cuda":
            raise TeskdError("train.sync_bn=true needs GPUs (NCCL); on CPUs each process keeps its own "
                             "BatchNorm statistics")
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    return runtime.prepare_model(method, cfg.train, place.device, distributed_ok=distributed_ok)
