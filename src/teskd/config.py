"""Typed configuration: YAML files + ``key=value`` overrides, validated against dataclasses.

A config is a tree of dataclasses. Loading walks the YAML mapping and the
dataclass fields together, so unknown keys and wrong types are rejected with
the full dotted key in the message. The ``method`` section's fields depend on
``method.name``: each method registers its own parameter dataclass.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from teskd.errors import TeskdError


@dataclass
class DataConfig:
    dataset: str = "cifar100"
    root: str = "${TESKD_DATA:-data}"  # environment variables are expanded at use
    download: bool = False
    subset_per_class: int | None = None  # keep the first K training images of each class
    val_per_class: int = 0  # hold out the last K training images of each class for validation
    test_subset_per_class: int | None = None  # evaluate on the first K test images of each class (quick runs)
    batch_size: int = 128
    eval_batch_size: int = 100  # small batches are faster on CPUs (cache); raise it on a GPU
    crop_padding: int = 4
    hflip: bool = True


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    width_mult: float = 1.0


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
    deterministic: bool = False
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPUs and GPUs, same function
    compile: bool = False  # torch.compile the training and evaluation steps
    checkpoint_every: int = 0  # also save checkpoints/last.pt every N steps within an epoch (0: epoch ends only)
    progress: bool = True  # tqdm progress bars
    threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass
class MethodParams:
    """Base of every method's parameters; ``name`` selects the method."""

    name: str = "teskd"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodParams = field(default_factory=MethodParams)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --- method parameter registry -------------------------------------------------------------

_METHOD_PARAMS: dict[str, type[MethodParams]] = {}


def register_method_params(name: str):
    """Class decorator: declare the parameter dataclass of method ``name``."""

    def wrap(cls: type[MethodParams]) -> type[MethodParams]:
        _METHOD_PARAMS[name] = cls
        return cls

    return wrap


def method_params_class(name: str) -> type[MethodParams]:
    import teskd.methods  # noqa: F401  (registers the built-in methods)

    if name not in _METHOD_PARAMS:
        known = ", ".join(sorted(_METHOD_PARAMS))
        raise TeskdError(f"unknown method.name {name!r}; known methods: {known}")
    return _METHOD_PARAMS[name]


# --- conversion ------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except TeskdError as exc:
                errors.append(exc)
        raise TeskdError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TeskdError(f"config key {key!r}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise TeskdError(f"config key {key!r}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no setting of this project means anything at nan or inf
                raise TeskdError(f"config key {key!r}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise TeskdError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TeskdError(f"config section {prefix or '<root>'!r}: expected a mapping, got {data!r}")
    if cls is MethodParams:
        name = data.get("name", MethodParams.name)
        if not isinstance(name, str):
            raise TeskdError(f"config key 'method.name': expected str, got {name!r}")
        cls = method_params_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        valid = ", ".join(f"{where}{k}" for k in fields)
        name = str(unknown[0]) if str(unknown[0]).isprintable() else repr(unknown[0])  # keep it on one line
        raise TeskdError(f"unknown config key {where}{name}; valid keys here: {valid}")
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


def from_dict(data: dict, overrides: Sequence[str] = ()) -> Config:
    """Build and validate a Config from a mapping (a YAML file's, a checkpoint's), after ``key=value`` overrides."""
    data = copy.deepcopy(data)
    for text in overrides:
        apply_override(data, *parse_override(text))
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


# --- overrides -------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML (``1e-4`` is a float))."""
    if "=" not in text:
        raise TeskdError(f"override {text!r} is not of the form key=value (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise TeskdError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except Exception:  # YAML errors, and values YAML recognises but cannot build (2001-02-30, !!int x)
        value = raw
    return parts, value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise TeskdError(f"override key {'.'.join(parts)!r}: {'.'.join(parts[: i + 1])!r} is not a section")
        node = child
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise TeskdError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except Exception as exc:  # also values YAML recognises but cannot build, deep nesting, bad bytes
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TeskdError(f"config file {path} is not valid YAML: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TeskdError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, validate."""
    return from_dict(_read_yaml(Path(path)) if path is not None else {}, overrides)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def expand_path(text: str) -> Path:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``~`` in a configured path."""
    import re

    def repl(match: re.Match) -> str:
        name, default = match.group(1), match.group(3)
        return os.environ.get(name) or (default if default is not None else "")

    return Path(os.path.expanduser(re.sub(r"\$\{(\w+)(:-([^}]*))?\}", repl, text)))


# --- semantic validation ----------------------------------------------------------------------


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise TeskdError(message)


def validate(cfg: Config) -> None:
    d, t, o, s = cfg.data, cfg.train, cfg.optim, cfg.schedule
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _check(d.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {d.eval_batch_size}")
    _check(d.subset_per_class is None or d.subset_per_class >= 1,
           f"data.subset_per_class must be >= 1 (or null for all), got {d.subset_per_class}")
    _check(d.test_subset_per_class is None or d.test_subset_per_class >= 1,
           f"data.test_subset_per_class must be >= 1 (or null for all), got {d.test_subset_per_class}")
    _check(d.val_per_class >= 0, f"data.val_per_class must be >= 0, got {d.val_per_class}")
    _check(d.crop_padding >= 0, f"data.crop_padding must be >= 0, got {d.crop_padding}")
    _check(cfg.model.width_mult > 0, f"model.width_mult must be > 0, got {cfg.model.width_mult}")
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(not o.nesterov or o.momentum > 0, "optim.nesterov=true needs optim.momentum > 0")
    _check(s.name in ("step", "cosine"), f"schedule.name must be 'step' or 'cosine', got {s.name!r}")
    _check(s.gamma > 0, f"schedule.gamma must be > 0, got {s.gamma}")
    _check(s.warmup_epochs >= 0, f"schedule.warmup_epochs must be >= 0, got {s.warmup_epochs}")
    _check(all(m >= 1 for m in s.milestones) and s.milestones == sorted(s.milestones),
           f"schedule.milestones must be increasing epochs >= 1, got {s.milestones}")
    _check(t.amp in ("auto", "off", "bf16", "fp16"), f"train.amp must be auto, off, bf16 or fp16, got {t.amp!r}")
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
           f"train.device must be auto, cpu or cuda[:N], got {t.device!r}")
    _check(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")
    _check(t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {t.checkpoint_every}")
    validate_method = getattr(cfg.method, "validate", None)
    if validate_method is not None:
        validate_method()
