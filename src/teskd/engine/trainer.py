"""The training loop: method-agnostic, resumable, writes a self-describing run directory
(layout: :mod:`teskd.engine.rundir`)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from teskd import __version__
from teskd import fileio
from teskd.config import Config, resolve_data_root, to_dict
from teskd.data.pipeline import build_data
from teskd.engine import runtime
from teskd.engine.checkpoint import (load_latest, load_model_weights, publish_copy, read_digests,
                                     save_checkpoint)
from teskd.engine.evaluate import evaluate
from teskd.engine.metrics import MetricsLog, progress_interval
from teskd.engine.rundir import RunDir, RunLock
from teskd.engine.schedule import lr_factor
from teskd.engine.step import make_optimizer, train_step
from teskd.errors import TeskdError
from teskd.methods import build_method
from teskd.models import build_backbone, count_params


class Interrupted(TeskdError):
    """Training stopped by SIGTERM/SIGINT after saving a resumable checkpoint."""

    def __init__(self, signal_name: str, epoch: int, step: int, run_dir: Path):
        self.exit_code = 128 + getattr(signal, signal_name)
        where = f"at epoch {epoch + 1}, batch {step}" if step else f"after epoch {epoch}"
        super().__init__(f"{signal_name} received: stopped {where}, after saving "
                         f"{run_dir / 'checkpoints' / 'last.pt'}; continue with: teskd train --resume {run_dir}")


@contextmanager
def stop_on_signals(trainer: "Trainer"):
    """SIGTERM/SIGINT ask the trainer to save and stop after the current step (a second one kills)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if trainer.stop_signal:  # second signal: stop now
            raise KeyboardInterrupt
        trainer.stop_signal = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def build_model(cfg: Config, num_classes: int):
    backbone = build_backbone(cfg.model.arch, num_classes, cfg.model.width_mult)
    return build_method(cfg.method.name, backbone, num_classes, cfg.method)


