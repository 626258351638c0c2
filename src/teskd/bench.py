"""``teskd bench``: the training cost of a method relative to the plain ``ce`` baseline.

Both models (the configured method and ``ce`` on the same backbone) are built in one
process from the same seed and timed on the same synthetic batch, one step of each in
turn after a warm-up, so a machine that slows down or speeds up during the run affects
both alike. A step is exactly the trainer's: ``zero_grad``, ``forward_train`` under
autocast, ``scaler.scale(loss).backward()``, ``scaler.step``, ``scaler.update`` (plus a
``torch.cuda.synchronize()`` on a GPU before the clock stops). No dataset files are read.

Memory:

* ``peak_mem_mb``: on CUDA ``torch.cuda.max_memory_allocated`` over two training steps of a
  freshly built model (only that model alive); on the CPU the growth of the peak resident
  set size over two steps, measured in a fresh Python process per model because RSS peaks
  are process-wide and glibc keeps freed memory (on Linux the peak, ``VmHWM``, is first
  lowered to the current RSS through ``/proc/self/clear_refs``).
* ``peak_mem_growth_mb``: the same peak minus what was allocated before the steps (on the
  CPU identical to ``peak_mem_mb``).
* ``activation_mb``: bytes of the tensors autograd saves for backward during one
  ``forward_train`` (parameters excluded, shared storage counted once); the same on every
  device, so it compares methods without the allocator's noise.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from teskd.config import Config, from_dict, to_dict
from teskd.data.augment import BatchAugment
from teskd.data.registry import get_dataset_spec
from teskd.engine import runtime
from teskd.engine.step import Optimization, make_optimizer
from teskd.errors import TeskdError

MB = 1024.0 * 1024.0
MEMORY_STEPS = 2
BATCHES = 4  # distinct synthetic batches the timed steps cycle through


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"bench: {message}", file=sys.stderr, flush=True)


def ce_config(cfg: Config) -> Config:
    """``cfg`` with the method section replaced by plain cross-entropy."""
    data = to_dict(cfg)
    data["method"] = {"name": "ce"}
    return from_dict(data)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp_name(dtype: torch.dtype | None) -> str:
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


class _Trainee:
    """One model as the trainer holds it: the method, what is called (it or its compiled wrapper), the optimizer."""

    def __init__(self, cfg: Config, num_classes: int, device: torch.device, amp_dtype):
        from teskd.build import build_model

        runtime.seed_everything(cfg.train.seed)
        self.method, self.model = runtime.prepare_model(build_model(cfg, num_classes), cfg.train, device)
        self.method.train()
        self.opt = Optimization(make_optimizer(self.method, cfg.optim), device, amp_dtype)
        self.device = device
        self.amp_dtype = amp_dtype


def train_step(t: _Trainee, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One training step exactly as the trainer does it; returns the (detached) loss."""
    return t.method.training_step(t.model, (images, labels, None), t.opt).loss.detach()


