"""Typed configuration: YAML files + ``key=value`` overrides, validated against a tree of dataclasses
(unknown keys and wrong types are rejected with the full dotted key). The ``method`` section's fields
depend on ``method.name``: each method registers its own parameter dataclass."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import yaml

from teskd.errors import TeskdError


@dataclass
class DataConfig:
    dataset: str = "cifar100"
    # null: ${TESKD_DATA:-./data}/<dataset>; ${VAR}, ${VAR:-default} and ~ are expanded (resolve_data_root)
    root: str | None = None
    download: bool = False
    subset_per_class: int | None = None  # keep the first K training images of each class
    val_per_class: int = 0  # hold out the last K training images of each class for validation
    test_subset_per_class: int | None = None  # evaluate on the first K test images of each class (quick runs)
    batch_size: int = 128
    eval_batch_size: int = 100  # small batches are faster on CPUs (cache); raise it on a GPU
    crop_padding: int = 4
    hflip: bool = True
    # extra augmentations, off by default (some baselines' official codes switch them on silently):
    # AutoAugment's learned policy (CIFAR-10 policy for in-memory data, ImageNet's for image folders),
    # and Cutout (DeVries & Taylor: a random LxL square zeroed after normalisation; in-memory data only)
    autoaugment: bool = False
    cutout: int = 0
    # image folders (imagenet, imagefolder): training crop / evaluation centre crop, and the resize before it;
    # null: the dataset's own size (32 for CIFAR, 224 and 256 for image folders)
    image_size: int | None = None
    eval_resize: int | None = None
    workers: int = 4  # DataLoader worker processes decoding images (image folders)
    on_bad_image: str = "stop"  # stop | skip (skipped images are counted and reported)


@dataclass
class ModelConfig:
    # a registered name (docs/methods.md#architectures), tv:NAME (torchvision) or timm:NAME (pip install 'teskd[timm]')
    arch: str = "resnet18"
    width_mult: float = 1.0
    pretrained: str | None = None  # a local weights file for the backbone (.safetensors or .pth)


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4


@dataclass
class ScheduleConfig:
    name: str = "step"  # step | cosine
    milestones: list[int] = field(default_factory=lambda: [100, 150])
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class TrainConfig:
    epochs: int = 200
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU) | off | bf16 | fp16
    eval_amp: bool = False  # evaluate under train.amp's autocast too; default: float32, as the official code
    deterministic: bool = False
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPUs and GPUs, same function
    compile: bool = False  # torch.compile the training and evaluation steps
    checkpoint_every: int = 0  # also save checkpoints/last.pt every N steps within an epoch (0: epoch ends only)
    progress: bool = True  # tqdm progress bars
    threads: int = 0  # torch CPU threads; 0 = torch's default
    # evaluate after every N-th epoch and after the last (long schedules on small data, where a full test
    # pass costs more than an epoch of training); best.pt is chosen among the evaluated epochs
    eval_every: int = 1
    sync_bn: bool = False  # with several processes: BatchNorm statistics over the global batch (GPU only)
    # also save last.pt every N minutes inside an epoch; null: 30 for image folders, off for in-memory data
    checkpoint_minutes: float | None = None
    tensorboard: bool = False  # also write TensorBoard event files to RUN/tensorboard (pip install 'teskd[tensorboard]')


@dataclass
class MethodParams:
    """Base of every method's parameters; ``name`` selects the method."""

    # fields holding file paths: stored absolute in a run's config.yaml, as data.root is, so that resume and
    # eval work from any directory
    path_fields: ClassVar[tuple[str, ...]] = ()

    name: str = "teskd"

    def require(self, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                at_least: dict[str, int] | None = None) -> None:
        """One-line errors for fields that must be > 0, >= 0, or >= a given minimum (for ``validate``)."""
        for key in positive:
            if getattr(self, key) <= 0:
                raise TeskdError(f"method.{key} must be > 0, got {getattr(self, key)}")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise TeskdError(f"method.{key} must be >= 0, got {getattr(self, key)}")
        for key, low in (at_least or {}).items():
            if getattr(self, key) < low:
                raise TeskdError(f"method.{key} must be >= {low}, got {getattr(self, key)}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodParams = field(default_factory=MethodParams)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def method_params_class(name: str) -> type[MethodParams]:
    """The parameter dataclass of method ``name`` (methods register in :data:`teskd.registry.METHODS`)."""
    from teskd.registry import METHODS

    return METHODS.get(name).params_class


MAX_SHOWN = 80  # characters of a user value (or key) quoted in an error message
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a run's resolved config.yaml too
MAX_NODES = 100_000  # values in a config document, aliases counted each time they are used

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 4, 8, 8
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = MAX_SHOWN, 40, MAX_SHOWN


def _clip(text: str, limit: int = MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    """``repr(value)`` for a message: one line, bounded, without expanding a large or self-referencing value."""
    # A float's repr is exact and short (repr(1e-4) == '0.0001').
    return repr(value) if isinstance(value, float) else _clip(_REPR.repr(value))


def _short_key(key: str) -> str:
    """A dotted key for a message: ``repr`` if it would break the line, clipped."""
    return _clip(key if key.isprintable() else repr(key))


def _check_size(data: Any, where: str) -> None:
    """Reject a document with more than ``MAX_NODES`` values once YAML aliases are expanded: a few hundred
    bytes of nested anchors stand for millions of values, which validation, messages and saving would walk."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise TeskdError(f"{where} has more than {MAX_NODES:,} values once its YAML aliases (*name) are "
                             f"expanded; a config needs a few dozen (is it an alias bomb?)")
        if isinstance(node, dict):
            stack += [*node.keys(), *node.values()]
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""

    def bad(expected: str | None = None) -> TeskdError:
        expected = expected or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        return TeskdError(f"config key {_short_key(key)!r}: expected {expected}, got {_short(value)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                with contextlib.suppress(TeskdError):
                    return _coerce(value, arg, key)
        raise bad()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if tp is Any or (tp is bool and isinstance(value, bool)) or (tp is int and is_int) \
            or (tp is str and isinstance(value, str)):
        return value
    if tp is float and (is_int or isinstance(value, (float, str))):  # YAML 1.1 reads "5e-4" (no dot) as a str
        try:
            number = float(value)
        except ValueError:
            raise bad() from None
        if not math.isfinite(number):  # no setting of this project means anything at nan or inf
            raise bad("a finite number")
        return number
    raise bad()


def _build(cls: type, data: Any, prefix: str) -> Any:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise TeskdError(f"config section {_short_key(prefix or '<root>')!r}: expected a mapping, got {_short(data)}")
    if cls is MethodParams:
        name = data.get("name", MethodParams.name)
        if not isinstance(name, str):
            raise TeskdError(f"config key 'method.name': expected str, got {_short(name)}")
        cls = method_params_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        valid = ", ".join(f"{where}{k}" for k in fields)
        name = _short_key(str(unknown[0]))  # one line, bounded length
        raise TeskdError(f"unknown config key {_short_key(where)}{name}; valid keys here: {valid}")
    kwargs = {}
    for name in fields:
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):  # sections are always built, so `method` gets its own class
            kwargs[name] = _build(tp, data.get(name), key)
        elif name in data:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dotted(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1, "c": {}}``: the dotted keys of ``key=value`` overrides (an
    empty section stays a value, so that setting it to ``{}`` is a change too)."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.update(dotted(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def from_dict(data: dict, overrides: Sequence[str] = ()) -> Config:
    """Build and validate a Config from a mapping (a YAML file's, a checkpoint's), after ``key=value`` overrides."""
    _check_size(data, "the config")
    data = copy.deepcopy(data)
    for text in overrides:
        apply_override(data, *parse_override(text))
    if overrides:  # each value was checked alone; together they can still add up
        _check_size(data, "the config with its overrides")
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML (``1e-4`` is a float))."""
    if "=" not in text:
        raise TeskdError(f"override {_short(text)} is not of the form key=value (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise TeskdError(f"override {_short(text)} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except Exception:  # YAML errors, and values YAML recognises but cannot build (2001-02-30, !!int x)
        value = raw
    _check_size(value, f"the value of override {_short_key(key.strip())}")
    return parts, value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise TeskdError(f"override key {_short_key('.'.join(parts))!r}: "
                             f"{_short_key('.'.join(parts[: i + 1]))!r} is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: Path, what: str, limit: int = MAX_CONFIG_BYTES) -> Any:
    """The YAML document of a user's file (a config, a sweep file): a regular file of at most ``limit`` bytes,
    parsed safely, its alias-expanded size checked; any problem is one TeskdError line naming ``what``."""
    if not path.exists():
        raise TeskdError(f"{what} not found: {path}")
    from teskd import fileio

    text = fileio.read_text(path, what, limit)  # regular files only: a FIFO cannot hang us
    try:
        data = yaml.safe_load(text)
    except Exception as exc:  # also values YAML recognises but cannot build, deep nesting, bad bytes
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TeskdError(f"{what} {path} is not valid YAML: {_clip(detail, 200)}") from exc
    _check_size(data, f"{what} {path}")
    return data


def _read_yaml(path: Path) -> dict:
    data = read_yaml(path, "config file")
    if data is None:  # an empty file, only comments, or a bare `null`: most likely not what was meant
        raise TeskdError(f"config file {path} is empty (no settings, only comments or null); put settings "
                         f"in it, or give no config file to start from the defaults")
    if not isinstance(data, dict):
        raise TeskdError(f"config file {path} must hold a mapping at the top level, got {_short(data)}")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, validate."""
    return from_dict(_read_yaml(Path(path)) if path is not None else {}, overrides)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def expand_path(text: str) -> Path:
    """Expand ``${VAR}``, ``${VAR:-default}`` (an unset or empty VAR takes the default) and ``~``."""

    def repl(match: re.Match) -> str:
        return os.environ.get(match.group(1)) or match.group(2) or ""

    return Path(os.path.expanduser(re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", repl, text)))


def resolve_data_root(data: DataConfig) -> Path:
    """``data.root`` (or, if null, ``${TESKD_DATA:-./data}/<data.dataset>``) expanded and made absolute
    against the current directory (symlinks are kept as they are)."""
    text = data.root if data.root is not None else f"${{TESKD_DATA:-./data}}/{data.dataset}"
    return expand_path(text).absolute()


# Bounds of values that pass the type checks but would crash (or run absurdly) later.
MAX_SEED = 2**32 - 1  # np.random.seed takes [0, 2**32 - 1] (torch takes < 2**64); one range for all three RNGs
# Each batch is padded in memory (B x 3 x (H + 2p) x (W + 2p) bytes); beyond the image size a padding only adds
# all-black crops, and 64 is twice CIFAR's.
MAX_CROP_PADDING = 64
# On the peak rate (gamma > 1 raises lr at each milestone). SGD's float32 cast overflows above ~3.4e38, and any
# rate diverges long before; SGD's largest rates in use (~25) are far below 1e3.
MAX_LR = 1e3
MAX_WEIGHT_DECAY = 1.0  # 2000x the paper's 5e-4; it wipes the weights out at lr >= 1
MAX_THREADS = 4096  # torch.set_num_threads overflows at 2**31; no machine has more hardware threads than this
MAX_CUDA_INDEX = 127  # torch keeps device indices in an int8 ("cuda:99999" becomes cuda:-97)
_DEVICE = re.compile(r"auto|cpu|cuda(?::(0|[1-9][0-9]{0,2}))?")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise TeskdError(message)


def _peak_lr_log10(o: OptimConfig, s: ScheduleConfig, epochs: int) -> float:
    """log10 of the largest learning rate the schedule reaches (in logs: gamma ** k may overflow)."""
    if s.name != "step" or s.gamma <= 1:
        return math.log10(o.lr)  # step with gamma <= 1, cosine and warm-up factors are all <= 1
    reached = sum(1 for m in s.milestones if m < epochs)  # 0-based epoch e uses gamma ** #(m <= e)
    return math.log10(o.lr) + reached * math.log10(s.gamma)


def validate(cfg: Config) -> None:
    d, t, o, s = cfg.data, cfg.train, cfg.optim, cfg.schedule
    v = _short
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {v(t.epochs)}")
    _check(0 <= t.seed <= MAX_SEED, f"train.seed must be in [0, 2**32 - 1] (numpy's seed range), got {v(t.seed)}")
    _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {v(d.batch_size)}")
    _check(d.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {v(d.eval_batch_size)}")
    for key, k in (("subset_per_class", d.subset_per_class), ("test_subset_per_class", d.test_subset_per_class)):
        _check(k is None or k >= 1, f"data.{key} must be >= 1 (or null for all), got {v(k)}")
    _check(d.val_per_class >= 0, f"data.val_per_class must be >= 0, got {v(d.val_per_class)}")
    _check(d.image_size is None or 8 <= d.image_size <= 4096, f"data.image_size must be in [8, 4096], got {v(d.image_size)}")
    _check(d.eval_resize is None or (d.eval_resize >= (d.image_size or 8) and d.eval_resize <= 4096),
           f"data.eval_resize must be >= data.image_size and <= 4096, got {v(d.eval_resize)}")
    _check(0 <= d.workers <= 256, f"data.workers must be in [0, 256], got {v(d.workers)}")
    _check(d.on_bad_image in ("stop", "skip"), f"data.on_bad_image must be stop or skip, got {v(d.on_bad_image)}")
    _check(t.checkpoint_minutes is None or t.checkpoint_minutes >= 0,
           f"train.checkpoint_minutes must be >= 0 (or null), got {v(t.checkpoint_minutes)}")
    _check(0 <= d.crop_padding <= MAX_CROP_PADDING,
           f"data.crop_padding must be in [0, {MAX_CROP_PADDING}] (pixels of zero padding before the random "
           f"crop), got {v(d.crop_padding)}")
    _check(cfg.model.width_mult > 0, f"model.width_mult must be > 0, got {v(cfg.model.width_mult)}")
    _check(0 < o.lr <= MAX_LR, f"optim.lr must be > 0 and <= {MAX_LR:g}, got {v(o.lr)}")
    _check(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {v(o.momentum)}")
    _check(0 <= o.weight_decay <= MAX_WEIGHT_DECAY,
           f"optim.weight_decay must be in [0, {MAX_WEIGHT_DECAY:g}], got {v(o.weight_decay)}")
    _check(not o.nesterov or o.momentum > 0, "optim.nesterov=true needs optim.momentum > 0")
    _check(s.name in ("step", "cosine"), f"schedule.name must be 'step' or 'cosine', got {v(s.name)}")
    _check(s.gamma > 0, f"schedule.gamma must be > 0, got {v(s.gamma)}")
    _check(s.warmup_epochs >= 0, f"schedule.warmup_epochs must be >= 0, got {v(s.warmup_epochs)}")
    _check(all(m >= 1 for m in s.milestones) and s.milestones == sorted(s.milestones),
           f"schedule.milestones must be increasing epochs >= 1, got {v(s.milestones)}")
    peak = _peak_lr_log10(o, s, t.epochs)
    _check(peak <= math.log10(MAX_LR),
           f"schedule.gamma={v(s.gamma)} > 1 raises the learning rate at each milestone before train.epochs, "
           f"to about 1e{peak:.0f} (optim.lr * gamma ** milestones); the peak must be <= {MAX_LR:g}")
    _check(t.amp in ("auto", "off", "bf16", "fp16"), f"train.amp must be auto, off, bf16 or fp16, got {v(t.amp)}")
    match = _DEVICE.fullmatch(t.device)
    _check(match is not None and int(match.group(1) or 0) <= MAX_CUDA_INDEX,
           f"train.device must be auto, cpu, cuda or cuda:N (N in 0..{MAX_CUDA_INDEX}), got {v(t.device)}")
    _check(0 <= t.threads <= MAX_THREADS,
           f"train.threads must be in [0, {MAX_THREADS}] (0: torch's default), got {v(t.threads)}")
    _check(t.eval_every >= 1, f"train.eval_every must be >= 1, got {v(t.eval_every)}")
    _check(t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {v(t.checkpoint_every)}")
    if callable(getattr(cfg.method, "validate", None)):  # a method's own checks
        cfg.method.validate()
