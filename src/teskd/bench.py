"""``teskd bench``: the training cost of a method relative to the plain ``ce`` baseline.

Both models (the method and ``ce`` on the same backbone) are built in one process from the same
seed and timed on the same synthetic batches, one trainer step of each in turn after a warm-up, so
a machine that changes speed during the run affects both alike. No dataset is read. Memory:
``peak_mem_mb`` is CUDA's ``max_memory_allocated`` over ``MEMORY_STEPS`` steps of a fresh model, or
on the CPU the growth of the peak RSS over them, in a fresh process per model (RSS peaks are
process-wide and glibc keeps freed memory); ``peak_mem_growth_mb`` is that peak minus what was
allocated before the steps. ``activation_mb`` (bytes autograd saves in one forward) is
device-independent, so it compares methods without the allocator's noise.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from teskd.config import Config, from_dict, to_dict
from teskd.data.augment import BatchAugment
from teskd.data.pipeline import input_size
from teskd.data.registry import get_dataset_spec
from teskd.engine import runtime
from teskd.engine.step import Optimization, make_optimizer
from teskd.errors import TeskdError

MB = 1024.0 * 1024.0
MEMORY_STEPS = 2
BATCHES = 4  # distinct batches: a single one is memorised, and tiny (subnormal) gradients slow CPU kernels


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"bench: {message}", file=sys.stderr, flush=True)


def ce_config(cfg: Config) -> Config:
    return from_dict({**to_dict(cfg), "method": {"name": "ce"}})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trainee:
    """One model as the trainer holds it: the method, what is called (it or its compiled wrapper), the optimizer."""

    def __init__(self, cfg: Config, num_classes: int, place: runtime.Placement):
        from teskd.build import assemble_model

        runtime.seed_everything(cfg.train.seed)
        samples = BATCHES * cfg.data.batch_size  # as many training samples as the synthetic batches hold
        self.method, self.model = assemble_model(cfg, num_classes, place, train_samples=samples)
        self.method.train()
        self.opt = Optimization(make_optimizer(self.method, cfg.optim), place.device, place.amp_dtype)
        self.device, self.amp_dtype = place.device, place.amp_dtype


def step_input(method, images: torch.Tensor, labels: torch.Tensor, batch: int = 0) -> tuple:
    """``(images, labels, index)`` as the training loader gives them to ``method``: sample indices of the
    ``batch``-th synthetic batch; a method that asks for batch pairing (:data:`teskd.data.loader.PAIRINGS`)
    gets each batch followed by its B partners (here: itself, which every pairing may draw)."""
    b = labels.shape[0]
    index = torch.arange(batch * b, (batch + 1) * b, device=labels.device)
    if method.batch_pairing is not None:
        return torch.cat([images, images]), torch.cat([labels, labels]), torch.cat([index, index])
    return images, labels, index


def train_step(t: _Trainee, images: torch.Tensor, labels: torch.Tensor, batch: int = 0) -> torch.Tensor:
    return t.method.training_step(t.model, step_input(t.method, images, labels, batch), t.opt).loss.detach()


def _classes(cfg: Config) -> int:
    """The class count of the benchmarked head (image folders: 1000 unless the folder is there to count)."""
    from teskd.data.pipeline import class_count

    try:
        return class_count(cfg.data)
    except TeskdError:
        return 1000


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def synthetic_batches(cfg: Config, device: torch.device, count: int = 1):
    gen = torch.Generator().manual_seed(cfg.train.seed)
    b, s = cfg.data.batch_size, input_size(cfg.data)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return [(torch.randn(b, 3, s, s, generator=gen).to(device).contiguous(memory_format=fmt),
             torch.randint(0, _classes(cfg), (b,), generator=gen).to(device)) for _ in range(count)]


def activation_bytes(method, images: torch.Tensor, labels: torch.Tensor, device: torch.device, amp_dtype) -> int:
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
            out = method(*step_input(method, images, labels))
    del out, keep
    return sum(seen.values())


def _alternate(fns: dict, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each ``fns[name](i)`` after ``warmup`` untimed calls, one call of each in
    turn (a, b, b, a, ...), so a machine that changes speed meanwhile affects all alike."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for i in range(steps):
        for name in order if i % 2 == 0 else order[::-1]:
            times[name].append(_timed(lambda: fns[name](warmup + i), device))
    return {k: statistics.median(v) for k, v in times.items()}


def _inference(cfg: Config, trainee: _Trainee, num_classes: int, images: torch.Tensor,
               steps: int, warmup: int) -> dict:
    from teskd.models import build_backbone

    device, amp_dtype = trainee.device, trainee.amp_dtype
    runtime.seed_everything(cfg.train.seed)
    plain = build_backbone(cfg.model.arch, num_classes, cfg.model.width_mult)
    nets = {name: runtime.prepare_model(net, cfg.train, device)[1].eval()
            for name, net in (("deployed", trainee.method.deploy_module), ("backbone", plain))}
    with torch.no_grad(), runtime.autocast(device, amp_dtype):
        med = _alternate({k: (lambda i, net=net: net(images)) for k, net in nets.items()}, steps, max(warmup, 1),
                         device)
    trainee.method.train()
    b, deployed, backbone = images.shape[0], med["deployed"], med["backbone"]
    return {"deployed_images_per_sec": b / deployed, "backbone_images_per_sec": b / backbone,
            "ratio": deployed / backbone, "deployed_ms": 1000 * deployed, "backbone_ms": 1000 * backbone}


def _peak_rss_mb() -> float:
    """Linux: ``VmHWM``, which ``/proc/self/clear_refs`` resets (``ru_maxrss`` cannot be reset, and a
    subprocess inherits its parent's over ``execve``). Elsewhere ``ru_maxrss`` (bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (MB if sys.platform == "darwin" else 1024.0)


def _memory_probe(cfg: Config, num_classes: int, threads: int | None = None) -> dict:
    """Peak memory of ``MEMORY_STEPS`` steps of a fresh model; on the CPU meant for a fresh process."""
    if threads:
        torch.set_num_threads(threads)
    place = runtime.placement(cfg.train)
    device = place.device
    with runtime.settings(cfg.train, device):
        trainee = _Trainee(cfg, num_classes, place)
        ((images, labels),) = synthetic_batches(cfg, device)
        gc.collect()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) / MB
        else:
            with contextlib.suppress(OSError):  # lower the peak to the current RSS, so it is the steps'
                Path("/proc/self/clear_refs").write_text("5")
            before = _peak_rss_mb()
        for _ in range(MEMORY_STEPS):
            train_step(trainee, images, labels)
        _sync(device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / MB
            return {"peak_mb": peak, "growth_mb": peak - before}
        growth = _peak_rss_mb() - before
        return {"peak_mb": growth, "growth_mb": growth}


def measure_memory(cfg: Config, num_classes: int, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return _memory_probe(cfg, num_classes)
    src = str(Path(__file__).resolve().parents[1])  # the child imports this very teskd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    code = "import json, sys; from teskd.bench import _memory_probe; from teskd.config import from_dict; " \
           "c, n, t = json.load(sys.stdin); print(json.dumps(_memory_probe(from_dict(c), n, t)))"
    request = json.dumps([to_dict(cfg), num_classes, torch.get_num_threads()]).encode()
    proc = subprocess.run([sys.executable, "-c", code], input=request, capture_output=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise TeskdError(f"memory measurement subprocess failed (exit {proc.returncode}): {last}")
    return json.loads(proc.stdout.decode().splitlines()[-1])


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3, inference: bool = False,
              memory: bool = True, progress: bool = True) -> dict:
    """Times training steps of ``cfg``'s method and of the ``ce`` baseline, alternating; a JSON-able dict."""
    if steps < 1 or warmup < 0:
        raise TeskdError(f"bench needs --steps >= 1 and --warmup >= 0, got {steps} and {warmup}")
    device = runtime.resolve_device(cfg.train.device)
    configs, num_classes = {"method": cfg, "ce": ce_config(cfg)}, _classes(cfg)
    with runtime.settings(cfg.train, device):
        result = _time(cfg, configs, device, steps, warmup, inference, progress)
    mem = {}
    for name, c in configs.items():
        _log(progress and memory, f"memory of {c.method.name} ({MEMORY_STEPS} steps, fresh "
                                  f"{'model' if device.type == 'cuda' else 'process'})")
        mem[name] = measure_memory(c, num_classes, device) if memory else {"peak_mb": None, "growth_mb": None}
    kind = ("cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_growth") if memory else None
    return {**result, "peak_mem_mb": {k: m["peak_mb"] for k, m in mem.items()},
            "peak_mem_growth_mb": {k: m["growth_mb"] for k, m in mem.items()}, "peak_mem_kind": kind}


def _time(cfg: Config, configs: dict, device, steps: int, warmup: int, inference: bool, progress: bool) -> dict:
    place = runtime.placement(cfg.train)
    amp_dtype = place.amp_dtype
    spec, b = get_dataset_spec(cfg.data.dataset), cfg.data.batch_size
    _log(progress, f"building {cfg.method.name} and ce ({cfg.model.arch} x{cfg.model.width_mult:g}) on {device}")
    trainees = {k: _Trainee(c, _classes(cfg), place) for k, c in configs.items()}
    batches = synthetic_batches(cfg, device, BATCHES)
    _log(progress, f"{warmup} warm-up and {steps} timed steps each, alternating")
    step_s = _alternate({k: (lambda i, t=t: train_step(t, *batches[i % BATCHES], i % BATCHES))
                         for k, t in trainees.items()},
                        steps, warmup, device)
    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, str(amp_dtype))
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "config": {"arch": cfg.model.arch, "width_mult": cfg.model.width_mult, "batch_size": b,
                   "method": cfg.method.name, "dataset": cfg.data.dataset, "image_size": input_size(cfg.data),
                   "amp": amp, "channels_last": cfg.train.channels_last, "compile": cfg.train.compile},
        "steps": steps, "warmup": warmup,
        "step_ms": {k: 1000.0 * v for k, v in step_s.items()},
        "images_per_sec": {k: b / v for k, v in step_s.items()},
        "step_time_ratio": step_s["method"] / step_s["ce"],
    }
    images, labels = batches[0]
    result["activation_mb"] = {k: activation_bytes(t.method, images, labels, device, amp_dtype) / MB
                               for k, t in trainees.items()}
    augment = BatchAugment(spec.mean, spec.std, crop=input_size(cfg.data), padding=cfg.data.crop_padding,
                           flip=cfg.data.hflip)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    x = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=gen).to(device)
    seconds = _alternate({"augment": lambda i: augment(x, gen)}, max(steps, 5), 1, device)["augment"]
    result["input_images_per_sec"] = b / seconds
    if inference:
        _log(progress, "inference of the deployed network and the plain backbone, alternating")
        result["inference"] = _inference(cfg, trainees["method"], _classes(cfg), images, steps, warmup)
    return result


def format_bench(r: dict) -> str:
    """A small readable table of :func:`run_bench`'s result."""
    c = r["config"]

    def mb(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [f"{c['method']} vs ce: {c['arch']} x{c['width_mult']:g}, batch {c['batch_size']}, {r['device']} "
             f"({r['threads']} threads), amp {c['amp']}, channels_last {c['channels_last']}, compile {c['compile']}; "
             f"torch {r['torch']}; medians of {r['steps']} steps after {r['warmup']} warm-up",
             f"{'':<10} {'ms/step':>10} {'images/s':>10} {'peak MB':>10} {'growth MB':>10} {'activ. MB':>10}"]
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
        lines.append(f"inference: deployed network {i['deployed_images_per_sec']:.1f} images/s, "
                     f"plain backbone {i['backbone_images_per_sec']:.1f} images/s, ratio {i['ratio']:.2f}")
    return "\n".join(lines)
