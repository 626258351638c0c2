"""The training loop: method-agnostic, resumable, writes a self-describing run directory.

Run directory layout::

    config.yaml            fully resolved config
    metrics.jsonl          one JSON object per epoch
    checkpoints/last.pt    written (atomically) after every epoch
    checkpoints/best.pt    the epoch with the best teacher top-1 on val (or test without val)
    teacher.safetensors    the deployable backbone only (written at the end)
    summary.json           headline numbers (written at the end)
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from teskd import __version__
from teskd.config import Config, save_config, to_dict
from teskd.data.pipeline import build_data
from teskd.engine import runtime
from teskd.engine.checkpoint import load_latest, load_model_weights, save_checkpoint
from teskd.engine.evaluate import evaluate
from teskd.engine.metrics import MetricsLog, progress_interval
from teskd.engine.schedule import lr_factor
from teskd.engine.step import make_optimizer, train_step
from teskd.errors import TeskdError
from teskd.methods import build_method
from teskd.models import build_backbone, count_params


class Interrupted(TeskdError):
    """Training stopped by SIGTERM/SIGINT after saving a resumable checkpoint."""

    def __init__(self, signal_name: str, epoch: int, step: int, run_dir: Path):
        self.exit_code = 128 + getattr(signal, signal_name)
        super().__init__(f"{signal_name} received: stopped at epoch {epoch + 1}, batch {step}, after saving "
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
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)


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
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        tc = cfg.train
        self.device = runtime.resolve_device(tc.device)
        self.amp_dtype = runtime.resolve_amp(tc.amp, self.device)
        runtime.configure(tc, self.device)
        runtime.seed_everything(tc.seed)

        self.data = build_data(cfg.data, self.device, tc.seed)
        self.method = runtime.prepare_model(build_model(cfg, self.data.num_classes), tc, self.device)
        self.optimizer = make_optimizer(self.method, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.ckpt_dir = self.run_dir / "checkpoints"
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
        load_model_weights(self.method, state["model"], "checkpoint does not match the configured model")
        self.start_epoch = int(state["epoch"])
        self.resume_progress = state.get("progress")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.train_images = int(state.get("train_images", 0))
        if "optimizer" not in state:  # imported weights (teskd import-official): start training from them
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.best = dict(state["best"])
        _set_rng_state(state["rng"])

    # --- loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self.load_state(load_latest(self.ckpt_dir / "last.pt")[0])
            self.metrics.truncate_after(self.start_epoch)
        else:
            self.metrics.path.write_text("")
        save_config(self.cfg, self.run_dir / "config.yaml")

        epochs = self.cfg.train.epochs
        if self.start_epoch >= epochs:
            print(f"run already finished {self.start_epoch}/{epochs} epochs; writing artifacts")
        with stop_on_signals(self):
            for epoch in range(self.start_epoch, epochs):
                self.run_epoch(epoch)
        return self.finish()

    def run_epoch(self, epoch: int) -> None:
        progress, self.resume_progress = self.resume_progress, None
        record = self.train_one_epoch(epoch, progress)
        record.update(self.evaluate_epoch())
        selected = record["val_acc" if self.data.val is not None else "test_acc"]["teacher"]
        improved = selected > self.best["score"]
        if improved:
            self.best = {"epoch": epoch + 1, "score": selected, "test_top1": record["test_acc"]["teacher"]}
        state = self.state_dict(epoch + 1)
        if improved:
            save_checkpoint(state, self.ckpt_dir / "best.pt", keep_previous=False)
        # the metrics line is written after best.pt and before last.pt: a resume truncates lines past
        # last.pt's epoch, so a crash between the two writes leaves no duplicate or missing line
        self.metrics.append(record)
        save_checkpoint(state, self.ckpt_dir / "last.pt")
        self._print_epoch(record)

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
            return {"epoch": epoch, "step": step, "seen": seen, "seconds": time.perf_counter() - t0,
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
                save_checkpoint(self.state_dict(epoch, snapshot(done)), self.ckpt_dir / "last.pt")
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
        export_teacher(self.method, self.run_dir / "teacher.safetensors", self.cfg, self.data.num_classes)
        last = records[-1]
        best_epoch = self.best["epoch"]
        best = next(r for r in records if r["epoch"] == best_epoch)
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
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
