"""A sweep file -> the runs it plans (names, configs, overrides, folders), checked before anything trains.

A sweep file::

    out: runs/reduced                  # parent of the run folders
    base: configs/cifar100/resnet18_ce.yaml   # the config of every run that names none
    overrides: [data.subset_per_class=100]    # key=value overrides of every run
    seeds: [0, 1]                      # optional; default: the config's own train.seed
    runs:                              # named variants, in this order
      ce: {}
      teskd: {config: configs/cifar100/resnet18_teskd.yaml, overrides: [method.detach_teacher=true]}
    grid:                              # optional: every combination, for every variant
      train.epochs: [15, 30]
    launcher: {partition: gpu, time: 240}   # optional: Slurm resources (teskd.launchers.slurm.RESOURCES)

Relative paths (``out``, ``base``, ``config``) are relative to the current directory, as in ``teskd train``.
Each run is ``<out>/<variant>[-<grid tag>...]-s<seed>``; runs go variant by variant, then grid combination
(the first grid key varying slowest), then seed. A run's overrides are, later ones winning: the common
``overrides``, the variant's ``overrides``, its grid values, then ``train.seed=<seed>``. Each run is trained
through the same code as ``teskd train CONFIG OVERRIDES --out RUN --resume RUN``: fresh when RUN has no
checkpoint, resumed otherwise; a run whose summary.json has the configured epochs is skipped unbuilt.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from teskd import fileio
from teskd.config import _short, load_config, parse_override, read_yaml
from teskd.errors import TeskdError
from teskd.launch import check_names

SWEEP_KEYS = ("out", "base", "overrides", "seeds", "runs", "grid", "launcher")
VARIANT_KEYS = ("config", "overrides")
# The most runs one sweep file may plan: each is trained one after another, so more is a typo in the grid
# (the product of its value counts is computed before anything is expanded: 10**12 would not fit in memory).
MAX_PLANNED_RUNS = 10_000
# Grid tags: train.epochs=15 -> e15, model.width_mult=0.25 -> w0.25, model.arch=resnet34 -> resnet34; any
# other key -> <last part of the key>=<value> (the whole key where two grid keys share their last part).
SHORT_TAGS = {"train.epochs": "e", "model.width_mult": "w", "optim.lr": "lr", "optim.weight_decay": "wd",
              "data.batch_size": "bs", "data.subset_per_class": "spc", "model.arch": "", "data.dataset": "",
              "method.name": ""}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class PlannedRun:
    name: str
    variant: str
    grid: tuple  # ((key, value), ...)
    seed: int
    config: Path
    overrides: tuple  # key=value strings, in the order applied
    out: Path  # the run folder
    epochs: int  # train.epochs of the config the sweep builds

    def command(self) -> str:
        """The equivalent ``teskd train`` command line (run from the same directory)."""
        return shlex.join(["teskd", "train", str(self.config), *self.overrides,
                           "--out", str(self.out), "--resume", str(self.out)])


@dataclass(frozen=True)
class Sweep:
    path: Path
    out: Path
    runs: tuple  # PlannedRun, in running order
    launcher: dict = field(default_factory=dict)  # the file's `launcher:` section (Slurm resources), unchecked


# --- the sweep file -------------------------------------------------------------------------------------

def override_text(key: str, value: Any) -> str:
    """``key=value`` that the override parser reads back as ``value`` (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    if text.endswith("\n..."):  # a plain scalar's document end marker
        text = text[: -len("\n...")].strip()
    return f"{key}={text}"


def _tag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, (list, tuple)):
        return "_".join(map(_tag_value, value))
    if isinstance(value, dict):
        return "_".join(f"{k}{_tag_value(v)}" for k, v in value.items())
    return str(value)


def grid_tag(key: str, value: Any, keys: list[str]) -> str:
    """The part of a run name for one grid value (see ``SHORT_TAGS``), made safe for a folder name."""
    if key in SHORT_TAGS:
        tag = f"{SHORT_TAGS[key]}{_tag_value(value)}"
    else:
        leaf = key.rsplit(".", 1)[-1]
        name = leaf if sum(k.rsplit(".", 1)[-1] == leaf for k in keys) == 1 else key
        tag = f"{name}={_tag_value(value)}"
    return _TAG_UNSAFE.sub("_", tag).strip("_") or "_"