def _timed(fn, device: torch.device) -> float:
    """Seconds taken by ``fn()``, the device's queued work included."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def synthetic_batches(cfg: Config, device: torch.device, count: int = 1):
    """``count`` random (images, labels) training batches on ``device``, made once.

    A few different batches rather than one: a single batch is memorised within a few
    dozen steps, after which tiny (subnormal) gradients can slow CPU kernels down.
    """
    spec = get_dataset_spec(cfg.data.dataset)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    b, s = cfg.data.batch_size, spec.image_size
    batches = []
    for _ in range(count):
        images = torch.randn(b, 3, s, s, generator=gen).to(device)
        labels = torch.randint(0, spec.num_classes, (b,), generator=gen).to(device)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        batches.append((images, labels))
    return batches


def activation_bytes(method, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                     amp_dtype) -> int:
    """Bytes autograd saves for backward during one training forward (parameters excluded,
    each storage counted once). The graph is freed again without a backward pass."""
    params = {p.untyped_storage().data_ptr() for p in method.parameters()}
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # held until the end, so no storage address is reused meanwhile

    def pack(t: torch.Tensor):
        keep.append(t)
        try:
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            ptr, nbytes = id(t), t.numel() * t.element_size()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with runtime.autocast(device, amp_dtype):
            out = method(images, labels)
    del out, keep
    return sum(seen.values())


def input_pipeline_seconds(cfg: Config, device: torch.device, repeats: int) -> list[float]:
    """Times of the batched augmentation (crop, flip, normalise) of one training batch."""
    spec = get_dataset_spec(cfg.data.dataset)
    augment = BatchAugment(spec.mean, spec.std, crop=spec.image_size, padding=cfg.data.crop_padding,
                           flip=cfg.data.hflip)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    s = spec.image_size
    x = torch.randint(0, 256, (cfg.data.batch_size, 3, s, s), dtype=torch.uint8, generator=gen).to(device)
    augment(x, gen)  # warm-up
    return [_timed(lambda: augment(x, gen), device) for _ in range(repeats)]


def _prepare_plain(module: torch.nn.Module, cfg: Config, device: torch.device):
    """A network for inference, prepared exactly as the trainer prepares a method."""
    return runtime.prepare_model(module, cfg.train, device)[1].eval()


def _inference(cfg: Config, trainee: _Trainee, num_classes: int, images: torch.Tensor,
               steps: int, warmup: int, progress: bool) -> dict:
    from teskd.models import build_backbone

    device, amp_dtype = trainee.device, trainee.amp_dtype
    runtime.seed_everything(cfg.train.seed)
    plain = build_backbone(cfg.model.arch, num_classes, cfg.model.width_mult)
    nets = {"teacher": _prepare_plain(trainee.method.deploy_module, cfg, device),
            "backbone": _prepare_plain(plain, cfg, device)}

    def forward(net):
        with torch.no_grad(), runtime.autocast(device, amp_dtype):
            net(images)

    _log(progress, f"inference warm-up ({warmup} passes each)")
    for _ in range(max(warmup, 1)):
        for net in nets.values():
            forward(net)
    _log(progress, f"inference timing ({steps} passes each, alternating)")
    times: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(steps):
        for name, net in nets.items():
            times[name].append(_timed(lambda: forward(net), device))
    trainee.method.train()
    b = images.shape[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"teacher_images_per_sec": b / med["teacher"], "backbone_images_per_sec": b / med["backbone"],
            "ratio": med["teacher"] / med["backbone"],
            "teacher_ms": 1000 * med["teacher"], "backbone_ms": 1000 * med["backbone"]}


# --- memory ------------------------------------------------------------------------------------


def _reset_peak_rss() -> None:
    """Lowers this process's peak RSS to its current RSS (Linux: ``echo 5 > /proc/self/clear_refs``),
    so the peak after the steps is theirs and not that of importing torch or building the model."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    Linux: ``VmHWM`` of ``/proc/self/status`` (what :func:`_reset_peak_rss` resets). Not
    ``ru_maxrss`` there: the kernel carries the peak of the parent's memory over an
    ``execve`` into it, so a subprocess of a large process would start with that peak.
    Elsewhere ``resource.getrusage`` (KB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / MB if sys.platform == "darwin" else maxrss / 1024.0


def _memory_probe(cfg: Config, num_classes: int, steps: int = MEMORY_STEPS) -> dict:
    """Builds one model and its batch, then measures ``steps`` training steps.

    CUDA: ``max_memory_allocated`` since a reset just before the steps (``peak_mb``) and
    that minus what was allocated at the reset (``growth_mb``). CPU: growth of this
    process's peak RSS over the steps (both keys); meant to run in a fresh process.
    """
    device = runtime.resolve_device(cfg.train.device)
    amp_dtype = runtime.resolve_amp(cfg.train.amp, device)
    with runtime.settings(cfg.train, device):
        return _measure_steps(cfg, num_classes, device, amp_dtype, steps)


def _measure_steps(cfg: Config, num_classes: int, device: torch.device, amp_dtype, steps: int) -> dict:
    trainee = _Trainee(cfg, num_classes, device, amp_dtype)
    ((images, labels),) = synthetic_batches(cfg, device)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            train_step(trainee, images, labels)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / MB, "growth_mb": (peak - base) / MB}
    gc.collect()
    _reset_peak_rss()
    before = _peak_rss_mb()
    for _ in range(steps):
        train_step(trainee, images, labels)
    growth = _peak_rss_mb() - before
    return {"peak_mb": growth, "growth_mb": growth}


