"""The training loop: method-agnostic, resumable, rank-aware; writes a run directory
(layout: :mod:`teskd.engine.rundir`; checkpoints: :mod:`teskd.engine.checkpointer`).

The trainer is handed a run already assembled (:class:`RunParts`, built by :mod:`teskd.launch`) and
imports nothing above the engine: what a run does besides training and checkpointing is a
:class:`~teskd.engine.callbacks.Callback`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from teskd import fileio
from teskd.version import __version__
from teskd.config import Config, dotted, to_dict
from teskd.data.bundle import DataBundle
from teskd.engine import distributed, runtime
from teskd.engine.callbacks import Callback, RunEnd, RunStart
from teskd.engine.checkpoint import load_model_weights
from teskd.engine.checkpointer import Checkpointer
from teskd.engine.evaluate import NonFiniteEvaluation, evaluate
from teskd.engine.meters import EpochMeters, EpochProgress
from teskd.engine.metrics import MetricsLog, progress_interval
from teskd.engine.rundir import RunDir, RunLock
from teskd.engine.schedule import lr_factor
from teskd.engine.signals import Interrupted, stop_on_signals
from teskd.engine.step import Optimization
from teskd.engine.summary import RunTotals, summarise
from teskd.errors import TeskdError
from teskd.log import log


@dataclass
class RunParts:
    """Everything a run trains with, assembled before the trainer starts (see :func:`teskd.launch.assemble`)."""

    cfg: Config  # resolved (absolute paths): what config.yaml and the checkpoints record
    data: DataBundle  # the train/val/test loaders (the Loader protocol), num_classes, classes
    method: nn.Module  # the Method (its state dict is what checkpoints hold)
    model: nn.Module  # what the loop calls: the method or its DDP/compiled wrapper
    opt: Optimization
    place: runtime.Placement
    world: int  # processes training together
    image_size: int  # the training input size (the summary's cost per image)
    checkpoint_minutes: float  # train.checkpoint_minutes resolved for this dataset; 0: no timed saves
    rng: dict  # the RNG streams training continues from (taken right after building)


class Trainer:
    """Trains ``parts`` into ``run_dir``.

    ``resume``: continue the run from its newest verified checkpoint (a run killed before its
    first checkpoint starts again from the beginning, saying so). ``overwrite``: replace the
    previous run in ``run_dir`` (the caller has checked it is one); its files are removed only
    once this run holds the folder's lock. ``callbacks`` run on the primary rank, in order.
    Process-wide torch switches and RNGs are set only while the Trainer works, then restored.
    """

    def __init__(self, parts: RunParts, run_dir: Path, resume: bool = False, overwrite: bool = False,
                 callbacks: Sequence[Callback] = ()):
        self.parts, self.cfg, self.resume, self.overwrite = parts, parts.cfg, resume, overwrite
        self.callbacks = list(callbacks)
        self.rundir = RunDir(run_dir)
        self.run_dir = self.rundir.path
        self.data, self.method, self.model, self.opt = parts.data, parts.method, parts.model, parts.opt
        self.device, self.world, self._rng = parts.place.device, parts.world, parts.rng
        self.metrics = MetricsLog(self.rundir.metrics)
        self.ckpt_dir = self.rundir.checkpoints
        self.checkpointer = Checkpointer(self.rundir)
        self.start_epoch = 0  # number of epochs already completed
        self.resume_progress: EpochProgress | None = None  # mid-epoch position of a resumed checkpoint
        self.stop_signal: str | None = None  # set by SIGTERM/SIGINT: save and stop after this step
        self.best = {"epoch": 0, "score": -1.0}
        self.train_seconds = 0.0
        self.train_images = 0

    # --- state -----------------------------------------------------------------------------

    def state_dict(self, epoch: int, progress: EpochProgress | None = None) -> dict:
        """``epoch``: completed epochs; ``progress``: how far into the next one (mid-epoch saves)."""
        return {"model": self.method.state_dict(), "progress": progress.to_dict() if progress else None,
                **self.opt.state_dict(), "epoch": epoch, "best": dict(self.best),
                "train_seconds": self.train_seconds, "train_images": self.train_images,
                "rng": runtime.rng_state(), "method_state": self.method.training_state_dict(),
                "config": to_dict(self.cfg), "num_classes": self.data.num_classes,
                "classes": list(self.data.classes or []),
                "teskd_version": __version__}

    def load_state(self, state: dict) -> None:
        self._check_resumable(state)
        load_model_weights(self.method, state["model"], "checkpoint does not match the configured model")
        self.start_epoch = int(state["epoch"])
        progress = state.get("progress")
        self.resume_progress = EpochProgress.from_dict(progress) if progress else None
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.train_images = int(state.get("train_images", 0))
        if "optimizer" not in state:  # imported weights (teskd import-official): start training from them
            return
        try:
            self.opt.load_state_dict(state)
            self.best = dict(state["best"])
            runtime.set_rng_state(state["rng"])
            self.method.load_training_state(state.get("method_state") or {})
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise TeskdError(f"the checkpoint's optimizer or RNG state does not fit this run "
                             f"({' '.join(str(exc).split())[:200]}); is it from another teskd version?") from exc

    def _check_resumable(self, state: dict) -> None:
        """Refuse settings that cannot continue this checkpoint; say which settings changed."""
        done, epochs = int(state["epoch"]), self.cfg.train.epochs
        saved, found = state.get("classes") or [], self.data.classes or []
        if saved and found and saved != found:
            diff = next(i for i, (a, b) in enumerate(zip(saved + [None], found + [None])) if a != b)
            raise TeskdError(f"the checkpoint was trained on {len(saved)} classes that differ from the data's "
                             f"{len(found)} (class {diff}: {saved[diff] if diff < len(saved) else '-'!r} in the "
                             f"checkpoint, {found[diff] if diff < len(found) else '-'!r} in {self.cfg.data.root})")
        if "optimizer" in state and epochs < done:
            raise TeskdError(f"{self.run_dir} has finished {done} epochs; train.epochs={epochs} would discard "
                             f"finished epochs (resume keeps train.epochs >= {done}; start a new run for fewer)")
        old, progress = state["config"], state.get("progress")
        old_batch = old.get("data", {}).get("batch_size") if isinstance(old.get("data"), dict) else None
        if progress and old_batch is not None and old_batch != self.cfg.data.batch_size:
            raise TeskdError(f"the checkpoint stopped inside epoch {done + 1} after batch {progress['step']} "
                             f"of data.batch_size={old_batch}; resume with that batch size "
                             f"(it may change at an epoch boundary)")
        if progress and int(progress.get("world_size", 1)) != self.world:
            raise TeskdError(f"the checkpoint stopped inside epoch {done + 1} with {progress.get('world_size', 1)} "
                             f"processes; resume it with that many (the number may change at an epoch boundary)")
        changed = _changed_settings(old, to_dict(self.cfg))
        if changed and "optimizer" in state:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:8])
            more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
            log.info(f"resuming with changed settings: {shown}{more}")

    # --- loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        lock = RunLock(self.rundir) if distributed.is_primary() else contextlib.nullcontext()
        with lock, runtime.settings(self.cfg.train, self.device), stop_on_signals(self), \
                contextlib.ExitStack() as closing:  # the callbacks close however the run ends
            self.checkpointer.lock = lock if distributed.is_primary() else None
            runtime.set_rng_state(self._rng)
            self._start()
            self._start_callbacks(closing)
            epochs = self.cfg.train.epochs
            if self.start_epoch >= epochs:
                log.info(f"run already finished {self.start_epoch}/{epochs} epochs; writing artifacts")
            for epoch in range(self.start_epoch, epochs):
                self.run_epoch(epoch)
                if self._stop_requested() and epoch + 1 < epochs:  # also when an epoch has a single batch
                    raise Interrupted(self.stop_signal or "SIGTERM", epoch + 1, 0, self.run_dir)
            return self.finish()

    def _start(self) -> None:
        """Fresh start or resume, under the lock; the config is written first, so any later kill leaves a
        folder that ``--resume`` accepts. Only the primary rank writes; every rank reads the checkpoint."""
        fresh = not self.resume or not self.rundir.has_checkpoint()
        started_before = self.rundir.config.exists()  # else a new folder: launch has said where it starts from
        distributed.barrier()  # every rank has decided before the primary changes anything
        if distributed.is_primary():
            self._prepare_folder()
        if self.resume and fresh and started_before:
            log.info(f"no checkpoint in {self.run_dir} yet (stopped before its first save): "
                     f"starting the run again from the beginning")
        if not fresh:
            state, used = self.checkpointer.load()
            self.load_state(state)
            self._say_where(state, used)
        if distributed.is_primary():
            fileio.atomic_write_text(self.rundir.config, _config_yaml(self.cfg))
            if fresh:
                self.metrics.reset()
            else:
                self.metrics.truncate_after(self.start_epoch)
                self.checkpointer.repair_best(state, used)
        distributed.barrier()

    def _say_where(self, state: dict, used: Path) -> None:
        """One line: where a resumed run goes on (a finished run is reported by ``run``)."""
        where = f"{used.parent.name}/{used.name}"  # last.prev.pt when last.pt failed its check
        p, epochs = self.resume_progress, self.cfg.train.epochs
        if "optimizer" not in state:  # imported weights (teskd import-official): training starts from them
            log.info(f"training from the imported weights of {where}")
        elif p is not None:
            log.info(f"resuming from epoch {self.start_epoch + 1} (batch {p.step} of {len(self.data.train)}): "
                     f"{where}")
        elif self.start_epoch < epochs:
            log.info(f"resuming after epoch {self.start_epoch} of {epochs}: {where}")

    def _start_callbacks(self, closing: contextlib.ExitStack) -> None:
        if not distributed.is_primary():
            return
        start = RunStart(self.run_dir, self.start_epoch, self.resume)
        for callback in self.callbacks:
            closing.callback(callback.close)  # however the run ends
            callback.on_run_start(start)

    def _prepare_folder(self) -> None:
        if self.overwrite:
            self.rundir.clear()
        self.rundir.remove_orphans()
        try:
            self.ckpt_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise TeskdError(f"cannot write to {self.ckpt_dir}: {fileio.describe_os_error(exc)}") from exc

    def run_epoch(self, epoch: int) -> None:
        progress, self.resume_progress = self.resume_progress, None
        record = self.train_one_epoch(epoch, progress)
        improved = False
        if _evaluates(epoch + 1, self.cfg.train):
            try:
                record.update(self.evaluate_epoch())
            except NonFiniteEvaluation as exc:
                raise TeskdError(f"after epoch {epoch + 1}: {exc}; stopped, the last good checkpoint is "
                                 f"{self.ckpt_dir / 'last.pt'}") from exc
            branch = self.method.deploy_branch
            selected = record["val_acc" if self.data.val is not None else "test_acc"][branch]
            improved = selected > self.best["score"]
            if improved:
                self.best = {"epoch": epoch + 1, "score": selected, "test_top1": record["test_acc"][branch]}
        # the metrics line is written before last.pt: a resume truncates lines past last.pt's epoch, so a
        # kill between the two leaves no duplicate or missing line; best.pt is published from that last.pt
        self.checkpointer.check_run_dir()
        if distributed.is_primary():
            self.metrics.append(record)
            for callback in self.callbacks:
                callback.on_epoch_end(record)
        self.checkpointer.save(self.state_dict(epoch + 1), best=improved)
        self._print_epoch(record)

    def train_one_epoch(self, epoch: int, progress: EpochProgress | None = None) -> dict:
        """Train one epoch; ``progress`` (from a mid-epoch checkpoint) resumes it at its step."""
        loader, tc = self.data.train, self.cfg.train
        self.method.train()
        self.method.on_epoch_start(epoch, tc.epochs)
        loader.set_epoch(epoch)
        steps = len(loader)
        p = progress or EpochProgress(epoch=epoch, batch_size=self.cfg.data.batch_size, world_size=self.world)
        meters, pending = EpochMeters(self.device, p), []
        check_every = 1 if self.device.type == "cpu" else 25  # GPU: avoid a host sync per step
        t0 = saved_at = time.perf_counter() - p.seconds
        lr = self._set_lr(epoch, p.step, steps)
        batches = _Waiting(loader.iter_from(p.step))
        bar = self._bar(batches, p.step, steps, f"epoch {epoch + 1}/{tc.epochs}")
        for step, batch in enumerate(bar, start=p.step):
            lr = self._set_lr(epoch, step, steps)
            out = self.method.training_step(self.model, self._to_step_input(batch), self.opt)
            meters.update(out.loss.detach().float(), out.parts, out.logits,
                          batch[1] if out.labels is None else out.labels)
            pending.append((step, out.loss.detach().float(), out.parts))
            done = step + 1
            every_due = bool(tc.checkpoint_every) and done % tc.checkpoint_every == 0
            if done % check_every == 0 or done == steps or every_due:  # sync points (never save unchecked steps)
                self._check_finite(pending, epoch)
                pending = []
                self._show(bar, meters, lr, t0)
                stop, due = self._decide(every_due, saved_at)
                if done < steps and (stop or due):
                    saved_at = time.perf_counter()
                    now = EpochProgress(epoch, done, self.cfg.data.batch_size, self.world, seconds=saved_at - t0,
                                        steps=steps)
                    self.checkpointer.save(self.state_dict(epoch, meters.snapshot(now)))
                    if stop:
                        bar.close()
                        raise Interrupted(self.stop_signal or "SIGTERM", epoch, done, self.run_dir)
        bar.close()
        return self._epoch_record(epoch, lr, meters, p, t0, batches.seconds)

    # --- pieces of the epoch ---------------------------------------------------------------

    def _set_lr(self, epoch: int, step: int, steps: int) -> float:
        lr = self.cfg.optim.lr * lr_factor(self.cfg.schedule, self.cfg.train.epochs, epoch, step, steps)
        self.opt.set_lr(lr)
        return lr

    def _to_step_input(self, batch) -> tuple:
        images, labels = batch[0], batch[1]
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels, batch[2] if len(batch) > 2 else None

    def _stop_requested(self) -> bool:
        """A signal reached any rank (all ranks then stop at the same step)."""
        return distributed.any_rank(bool(self.stop_signal), self.device)

    def _decide(self, every_due: bool, saved_at: float) -> tuple[bool, bool]:
        """(stop, save) agreed by all ranks: a signal on any rank; a step or time interval reached."""
        minutes = self.parts.checkpoint_minutes
        time_due = minutes > 0 and time.perf_counter() - saved_at >= 60.0 * minutes
        stop, due = distributed.any_ranks([bool(self.stop_signal), every_due or time_due], self.device)
        return stop, due

    def _bar(self, iterable, start: int, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(iterable, initial=start, total=total, desc=desc, dynamic_ncols=True, leave=False,
                    disable=not (self.cfg.train.progress and distributed.is_primary()),
                    mininterval=progress_interval())

    def _show(self, bar, meters: EpochMeters, lr: float, t0: float) -> None:
        if not bar.disable:
            rate = meters.seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{float(meters.sums['loss']) / meters.seen:.3f}", lr=f"{lr:.4g}",
                            img_s=f"{rate:.0f}", refresh=False)

    def _check_finite(self, pending, epoch: int) -> None:
        losses = torch.stack([loss for _, loss, _ in pending])
        finite = bool(torch.isfinite(losses).all())
        if not distributed.any_rank(not finite, self.device):
            return
        if finite:
            raise TeskdError(f"non-finite loss on another rank at epoch {epoch + 1}; stopped, the last good "
                             f"checkpoint is {self.ckpt_dir / 'last.pt'}")
        i = int((~torch.isfinite(losses)).nonzero()[0])
        step, loss, parts = pending[i]
        desc = " ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
        raise TeskdError(f"non-finite loss at epoch {epoch + 1}, batch index {step} "
                         f"(global step {epoch * len(self.data.train) + step}): loss={float(loss)} {desc}; "
                         f"stopped, the last good checkpoint is {self.ckpt_dir / 'last.pt'}")

    def _epoch_record(self, epoch: int, lr: float, meters: EpochMeters, p: EpochProgress, t0: float,
                      data_wait: float) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds - p.seconds
        self.train_images += meters.new_samples()
        record = {"epoch": epoch + 1, "lr": lr, **meters.record(), "epoch_seconds": seconds}
        record["train_images_per_sec"] = meters.new_samples() * self.world / max(seconds - p.seconds, 1e-9)
        record["data_wait_share"] = data_wait / max(seconds - p.seconds, 1e-9)  # time waiting for batches
        return record

    def evaluate_epoch(self) -> dict:
        tc = self.cfg.train
        kw = dict(device=self.device, amp_dtype=self.parts.place.eval_amp_dtype, channels_last=tc.channels_last,
                  progress=tc.progress and distributed.is_primary())
        result = {}
        if self.data.val is not None:
            val = evaluate(self.model, self.data.val, desc="val", **kw)
            result["val_acc"] = {k: v["top1"] for k, v in val.items()}
        test = evaluate(self.model, self.data.test, desc="test", **kw)
        result["test_acc"] = {k: v["top1"] for k, v in test.items()}
        result["test_top5"] = {k: v["top5"] for k, v in test.items()}
        return result

    def _print_epoch(self, r: dict) -> None:
        if "test_acc" not in r:
            log.info(f"epoch {r['epoch']}/{self.cfg.train.epochs} loss={r['train_loss']:.4f} lr={r['lr']:.4g} "
                     f"{r['train_images_per_sec']:.0f} img/s (not evaluated: train.eval_every="
                     f"{self.cfg.train.eval_every})")
            return
        accs = " ".join(f"{k}={v:.2f}" for k, v in r["test_acc"].items())
        val = f" val_{self.method.deploy_branch}={r['val_acc'][self.method.deploy_branch]:.2f}" \
            if "val_acc" in r else ""
        log.info(f"epoch {r['epoch']}/{self.cfg.train.epochs} loss={r['train_loss']:.4f} lr={r['lr']:.4g} "
                 f"{r['train_images_per_sec']:.0f} img/s (data wait {100 * r['data_wait_share']:.0f}%) | "
                 f"test top-1 {accs}{val}")

    # --- end of run ------------------------------------------------------------------------

    def finish(self) -> dict:
        """The run's summary; on the primary rank the callbacks' end-of-run work (export, files, figures)."""
        records = self.metrics.read()
        totals = RunTotals(self.best["epoch"], self.train_seconds, self.train_images, self.data.val is not None)
        summary = summarise(records, self.cfg, self.method, self.parts.place, self.parts.image_size, totals,
                            self.metrics.path, self.run_dir)
        if distributed.is_primary():
            self.checkpointer.check_run_dir()
            end = RunEnd(self.run_dir, summary, records, self.method, self.data.num_classes, self.data.classes)
            for callback in self.callbacks:
                callback.on_run_end(end)
        return summary


def _evaluates(done: int, tc) -> bool:
    """Whether the epoch that completes ``done`` epochs is evaluated (every ``eval_every``-th and the last)."""
    return done % tc.eval_every == 0 or done >= tc.epochs


def _config_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _changed_settings(old: dict, new: dict) -> list[tuple[str, object, object]]:
    a, b = dotted(old), dotted(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class _Waiting:
    """Iterates ``batches``, adding up the seconds spent waiting for the next one (the input pipeline's share)."""

    def __init__(self, batches):
        self.batches, self.seconds = iter(batches), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.perf_counter() - t
