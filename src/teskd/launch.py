"""The composition root of a run: config -> data -> method -> optimizer -> run folder -> trainer with its
callbacks (:func:`assemble`), and the folder checks ``teskd train`` and :func:`teskd.train` share."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

from teskd.config import Config, expand_path, from_dict, load_config, resolve_data_root, to_dict
from teskd.errors import TeskdError
from teskd.log import log
from teskd.spelling import CLI, Spelling


def _config(config, overrides: list[str]) -> Config:
    """``config``: a YAML path, a :class:`Config`, a dict of settings, or None (the defaults)."""
    if isinstance(config, Config):
        return from_dict(to_dict(config), overrides)
    if isinstance(config, dict):
        return from_dict(config, overrides)
    return load_config(config, overrides)


def _default_out(config) -> Path:
    stem = Path(config).stem if isinstance(config, (str, Path)) else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_run(config=None, overrides: list[str] = (), out=None, resume: bool = False,
              overwrite: bool = False, spelling: Spelling = CLI) -> dict:
    """Train into ``out`` (default ``runs/<config>-<time>``) and return the summary.

    ``resume``: continue ``out`` from its last checkpoint (its own config.yaml and then ``overrides``); with
    ``config`` too, a folder that has not started yet starts from it (a requeued job's idempotent command).
    ``overwrite``: replace ``out`` if it is a teskd run (never a folder holding anything else).
    ``spelling``: :data:`CLI` or :data:`API`, how errors name these options.
    """
    from teskd.engine import distributed, runtime

    overrides = list(overrides)
    if resume and overwrite:
        raise TeskdError(f"{spelling.resume} and {spelling.overwrite} contradict each other; pass one of them")
    cfg, run = (_resumed if resume else _started)(config, overrides, out, overwrite, spelling)
    distributed.barrier()  # every rank has checked the folder before any rank writes to it
    log.info(f"run directory: {run.path}")
    trainer = assemble(cfg, run.path, resume=resume, overwrite=overwrite)
    if runtime.keeps_nchw(trainer.method):
        log.info(runtime.NCHW_NOTE)
    summary = trainer.run()
    log.info(f"done: {trainer.method.deploy_branch} top-1 last {summary['deployed_top1_last']:.2f}%, "
             f"best {summary['deployed_top1_best']:.2f}% (epoch {summary['best_epoch']}, "
             f"selected on {summary['selected_on']}); deployable weights: {run.deployed}")
    return {**summary, "run_dir": str(run.path)}


def _resumed(config, overrides: list[str], out, overwrite: bool, spelling: Spelling = CLI):
    """The config and folder of ``--resume out``: the folder's own config.yaml, or ``config`` for a folder
    that has not started yet."""
    from teskd.engine.rundir import RunDir

    if out is None:
        raise TeskdError("resuming needs the run directory to continue")
    run = RunDir(out)
    if run.config.is_file():
        return load_config(run.config, overrides), run
    if run.path.exists() and not run.path.is_dir():
        raise TeskdError(f"cannot resume {run.path}: it is an existing file, not a run directory")
    foreign = run.foreign_entries()
    if foreign:  # never adopted, with or without a config: neither resuming nor starting it can be suggested
        raise TeskdError(f"cannot resume {run.path}: it is not a teskd run directory ({_holds(run.path, foreign)}); "
                         f"{spelling.resume} continues a folder written by teskd train (with {run.config.name}); "
                         f"to train on images, give their folder as data.root; for a new run, choose a new or "
                         f"empty {spelling.out}")
    if config is None:
        what = "no such run directory" if not run.path.exists() else \
            f"it has no {run.config.name}, so it is not a teskd run directory"
        raise TeskdError(f"cannot resume {run.path}: {what} (to start it when it does not exist yet, as a "
                         f"requeued job does, pass the config too: {spelling.start_command(run.path)})")
    # this run has not written its config yet: start it
    log.info(f"{run.path} has no {run.config.name} yet: starting it from {config}")
    return _config(config, overrides), run


def _started(config, overrides: list[str], out, overwrite: bool, spelling: Spelling = CLI):
    """The config and folder of a new run (``overwrite``: the folder may hold a teskd run to replace)."""
    from teskd.engine.rundir import RunDir

    cfg = _config(config, overrides)
    run = RunDir(out if out is not None else _default_out(config))
    if run.path.exists() and not run.path.is_dir():
        raise TeskdError(f"{spelling.out_is(run.path)} is an existing file, not a run directory; "
                         f"choose another {spelling.out}")
    if not run.is_empty():
        foreign = [] if run.config.is_file() else run.foreign_entries()  # a run folder may hold notes: resumable
        if foreign and not overwrite:  # suggesting resume or overwrite here would only lead to their refusal
            raise TeskdError(f"{spelling.out_is(run.path)} is not a teskd run directory "
                             f"({_holds(run.path, foreign)}); choose a new or empty {spelling.out}")
        if not overwrite:
            resume = f"{spelling.resume} {run.path}" if spelling is CLI else spelling.resume
            raise TeskdError(f"run directory {run.path} already exists and is not empty; "
                             f"use {resume} to continue it or {spelling.overwrite} to replace it")
        # a teskd run and nothing else; it is replaced only once the new run starts
        run.check_replaceable(spelling.overwrite.removesuffix("=True"), spelling.out)
    return cfg, run


def _holds(folder: Path, foreign: list[str]) -> str:
    """``it holds a.png, b.png, which teskd did not write: a folder of images?``: what a refusal is about."""
    from teskd.data.decode import IMAGE_SUFFIXES

    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")

    def has_images(sub: Path) -> bool:  # a look at a few entries of a class folder, not a walk
        try:
            return sub.is_dir() and any(e.name.lower().endswith(IMAGE_SUFFIXES)
                                        for _, e in zip(range(20), sub.iterdir()))
        except OSError:
            return False

    images = any(name.lower().endswith(IMAGE_SUFFIXES) for name in foreign) or any(
        has_images(folder / name) for name in foreign[:20])
    return f"it holds {shown}, which teskd did not write" + (": a folder of images?" if images else "")


def resolved(cfg: Config) -> Config:
    """A copy of ``cfg`` with its paths absolute (the data folder, the method's and model's files), as a run
    stores it: the run then works from any directory. ``cfg`` itself is left as it was."""
    cfg = copy.deepcopy(cfg)
    cfg.data.root = str(resolve_data_root(cfg.data))
    for name in cfg.method.path_fields:
        if getattr(cfg.method, name):
            setattr(cfg.method, name, str(expand_path(getattr(cfg.method, name)).absolute()))
    if cfg.model.pretrained:
        cfg.model.pretrained = str(expand_path(cfg.model.pretrained).absolute())
    return cfg


def assemble(cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False):
    """The :class:`~teskd.engine.trainer.Trainer` of ``cfg`` writing into ``run_dir``: data, method and
    optimizer built (seeded, under the run's torch settings), with ``teskd train``'s callbacks. Nothing is
    written yet: the trainer prepares the folder once it holds its lock."""
    from teskd.engine import distributed, runtime
    from teskd.engine.rundir import RunDir
    from teskd.engine.step import Optimization, make_optimizer
    from teskd.engine.tensorboard import summary_writer_class
    from teskd.engine.trainer import RunParts, Trainer
    from teskd.log import log
    from teskd.run_callbacks import run_callbacks

    check_names(cfg)  # before anything is read: a wrong name is not found after minutes, or hidden by a wrong path
    cfg, rundir = resolved(cfg), RunDir(run_dir)
    if cfg.train.tensorboard and distributed.is_primary():
        summary_writer_class()  # a missing tensorboard fails here: before the data, the model or the folder
    place, world = runtime.placement(cfg.train), distributed.world_size()
    with runtime.settings(cfg.train, place.device):
        runtime.seed_everything(cfg.train.seed)
        data, method, model = _data_and_model(cfg, place, world)
        rng = runtime.rng_state()  # training continues the RNG streams from here
    if world > 1:
        log.info(f"{world} processes: global batch {cfg.data.batch_size} = {world} x "
                 f"{cfg.data.batch_size // world} per process")
    opt = Optimization(make_optimizer(method, cfg.optim), place.device, place.amp_dtype)
    parts = RunParts(cfg, data, method, model, opt, place, world, _input_size(cfg), checkpoint_minutes(cfg),
                     rng)
    return Trainer(parts, rundir.path, resume=resume, overwrite=overwrite, callbacks=run_callbacks(rundir, cfg))


def check_names(cfg: Config) -> None:
    """``data.dataset`` and ``model.arch`` name something teskd knows (plug-ins have registered theirs by now), a
    library network (tv:NAME, timm:NAME) one its library has. Asked before the data is read: found while building
    the model, a wrong name came after loading the data (16 s for CIFAR), or never, behind a wrong data path."""
    from teskd.config import _short
    from teskd.data.registry import DATASETS
    from teskd.models.library_models import check_library_arch, is_library_arch
    from teskd.models.registry import BACKBONES

    if not isinstance(cfg.data.dataset, str) or cfg.data.dataset not in DATASETS:
        raise TeskdError(f"data.dataset: unknown dataset {_short(cfg.data.dataset)}; {DATASETS.known}: "
                         f"{', '.join(DATASETS.names())}")
    if is_library_arch(cfg.model.arch):
        check_library_arch(cfg.model.arch)
    elif cfg.model.arch not in BACKBONES:
        raise TeskdError(f"model.arch: unknown architecture {_short(cfg.model.arch)}; known: "
                         f"{', '.join(BACKBONES.names())}{BACKBONES.more}")


def _data_and_model(cfg: Config, place, world: int):
    """This process's loaders, then the method built for them (pretrained weights read) and placed."""
    from teskd.build import assemble_model
    from teskd.data.pipeline import build_data
    from teskd.engine import distributed

    data = build_data(per_rank(cfg.data, world), place.device, cfg.train.seed, rank=distributed.rank(),
                      world_size=world)
    method, model = assemble_model(cfg, data.num_classes, place, pretrained=True, distributed_ok=True,
                                   train_samples=data.train.dataset_size, world=world)
    if method.batch_pairing is not None:  # e.g. CS-KD: each batch followed by same-class partners
        from teskd.data.loader import PAIRINGS

        if method.batch_pairing not in PAIRINGS:
            raise TeskdError(f"method {cfg.method.name} asks for unknown batch pairing {method.batch_pairing!r}")
        data.train.pair_batches(method.batch_pairing)
    return data, method, model


def _input_size(cfg: Config) -> int:
    from teskd.data.pipeline import input_size

    return input_size(cfg.data)


def checkpoint_minutes(cfg: Config) -> float:
    """``train.checkpoint_minutes``, or the dataset's own interval (its spec: none for in-memory data, whose
    epochs take seconds; 30 minutes for data read from files, whose epochs take hours)."""
    from teskd.data.registry import get_dataset_spec

    if cfg.train.checkpoint_minutes is not None:
        return cfg.train.checkpoint_minutes
    return get_dataset_spec(cfg.data.dataset).checkpoint_minutes


def per_rank(data, world: int):
    """The data config one process loads: the configured (global) batch sizes split over ``world`` ranks."""
    if world == 1:
        return data
    if data.batch_size % world:
        raise TeskdError(f"data.batch_size={data.batch_size} is the global batch: it must divide evenly over "
                         f"{world} processes (e.g. {data.batch_size // world * world or world})")
    return dataclasses.replace(data, batch_size=data.batch_size // world,
                               eval_batch_size=max(1, -(-data.eval_batch_size // world)))
