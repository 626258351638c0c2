"""Starting, resuming or replacing a run: the folder checks ``teskd train`` and :func:`teskd.train` share."""

from __future__ import annotations

import time
from pathlib import Path

from teskd.config import Config, from_dict, load_config, to_dict
from teskd.errors import TeskdError


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
              overwrite: bool = False) -> dict:
    """Train into ``out`` (default ``runs/<config>-<time>``) and return the summary.

    ``resume``: continue ``out`` from its last checkpoint (its own config.yaml and then ``overrides``); with
    ``config`` too, a folder that has not started yet starts from it (a requeued job's idempotent command).
    ``overwrite``: replace ``out`` if it is a teskd run (never a folder holding anything else).
    """
    from teskd.engine import distributed
    from teskd.engine.rundir import RunDir
    from teskd.engine.trainer import Trainer
    from teskd.log import log

    overrides = list(overrides)
    if resume and overwrite:
        raise TeskdError("--resume and --overwrite contradict each other; pass one of them")
    if resume:
        if out is None:
            raise TeskdError("resuming needs the run directory to continue")
        run = RunDir(out)
        if run.config.is_file():
            cfg = load_config(run.config, overrides)
        elif config is None:
            what = "no such run directory" if not run.path.exists() else \
                f"it has no {run.config.name}, so it is not a teskd run directory"
            raise TeskdError(f"cannot resume {run.path}: {what} (to start it when it does not exist yet, as a "
                             f"requeued job does, pass the config too: teskd train CONFIG --resume {run.path})")
        else:  # this run has not written its config yet: start it
            if run.path.exists() and not run.path.is_dir():
                raise TeskdError(f"--resume {run.path} is an existing file, not a run directory")
            if run.foreign_entries():
                run.check_replaceable()  # raises: never adopt a folder of someone else's files
            print(f"{run.path} has no {run.config.name} yet: starting it from {config}", flush=True)
            cfg = _config(config, overrides)
    else:
        cfg = _config(config, overrides)
        run = RunDir(out if out is not None else _default_out(config))
        if run.path.exists() and not run.path.is_dir():
            raise TeskdError(f"--out {run.path} is an existing file, not a run directory; choose another --out")
        if not run.is_empty():
            if not overwrite:
                raise TeskdError(f"run directory {run.path} already exists and is not empty; "
                                 f"use --resume {run.path} to continue it or --overwrite to replace it")
            run.check_replaceable()  # a teskd run and nothing else; it is replaced only once the new run starts
    distributed.barrier()  # every rank has checked the folder before any rank writes to it
    log.info(f"run directory: {run.path}")
    trainer = Trainer(cfg, run.path, resume=resume, overwrite=overwrite)
    summary = trainer.run()
    log.info(f"done: {trainer.method.deploy_branch} top-1 last {summary['teacher_top1_last']:.2f}%, "
             f"best {summary['teacher_top1_best']:.2f}% (epoch {summary['best_epoch']}, "
             f"selected on {summary['selected_on']}); deployable weights: {run.teacher}")
    return {**summary, "run_dir": str(run.path)}
