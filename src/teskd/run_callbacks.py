"""The end-of-epoch and end-of-run work of ``teskd train``, as trainer callbacks (assembled by
:mod:`teskd.launch`, in this order): TensorBoard events, the exported network, ``summary.json``,
``curves.png``. Each writes into the run folder (:class:`teskd.engine.rundir.RunDir` names the files)."""

from __future__ import annotations

import json

from teskd import fileio
from teskd.config import Config, to_dict
from teskd.curves import plot_curves, run_title
from teskd.deploy.safetensors_format import export_deployed
from teskd.engine.callbacks import Callback, RunEnd, RunStart
from teskd.engine.rundir import RunDir
from teskd.engine.tensorboard import TensorBoardLog
from teskd.errors import one_line
from teskd.log import log


class TensorBoardEvents(Callback):
    """``train.tensorboard``: each epoch's record as events in RUN/tensorboard."""

    def __init__(self, rundir: RunDir):
        self.rundir, self.log = rundir, None

    def on_run_start(self, start: RunStart) -> None:
        # a resume redoes the epochs after its checkpoint: drop their events from a killed process
        purge = start.start_epoch + 1 if start.resumed else None
        self.log = TensorBoardLog(self.rundir.tensorboard, purge_step=purge)

    def on_epoch_end(self, record: dict) -> None:
        self.log.log_epoch(record)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


class ExportDeployed(Callback):
    """RUN/deployed.safetensors: the deployed network, with the metadata that rebuilds it."""

    def __init__(self, rundir: RunDir, cfg: Config):
        self.rundir, self.cfg = rundir, cfg

    def on_run_end(self, end: RunEnd) -> None:
        export_deployed(end.method, self.rundir.deployed, self.cfg, end.num_classes, end.classes)


class WriteSummary(Callback):
    """RUN/summary.json."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir

    def on_run_end(self, end: RunEnd) -> None:
        fileio.atomic_write_text(self.rundir.summary, json.dumps(end.summary, indent=2) + "\n")


class DrawCurves(Callback):
    """RUN/curves.png. Never fails the run: the weights and the summary are what matter."""

    def __init__(self, rundir: RunDir, cfg: Config):
        self.rundir, self.cfg = rundir, cfg

    def on_run_end(self, end: RunEnd) -> None:
        run_dir = self.rundir.path
        try:
            plot_curves(end.records, self.rundir.curves, run_title(run_dir.resolve().name, to_dict(self.cfg)),
                        end.method.deploy_branch)
        except Exception as exc:  # noqa: BLE001  (matplotlib missing or failing, a full disk, ...)
            log.info(f"curves.png not written ({one_line(exc, 200)}); draw it later: teskd curves {run_dir}")


def run_callbacks(rundir: RunDir, cfg: Config) -> list[Callback]:
    """What ``teskd train`` does besides training, in order (TensorBoard only with ``train.tensorboard``)."""
    events = [TensorBoardEvents(rundir)] if cfg.train.tensorboard else []
    return [*events, ExportDeployed(rundir, cfg), WriteSummary(rundir), DrawCurves(rundir, cfg)]