def _memory_child() -> None:
    """Entry point of the CPU memory subprocess: JSON request on stdin, JSON on stdout."""
    request = json.loads(sys.stdin.read())
    torch.set_num_threads(request["threads"])
    result = _memory_probe(from_dict(request["config"]), request["num_classes"], request["steps"])
    sys.stdout.write(json.dumps(result) + "\n")


def _memory_subprocess(cfg: Config, num_classes: int, steps: int = MEMORY_STEPS) -> dict:
    import teskd

    request = {"config": to_dict(cfg), "num_classes": num_classes, "steps": steps,
               "threads": torch.get_num_threads()}
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(teskd.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", "from teskd.bench import _memory_child; _memory_child()"],
                          input=json.dumps(request).encode(), capture_output=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise TeskdError(f"memory measurement subprocess failed (exit {proc.returncode}): "
                         f"{lines[-1] if lines else 'no output'}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def measure_memory(cfg: Config, num_classes: int, device: torch.device) -> dict:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        return _memory_probe(cfg, num_classes)
    return _memory_subprocess(cfg, num_classes)


# --- the benchmark -----------------------------------------------------------------------------


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3, inference: bool = False,
              memory: bool = True, progress: bool = True) -> dict:
    """Times training steps of ``cfg``'s method and of the ``ce`` baseline, alternating.

    Returns a JSON-able dict; see the module docstring for the memory numbers.
    """
    if steps < 1:
        raise TeskdError(f"bench needs --steps >= 1, got {steps}")
    if warmup < 0:
        raise TeskdError(f"bench needs --warmup >= 0, got {warmup}")
    tc = cfg.train
    device = runtime.resolve_device(tc.device)
    amp_dtype = runtime.resolve_amp(tc.amp, device)
    with runtime.settings(tc, device):
        result = _time_and_measure(cfg, device, amp_dtype, steps, warmup, inference, progress)
        if memory:
            result.update(_memory_of_both(cfg, device, progress))
        else:
            result.update(peak_mem_mb={"method": None, "ce": None},
                          peak_mem_growth_mb={"method": None, "ce": None}, peak_mem_kind=None)
    return result


def _alternate(trainees: dict, batches: list, steps: int, warmup: int, device, progress: bool) -> dict:
    """Per-step seconds of each trainee, one step of each in turn (method, ce, ce, method, ...)."""
    _log(progress, f"warm-up ({warmup} steps each)")
    for i in range(warmup):
        for t in trainees.values():
            train_step(t, *batches[i % BATCHES])
    _log(progress, f"timing ({steps} steps each, alternating)")
    times: dict[str, list[float]] = {k: [] for k in trainees}
    order = list(trainees)
    for i in range(steps):
        batch = batches[(warmup + i) % BATCHES]
        for name in order if i % 2 == 0 else order[::-1]:
            times[name].append(_timed(lambda: train_step(trainees[name], *batch), device))
    return times


def _time_and_measure(cfg: Config, device, amp_dtype, steps: int, warmup: int, inference: bool,
                      progress: bool) -> dict:
    tc, spec = cfg.train, get_dataset_spec(cfg.data.dataset)
    _log(progress, f"building {cfg.method.name} and ce ({cfg.model.arch} x{cfg.model.width_mult:g}) on {device}")
    trainees = {k: _Trainee(c, spec.num_classes, device, amp_dtype)
                for k, c in {"method": cfg, "ce": ce_config(cfg)}.items()}
    batches = synthetic_batches(cfg, device, BATCHES)
    images, labels = batches[0]
    times = _alternate(trainees, batches, steps, warmup, device, progress)
    b = cfg.data.batch_size
    step_s = {k: statistics.median(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": {"arch": cfg.model.arch, "width_mult": cfg.model.width_mult, "batch_size": b,
                   "method": cfg.method.name, "dataset": cfg.data.dataset, "image_size": spec.image_size,
                   "amp": _amp_name(amp_dtype), "channels_last": tc.channels_last, "compile": tc.compile},
        "steps": steps,
        "warmup": warmup,
        "step_ms": {k: 1000.0 * v for k, v in step_s.items()},
        "images_per_sec": {k: b / v for k, v in step_s.items()},
        "step_time_ratio": step_s["method"] / step_s["ce"],
    }
    _log(progress, "activation memory (saved tensors of one forward)")
    result["activation_mb"] = {k: activation_bytes(t.method, images, labels, device, amp_dtype) / MB
                               for k, t in trainees.items()}
    _log(progress, "input pipeline")
    result["input_images_per_sec"] = b / statistics.median(input_pipeline_seconds(cfg, device, max(steps, 5)))
    if inference:
        result["inference"] = _inference(cfg, trainees["method"], spec.num_classes, images, steps, warmup,
                                          progress)
    return result


def _memory_of_both(cfg: Config, device, progress: bool) -> dict:
    num_classes = get_dataset_spec(cfg.data.dataset).num_classes
    peaks, growths = {}, {}
    for name, c in {"method": cfg, "ce": ce_config(cfg)}.items():
        _log(progress, f"memory of {c.method.name} ({MEMORY_STEPS} steps, "
                       f"{'fresh model' if device.type == 'cuda' else 'fresh process'})")
        mem = measure_memory(c, num_classes, device)
        peaks[name], growths[name] = mem["peak_mb"], mem["growth_mb"]
    kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_growth"
    return {"peak_mem_mb": peaks, "peak_mem_growth_mb": growths, "peak_mem_kind": kind}


def format_bench(r: dict) -> str:
    """A small readable table of :func:`run_bench`'s result."""
    c = r["config"]

    def mb(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"{c['method']} vs ce: {c['arch']} x{c['width_mult']:g}, batch {c['batch_size']}, {r['device']} "
        f"({r['threads']} threads), amp {c['amp']}, channels_last {c['channels_last']}, "
        f"compile {c['compile']}; torch {r['torch']}; medians of {r['steps']} steps after {r['warmup']} warm-up",
        f"{'':<10} {'ms/step':>10} {'images/s':>10} {'peak MB':>10} {'growth MB':>10} {'activ. MB':>10}",
    ]
    for key, label in (("method", c["method"]), ("ce", "ce")):
        lines.append(f"{label:<10} {r['step_ms'][key]:10.2f} {r['images_per_sec'][key]:10.1f} "
                     f"{mb(r['peak_mem_mb'][key]):>10} {mb(r['peak_mem_growth_mb'][key]):>10} "
                     f"{mb(r['activation_mb'][key]):>10}")
    lines.append(f"step time ratio ({c['method']} / ce): {r['step_time_ratio']:.2f}x")
    if r.get("peak_mem_kind"):
        lines.append(f"peak memory: {r['peak_mem_kind'].replace('_', ' ')}")
    lines.append(f"input pipeline (augmentation only): {r['input_images_per_sec']:.0f} images/s")
    if "inference" in r:
        i = r["inference"]
        lines.append(f"inference: deployed teacher {i['teacher_images_per_sec']:.1f} images/s, "
                     f"plain backbone {i['backbone_images_per_sec']:.1f} images/s, ratio {i['ratio']:.2f}")
    return "\n".join(lines)