def export_teacher(method, path: Path, cfg: Config, num_classes: int) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in method.deploy_module.state_dict().items()}
    meta = {"arch": cfg.model.arch, "num_classes": str(num_classes), "width_mult": str(cfg.model.width_mult),
            "dataset": cfg.data.dataset, "teskd_version": __version__}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fileio.fault_point("write", tmp)
        save_file(state, str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fileio.replace(tmp, path)
    except Exception as exc:  # safetensors reports a full disk as its own error types, not OSError
        tmp.unlink(missing_ok=True)
        raise TeskdError(f"could not write {path}: {fileio.describe_os_error(exc, path)}") from exc


def _rng_state() -> dict:
    # NumPy's state holds an ndarray, which weights_only loading refuses: keep it as a tensor
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains ``cfg`` into ``run_dir``.

    ``resume``: continue the run from its newest verified checkpoint (a run killed before its
    first checkpoint starts again from the beginning, saying so). ``overwrite``: replace the
    previous run in ``run_dir`` (the caller has checked it is one); its files are removed only
    once this run holds the folder's lock, after the data and the model have been built.
    """

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False):
        cfg.data.root = str(resolve_data_root(cfg.data))  # stored absolute: the run works from any directory
        self.cfg = cfg
        self.rundir = RunDir(run_dir)
        self.run_dir = self.rundir.path
        self.resume = resume
        self.overwrite = overwrite
        tc = cfg.train
        self.device = runtime.resolve_device(tc.device)
        self.amp_dtype = runtime.resolve_amp(tc.amp, self.device)
        runtime.configure(tc, self.device)
        runtime.seed_everything(tc.seed)

        self.data = build_data(cfg.data, self.device, tc.seed)
        self.method = runtime.prepare_model(build_model(cfg, self.data.num_classes), tc, self.device)
        self.optimizer = make_optimizer(self.method, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.metrics = MetricsLog(self.rundir.metrics)
        self.ckpt_dir = self.rundir.checkpoints
        self.lock: RunLock | None = None
        self.start_epoch = 0  # number of epochs already completed
        self.resume_progress: dict | None = None  # mid-epoch position of a resumed checkpoint
        self.stop_signal: str | None = None  # set by SIGTERM/SIGINT: save and stop after this step
        self.best = {"epoch": 0, "score": -1.0}
        self.train_seconds = 0.0
        self.train_images = 0

    # --- state -----------------------------------------------------------------------------

    def state_dict(self, epoch: int, progress: dict | None = None) -> dict:
        """``epoch``: completed epochs; ``progress``: how far into the next one (mid-epoch saves)."""
        return {
            "model": self.method.state_dict(),
            "progress": progress,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best": dict(self.best),
            "train_seconds": self.train_seconds,
            "train_images": self.train_images,
            "rng": _rng_state(),
            "config": to_dict(self.cfg),
            "num_classes": self.data.num_classes,
            "teskd_version": __version__,
        }

    def load_state(self, state: dict) -> None:
        self._check_resumable(state)
        load_model_weights(self.method, state["model"], "checkpoint does not match the configured model")
        self.start_epoch = int(state["epoch"])
        self.resume_progress = state.get("progress")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.train_images = int(state.get("train_images", 0))
        if "optimizer" not in state:  # imported weights (teskd import-official): start training from them
            return
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.best = dict(state["best"])
            _set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise TeskdError(f"the checkpoint's optimizer or RNG state does not fit this run "
                             f"({' '.join(str(exc).split())[:200]}); is it from another teskd version?") from exc

    def _check_resumable(self, state: dict) -> None:
        """Refuse settings that cannot continue this checkpoint; say which settings changed."""
        done, epochs = int(state["epoch"]), self.cfg.train.epochs
        if "optimizer" in state and epochs < done:
            raise TeskdError(f"{self.run_dir} has finished {done} epochs; train.epochs={epochs} would discard "
                             f"finished epochs (resume keeps train.epochs >= {done}; start a new run for fewer)")
        old = state["config"]
        progress = state.get("progress")
        old_batch = old.get("data", {}).get("batch_size") if isinstance(old.get("data"), dict) else None
        if progress and old_batch is not None and old_batch != self.cfg.data.batch_size:
            raise TeskdError(f"the checkpoint stopped inside epoch {done + 1} after batch {progress['step']} "
                             f"of data.batch_size={old_batch}; resume with that batch size "
                             f"(it may change at an epoch boundary)")
        changed = _changed_settings(old, to_dict(self.cfg))
        if changed and "optimizer" in state:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:8])
            more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
            print(f"resuming with changed settings: {shown}{more}", flush=True)

    # --- loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        with RunLock(self.rundir) as lock, stop_on_signals(self):
            self.lock = lock
            if self.overwrite:
                self.rundir.clear()
            self.rundir.remove_orphans()
            try:
                self.ckpt_dir.mkdir(exist_ok=True)
            except OSError as exc:
                raise TeskdError(f"cannot write to {self.ckpt_dir}: {fileio.describe_os_error(exc)}") from exc
            fresh = not self.resume or not self.rundir.has_checkpoint()
            if self.resume and fresh:
                print(f"no checkpoint in {self.run_dir} yet (stopped before its first save): "
                      f"starting the run again from the beginning", flush=True)
            if not fresh:
                state, used = load_latest(self.rundir.last)
                self.load_state(state)
            # config first: a run killed at any later point is a run directory that --resume accepts
            fileio.atomic_write_text(self.rundir.config, _config_yaml(self.cfg))
            if fresh:
                self.metrics.reset()
            else:
                self.metrics.truncate_after(self.start_epoch)
                self._repair_best(state, used)

            epochs = self.cfg.train.epochs
            if self.start_epoch >= epochs:
                print(f"run already finished {self.start_epoch}/{epochs} epochs; writing artifacts")
            for epoch in range(self.start_epoch, epochs):
                self.run_epoch(epoch)
                if self.stop_signal and epoch + 1 < epochs:  # also when an epoch has a single batch
                    raise Interrupted(self.stop_signal, epoch + 1, 0, self.run_dir)
            return self.finish()

    def _repair_best(self, state: dict, used: Path) -> None:
        """A kill between saving ``last.pt`` and publishing it as ``best.pt`` leaves best.pt behind: redo it."""
        best = state.get("best") or {}
        if "optimizer" not in state or not best.get("epoch"):
            return
        if best["epoch"] == state["epoch"] and state.get("progress") is None:
            digest = fileio.file_digest(used)
            if not self.rundir.best.is_file() or fileio.file_digest(self.rundir.best) != digest:
                publish_copy(used, digest, self.rundir.best)
        elif not (best_pt := self.rundir.best).is_file() or fileio.file_digest(best_pt) not in read_digests(best_pt):
            print(f"warning: {best_pt} is missing or damaged; it is written again when the teacher next "
                  f"improves", flush=True)

    def run_epoch(self, epoch: int) -> None:
        progress, self.resume_progress = self.resume_progress, None
        record = self.train_one_epoch(epoch, progress)
        record.update(self.evaluate_epoch())
        selected = record["val_acc" if self.data.val is not None else "test_acc"]["teacher"]
        improved = selected > self.best["score"]
        if improved:
            self.best = {"epoch": epoch + 1, "score": selected, "test_top1": record["test_acc"]["teacher"]}
        # the metrics line is written before last.pt: a resume truncates lines past last.pt's epoch, so a
        # kill between the two leaves no duplicate or missing line. best.pt is published from the complete
        # last.pt (no second serialisation); a kill before that is repaired on resume (_repair_best).
        if self.lock is not None:
            self.lock.check()
        self.metrics.append(record)
        digest = self._save(self.state_dict(epoch + 1))
        if improved:
            publish_copy(self.rundir.last, digest, self.rundir.best)
        self._print_epoch(record)

    def _save(self, state: dict) -> str:
        if self.lock is not None:
            self.lock.check()
        return save_checkpoint(state, self.rundir.last, create_parent=False)

    def _step_lr(self, epoch: int, step: int, steps: int) -> float:
        lr = self.cfg.optim.lr * lr_factor(self.cfg.schedule, self.cfg.train.epochs, epoch, step, steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_one_epoch(self, epoch: int, progress: dict | None = None) -> dict:
        """Train one epoch; ``progress`` (from a mid-epoch checkpoint) resumes it at its step."""
        from tqdm import tqdm

        method, loader, tc = self.method, self.data.train, self.cfg.train
        method.train()
        loader.set_epoch(epoch)
        steps = len(loader)
        p = progress or {"step": 0, "sums": {}, "correct": {}, "seen": 0, "seconds": 0.0}
        start = int(p["step"])
        check_every = 1 if self.device.type == "cpu" else 25  # GPU: avoid a host sync per step
        # running sums live on the device (float64, exact to restore) and are read at sync points only
        f64 = dict(dtype=torch.float64, device=self.device)
        sums = {k: torch.tensor(v, **f64) for k, v in p["sums"].items()}
        correct = {k: torch.tensor(v, dtype=torch.long, device=self.device) for k, v in p["correct"].items()}
        pending: list[tuple[int, torch.Tensor, dict]] = []
        seen = int(p["seen"])
        t0 = time.perf_counter() - float(p["seconds"])
        lr = self._step_lr(epoch, start, steps)

        def snapshot(step: int) -> dict:  # this epoch's progress after `step` batches, as plain numbers
            return {"epoch": epoch, "step": step, "batch_size": loader.batch_size, "seen": seen,
                    "seconds": time.perf_counter() - t0,
                    "sums": {k: float(v) for k, v in sums.items()}, "correct": {k: int(v) for k, v in correct.items()}}

        bar = tqdm(loader.iter_from(start), initial=start, total=steps, desc=f"epoch {epoch + 1}/{tc.epochs}",
                   disable=not tc.progress, dynamic_ncols=True, leave=False, mininterval=progress_interval())
        for step, (images, labels) in enumerate(bar, start=start):
            lr = self._step_lr(epoch, step, steps)
            if tc.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            out = train_step(method, self.optimizer, self.scaler, images, labels, self.device, self.amp_dtype)

            n = labels.shape[0]
            seen += n
            loss = out.loss.detach().float()
            pending.append((step, loss, out.parts))
            for name, value in {"loss": loss, **out.parts}.items():
                sums[name] = sums.get(name, 0) + value.double() * n
            with torch.no_grad():
                for name, logits in out.logits.items():
                    correct[name] = correct.get(name, 0) + (logits.argmax(1) == labels).sum()
            done = step + 1
            save_now = done < steps and (self.stop_signal or (tc.checkpoint_every and done % tc.checkpoint_every == 0))
            if done % check_every == 0 or done == steps or save_now:  # never save unchecked steps
                self._check_finite(pending, epoch)
                pending = []
                if tc.progress:
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{float(sums['loss']) / seen:.3f}", lr=f"{lr:.4g}",
                                    img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
            if save_now:
                self._save(self.state_dict(epoch, snapshot(done)))
                if self.stop_signal:
                    bar.close()
                    raise Interrupted(self.stop_signal, epoch, done, self.run_dir)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds - float(p["seconds"])
        self.train_images += seen - int(p["seen"])
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": float(sums["loss"]) / seen}
        for name, value in sums.items():
            if name != "loss":
                record[f"loss_{name}"] = float(value) / seen
        record["train_acc"] = {name: 100.0 * int(c) / seen for name, c in correct.items()}
        record["epoch_seconds"] = seconds
        record["train_images_per_sec"] = seen / seconds
        return record

    def _check_finite(self, pending, epoch: int) -> None:
        losses = torch.stack([loss for _, loss, _ in pending])
        if bool(torch.isfinite(losses).all()):
            return
        i = int((~torch.isfinite(losses)).nonzero()[0])
        step, loss, parts = pending[i]
        desc = " ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
        raise TeskdError(f"non-finite loss at epoch {epoch + 1}, batch index {step} "
                         f"(global step {epoch * len(self.data.train) + step}): loss={float(loss)} {desc}; "
                         f"stopped, the last good checkpoint is {self.ckpt_dir / 'last.pt'}")

    def evaluate_epoch(self) -> dict:
        kw = dict(device=self.device, amp_dtype=self.amp_dtype, channels_last=self.cfg.train.channels_last,
                  progress=self.cfg.train.progress)
        result = {}
        if self.data.val is not None:
            result["val_acc"] = {k: v["top1"] for k, v in evaluate(self.method, self.data.val, desc="val", **kw).items()}
        test = evaluate(self.method, self.data.test, desc="test", **kw)
        result["test_acc"] = {k: v["top1"] for k, v in test.items()}
        result["test_top5"] = {k: v["top5"] for k, v in test.items()}
        return result

    def _print_epoch(self, r: dict) -> None:
        accs = " ".join(f"{k}={v:.2f}" for k, v in r["test_acc"].items())
        val = f" val_teacher={r['val_acc']['teacher']:.2f}" if "val_acc" in r else ""
        print(f"epoch {r['epoch']}/{self.cfg.train.epochs} loss={r['train_loss']:.4f} lr={r['lr']:.4g} "
              f"{r['train_images_per_sec']:.0f} img/s | test top-1 {accs}{val}", flush=True)

    # --- end of run ------------------------------------------------------------------------

    def finish(self) -> dict:
        records = self.metrics.read()
        if not records:
            raise TeskdError(f"no finished epoch in {self.run_dir}; nothing to summarise")
        if self.lock is not None:
            self.lock.check()
        export_teacher(self.method, self.rundir.teacher, self.cfg, self.data.num_classes)
        last = records[-1]
        best_epoch = self.best["epoch"]
        best = next((r for r in records if r["epoch"] == best_epoch), None)
        if best is None:
            raise TeskdError(f"{self.metrics.path} has no record of the best epoch {best_epoch}; "
                             f"the file was edited or damaged")
        summary = {
            "method": self.cfg.method.name,
            "arch": self.cfg.model.arch,
            "dataset": self.cfg.data.dataset,
            "epochs": last["epoch"],
            "teacher_top1_last": last["test_acc"]["teacher"],
            "teacher_top5_last": last["test_top5"]["teacher"],
            "teacher_top1_best": best["test_acc"]["teacher"],
            "best_epoch": best_epoch,
            "selected_on": "val" if self.data.val is not None else "test",
            # the paper's protocol: the maximum test accuracy over epochs (optimistic; for comparison only)
            "teacher_top1_max_test": max(r["test_acc"]["teacher"] for r in records),
            "test_acc_last": last["test_acc"],
            "params_train": count_params(self.method),
            "params_deploy": count_params(self.method.deploy_module),
            "train_images_per_sec": self.train_images / self.train_seconds if self.train_seconds else math.nan,
            "train_hours": self.train_seconds / 3600,
            "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "torch": torch.__version__,
        }
        if self.data.val is not None:
            summary["teacher_val_top1_best"] = best["val_acc"]["teacher"]
        fileio.atomic_write_text(self.rundir.summary, json.dumps(summary, indent=2) + "\n")
        return summary


def _config_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _changed_settings(old: dict, new: dict) -> list[tuple[str, object, object]]:
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