def _read_yaml(path: Path) -> Any:
    if path.exists() and not path.is_file():
        raise TeskdError(f"sweep file {path} is not a file")
    return read_yaml(path, "sweep file", fileio.RUN_FILE_LIMIT)


def _string_list(value: Any, what: str, fail: Callable[[str], TeskdError]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(f"{what} must be a list of key=value strings, e.g. [train.epochs=30], got {_short(value)}")
    for text in value:
        try:
            parse_override(text)
        except TeskdError as exc:
            raise fail(f"{what}: {exc}") from exc
    return list(value)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _sets_seed(overrides: list[str]) -> bool:
    return any(text.split("=", 1)[0].strip() == "train.seed" for text in overrides)


Fail = Callable[[str], TeskdError]


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and validate a whole sweep file, building every run's config with the normal config loader;
    any problem is one TeskdError line naming the file (and the run)."""
    path = Path(path)

    def fail(message: str) -> TeskdError:
        return TeskdError(f"sweep file {path}: {message}")

    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise fail(f"expected a mapping with keys {', '.join(SWEEP_KEYS)}, got {_short(data)}")
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise fail(f"unknown key {_short(unknown[0])}; valid keys: {', '.join(SWEEP_KEYS)}")
    out = _out_folder(data.get("out"), fail)
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        raise fail(f"'base' must be a config file path, got {_short(base)}")
    common = _string_list(data.get("overrides"), "overrides", fail)
    seeds = _seeds(data.get("seeds"), common, fail)
    grid = _grid(data.get("grid") or {}, fail)
    variants = data.get("runs")
    if not isinstance(variants, dict) or not variants:
        raise fail("'runs' (named variants, e.g. runs: {ce: {}, teskd: {config: ...}}) is missing or empty")
    _check_count(len(variants), grid, seeds, fail)
    runs, names = [], {}
    for variant, spec in variants.items():
        config, own = _variant(variant, spec, base, seeds, fail)
        runs += _variant_runs(variant, config, [*common, *own], grid, seeds, out, names, fail)
    launcher = data.get("launcher") or {}
    if not isinstance(launcher, dict):
        raise fail(f"'launcher' must be a mapping (e.g. launcher: {{partition: gpu, time: 240}}), got {_short(launcher)}")
    return Sweep(path, out, tuple(runs), launcher)


def _out_folder(out: Any, fail: Fail) -> Path:
    if not isinstance(out, str) or not out.strip():
        raise fail("'out' (the folder the run folders go into, e.g. out: runs/sweep) is missing or not a path")
    if Path(out).exists() and not Path(out).is_dir():
        raise fail(f"out: {out} is an existing file, not a folder")
    return Path(out)


def _seeds(seeds: Any, common: list[str], fail: Fail) -> list[int] | None:
    if seeds is None:
        return None
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise fail(f"'seeds' must be a non-empty list of integers >= 0, e.g. [0, 1, 2], got {_short(seeds)}")
    if len(set(seeds)) < len(seeds):
        raise fail(f"'seeds' repeats a seed: {seeds}")
    if _sets_seed(common):
        raise fail("overrides set train.seed, and 'seeds' sets it too; give the seeds in 'seeds' only")
    return seeds


def _grid(grid: Any, fail: Fail) -> dict:
    if not isinstance(grid, dict):
        raise fail(f"'grid' must be a mapping of config keys to lists of values, got {_short(grid)}")
    for key, values in grid.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise fail(f"grid key {_short(key)} is not a dotted config key such as train.epochs")
        if key == "train.seed":
            raise fail("grid key train.seed: give the seeds in 'seeds' instead")
        if not isinstance(values, list) or not values:
            raise fail(f"grid key {key}: expected a non-empty list of values, got {_short(values)}")
        for value in values:
            if parse_override(override_text(key, value))[1] != value:
                raise fail(f"grid key {key}: the value {_short(value)} cannot be written as an override")
    return grid


def _check_count(variants: int, grid: dict, seeds: list[int] | None, fail: Fail) -> None:
    """Counted before anything is expanded: a typo in the grid must not fill the memory."""
    points, n_seeds = math.prod(len(v) for v in grid.values()), len(seeds or [None])
    planned = variants * points * n_seeds
    if planned > MAX_PLANNED_RUNS:
        raise fail(f"it plans {planned:,} runs ({_count(variants, 'variant')} x "
                   f"{_count(points, 'grid combination')} x {_count(n_seeds, 'seed')}), more than the "
                   f"{MAX_PLANNED_RUNS:,} one sweep file may plan; split it into several sweep files")


def _variant(variant: Any, spec: Any, base: str | None, seeds, fail: Fail) -> tuple[str, list[str]]:
    """A variant's config file and own overrides, checked."""
    if not isinstance(variant, str) or not _NAME.fullmatch(variant):
        raise fail(f"run name {_short(variant)} must be letters, digits, '.', '_' or '-' (a folder name)")
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise fail(f"run {variant}: expected a mapping with {' and/or '.join(VARIANT_KEYS)}, got {_short(spec)}")
    bad = [k for k in spec if k not in VARIANT_KEYS]
    if bad:
        raise fail(f"run {variant}: unknown key {_short(bad[0])}; valid keys: {', '.join(VARIANT_KEYS)}")
    config = spec.get("config", base)
    if config is None:
        raise fail(f"run {variant} has no config, and the sweep has no 'base' config")
    if not isinstance(config, str):
        raise fail(f"run {variant}: config must be a file path, got {_short(config)}")
    own = _string_list(spec.get("overrides"), f"run {variant}: overrides", fail)
    if seeds is not None and _sets_seed(own):
        raise fail(f"run {variant}: its overrides set train.seed, and 'seeds' sets it too")
    return config, own


def _variant_runs(variant: str, config: str, overrides: list[str], grid: dict, seeds, out: Path,
                  names: dict, fail: Fail) -> list[PlannedRun]:
    """A variant's runs, grid combination by combination (the first key slowest), then seed; ``names``
    (name -> what planned it) catches two runs that would share a folder."""
    keys, runs = list(grid), []
    for values in itertools.product(*grid.values()):
        combo = tuple(zip(keys, values))
        tags = [grid_tag(k, v, keys) for k, v in combo]
        for seed in (seeds if seeds is not None else [None]):
            full = [*overrides, *(override_text(k, v) for k, v in combo)]
            full += [f"train.seed={seed}"] if seed is not None else []
            try:
                cfg = load_config(config, full)
                check_names(cfg)  # a wrong dataset or arch is refused before --dry-run shows it or a run starts
            except TeskdError as exc:
                raise fail(f"run {variant}: {exc}") from exc
            name = "-".join([variant, *tags, f"s{cfg.train.seed}"])
            if name in names:
                raise fail(f"two runs are both named {name} ({names[name]} and {variant}, "
                           f"{dict(combo)}); give the variants or grid values distinct names")
            names[name] = f"{variant}, {dict(combo)}"
            runs.append(PlannedRun(name, variant, combo, cfg.train.seed, Path(config), tuple(full), out / name,
                                   cfg.train.epochs))
    return runs


def select(runs, pattern: str | None) -> list[PlannedRun]:
    """The runs whose name matches the fnmatch ``pattern`` (all without one); none matching is an error."""
    runs = list(runs)
    if pattern is None:
        return runs
    chosen = [r for r in runs if fnmatch.fnmatchcase(r.name, pattern)]
    if not chosen:
        shown = ", ".join(r.name for r in runs[:6]) + (", ..." if len(runs) > 6 else "")
        raise TeskdError(f"--only {pattern!r} matches none of the sweep's {len(runs)} runs ({shown})")
    return chosen


