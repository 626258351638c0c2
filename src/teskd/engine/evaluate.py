"""Top-1/top-5 accuracy of every branch a method exposes (summed over ranks when there are several)."""

from __future__ import annotations

import torch

from teskd.engine import distributed
from teskd.engine.metrics import progress_interval, topk_correct
from teskd.engine.runtime import autocast
from teskd.errors import TeskdError


@torch.no_grad()
def evaluate(model, loader, device: torch.device, amp_dtype=None, channels_last: bool = False,
             progress: bool = False, desc: str = "eval") -> dict[str, dict[str, float]]:
    """Returns ``{branch: {"top1": %, "top5": %}}`` over the whole loader. ``model`` is a method (or its
    wrapper): in eval mode, ``model(images)`` gives per-branch scores."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    correct: dict[str, torch.Tensor] = {}
    total = 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True,
                      mininterval=progress_interval()):
        images, labels = batch[0], batch[1]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            scores = model(images)
        for name, s in scores.items():
            s = s.float()
            bad = int((~torch.isfinite(s).all(dim=1)).sum())  # NaN/inf logits rank arbitrarily: not an accuracy
            correct[name] = correct.get(name, 0) + torch.tensor(topk_correct(s, labels, (1, 5)) + [bad])
        total += labels.shape[0]
    model.train(was_training)
    names = list(correct)  # the method's branch order (the same on every rank)
    packed = distributed.all_reduce_sum(torch.stack([correct[k] for k in names] + [torch.tensor([total, 0, 0])])
                                        .to(device)).tolist()
    total = packed[-1][0]
    broken = {name: c[2] for name, c in zip(names, packed) if c[2]}
    if broken:  # every rank sees the same sums, so every rank raises
        shown = ", ".join(f"{name}: {n} of {total} images" for name, n in broken.items())
        raise NonFiniteEvaluation(f"the evaluation gave non-finite (NaN or infinite) logits ({shown}): the "
                                  f"network has diverged (e.g. BatchNorm running statistics blown up), so its "
                                  f"accuracy is meaningless")
    return {name: {"top1": 100.0 * c[0] / total, "top5": 100.0 * c[1] / total} for name, c in zip(names, packed)}


class NonFiniteEvaluation(TeskdError):
    """Some branch produced NaN or infinite logits on the evaluation data."""
