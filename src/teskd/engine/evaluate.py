"""Top-1/top-5 accuracy of every branch a method exposes."""

from __future__ import annotations

from collections import defaultdict

import torch

from teskd.engine.metrics import progress_interval, topk_correct
from teskd.engine.runtime import autocast


@torch.no_grad()
def evaluate(method, loader, device: torch.device, amp_dtype=None, channels_last: bool = False,
             progress: bool = False, desc: str = "eval") -> dict[str, dict[str, float]]:
    """Returns ``{branch: {"top1": %, "top5": %}}`` over the whole loader."""
    from tqdm import tqdm

    was_training = method.training
    method.eval()
    correct = defaultdict(lambda: torch.zeros(2, dtype=torch.long))
    total = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True,
                               mininterval=progress_interval()):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            scores = method.forward_eval(images)
        for name, s in scores.items():
            correct[name] += torch.tensor(topk_correct(s.float(), labels, (1, 5)))
        total += labels.shape[0]
    method.train(was_training)
    return {name: {"top1": 100.0 * int(c[0]) / total, "top5": 100.0 * int(c[1]) / total}
            for name, c in correct.items()}
