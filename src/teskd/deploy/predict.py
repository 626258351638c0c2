"""``teskd predict``: class probabilities for image files, with the preprocessing the network was trained with."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from teskd.data.decode import IMAGE_SUFFIXES
from teskd.deploy.preprocess import Preprocess, read_image
from teskd.deploy.source import Deployed
from teskd.errors import TeskdError, printable


@dataclass
class Predictions:
    results: list[dict] = field(default_factory=list)  # {"file", "top": [{"label", "class", "prob"}]}
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def find_images(targets: Sequence[Path | str]) -> list[Path]:
    """Files as given (any suffix: the decoder decides), folders searched recursively for image suffixes,
    in sorted order. A missing path is an error before any work."""
    files: list[Path] = []
    for target in map(Path, targets):
        if target.is_dir():
            found = sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise TeskdError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {target}")
            files += found
        elif target.is_file():
            files.append(target)
        else:
            raise TeskdError(f"no such image or folder: {target}")
    return files


def _batches(files: list[Path], preprocess: Preprocess, size: int, skipped: list) -> Iterator[tuple[list, torch.Tensor]]:
    names, images = [], []
    for path in files:
        try:
            images.append(preprocess(read_image(path)))
            names.append(str(path))
        except TeskdError as exc:
            skipped.append((str(path), str(exc).removeprefix(f"cannot read image {path}: ")))
        if len(images) == size:
            yield names, torch.stack(images)
            names, images = [], []
    if images:
        yield names, torch.stack(images)


@torch.no_grad()
def predict(deployed: Deployed, targets: Sequence[Path | str], topk: int = 5, batch_size: int = 64,
            device: str | torch.device = "cpu", progress: bool = True) -> Predictions:
    """Top-``topk`` classes with softmax probabilities for every readable image; unreadable ones are skipped
    (listed in ``skipped`` with the reason)."""
    from tqdm import tqdm

    if topk < 1 or batch_size < 1:
        raise TeskdError(f"--topk and --batch-size must be >= 1, got {topk} and {batch_size}")
    files = find_images(targets)
    info, model = deployed.info, deployed.model.eval()
    device = torch.device(device)
    movable = deployed.movable  # compiled exports run where they were built: the CPU
    if movable:
        model = model.to(device)
    k = min(topk, info.num_classes)
    out = Predictions()
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress or len(files) <= batch_size,
               leave=False, dynamic_ncols=True)
    for names, images in _batches(files, Preprocess(info), batch_size, out.skipped):
        logits = model(images.to(device) if movable else images).float().cpu()
        probs, labels = logits.softmax(dim=1).topk(k, dim=1)
        for name, p, c in zip(names, probs.tolist(), labels.tolist()):
            out.results.append({"file": name, "top": [{"label": label, "class": info.class_name(label), "prob": prob}
                                                      for label, prob in zip(c, p)]})
        bar.update(len(names))
    bar.close()
    return out


def format_predictions(pred: Predictions) -> str:
    """One line per image: the file, then ``class probability`` pairs, best first. File and class names come
    from strangers (an image's name, a model file's metadata): their control characters are escaped, so a
    name cannot forge lines or send escape sequences to the terminal (``--json`` keeps them as they are)."""
    if not pred.results:
        return ""
    files = [printable(r["file"]) for r in pred.results]
    width = min(max(map(len, files)), 60)
    return "\n".join(f"{f:<{width}}  " + "  ".join(f"{printable(t['class'])} {t['prob']:.3f}" for t in r["top"])
                     for f, r in zip(files, pred.results))


def format_skipped(pred: Predictions) -> list[str]:
    """One ``skipped FILE: why`` line per unreadable image, names escaped as in :func:`format_predictions`."""
    return [f"skipped {printable(path)}: {printable(why)}" for path, why in pred.skipped]
