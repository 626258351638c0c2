"""Running sums of one training epoch: kept on the device, exact to snapshot and restore, reducible over ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from teskd.engine import distributed


@dataclass
class EpochProgress:
    """How far an epoch got (saved in mid-epoch checkpoints as plain numbers)."""

    epoch: int
    step: int = 0  # batches done
    batch_size: int = 0  # global (all ranks)
    world_size: int = 1
    seen: int = 0  # samples done (all ranks: a snapshot holds the epoch's global sums)
    seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)  # sample-weighted loss terms
    correct: dict[str, int] = field(default_factory=dict)  # per branch
    # batches in the epoch (0: unknown, checkpoints written before it was recorded): lets eval, export and
    # predict say "batch 5 of 40" of a checkpoint without loading the data
    steps: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "EpochProgress":
        return cls(**{k: d[k] for k in ("epoch", "step", "seen", "seconds", "sums", "correct") if k in d},
                   batch_size=int(d.get("batch_size", 0)), world_size=int(d.get("world_size", 1)),
                   steps=int(d.get("steps", 0)))


class EpochMeters:
    """Sums of the loss parts (float64) and correct predictions per branch, on ``device``.

    Values are read only at sync points (``snapshot``, ``record``), so a GPU is not made to
    wait for the host at every step.
    """

    def __init__(self, device: torch.device, start: EpochProgress):
        self.device = device
        # a resumed epoch's sums are global (see snapshot): the primary rank carries them, the others start from
        # zero with the same names, so the epoch's all-reduce counts them once
        keep = distributed.is_primary()
        self.start_seen = start.seen if keep else 0
        self.seen = self.start_seen
        f64 = dict(dtype=torch.float64, device=device)
        self.sums = {k: torch.tensor(v if keep else 0.0, **f64) for k, v in start.sums.items()}
        self.correct = {k: torch.tensor(v if keep else 0, dtype=torch.long, device=device)
                        for k, v in start.correct.items()}

    @torch.no_grad()
    def update(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], logits: dict[str, torch.Tensor],
               labels: torch.Tensor) -> None:
        n = labels.shape[0]
        self.seen += n
        for name, value in {"loss": loss, **parts}.items():
            self.sums[name] = self.sums.get(name, 0) + value.double() * n
        for name, scores in logits.items():
            self.correct[name] = self.correct.get(name, 0) + (scores.argmax(1) == labels).sum()

    def snapshot(self, progress: EpochProgress) -> EpochProgress:
        """The epoch so far, summed over every rank (a collective: all ranks call it at the same step), so a
        mid-epoch checkpoint written by the primary rank holds the whole epoch's sums, not its own."""
        sums, correct, seen = self._reduced()
        progress.seen = int(seen)
        progress.sums = sums
        progress.correct = {k: int(round(v)) for k, v in correct.items()}
        return progress

    def new_samples(self) -> int:
        """Samples this rank trained since the meters started (a resumed epoch's earlier ones excluded)."""
        return self.seen - self.start_seen

    def _reduced(self) -> tuple[dict[str, float], dict[str, float], float]:
        names, correct_names = sorted(self.sums), sorted(self.correct)
        parts = [torch.stack([self.sums[k] for k in names]).double()] if names else []
        parts += [torch.stack([self.correct[k] for k in correct_names]).double()] if correct_names else []
        packed = torch.cat(parts + [torch.tensor([float(self.seen)], dtype=torch.float64, device=self.device)])
        packed = distributed.all_reduce_sum(packed).tolist()
        return (dict(zip(names, packed[: len(names)])), dict(zip(correct_names, packed[len(names):-1])),
                packed[-1])

    def record(self) -> dict:
        """Epoch means over all ranks: ``train_loss``, ``loss_<part>``, ``train_acc`` (per branch, %)."""
        sums, correct, seen = self._reduced()
        record = {"train_loss": sums.pop("loss") / seen}
        record.update({f"loss_{k}": v / seen for k, v in sums.items()})
        record["train_acc"] = {k: 100.0 * c / seen for k, c in correct.items()}
        return record
