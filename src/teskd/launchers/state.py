"""A sweep's small state file, ``<out>/.sweep/state.json``: per run, the launcher that last started it, its
process or job id and its log file. JSON written atomically (never a pickle); the run folders remain the
truth about progress (epochs, summary), this file only says who is or was training them."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from teskd import fileio
from teskd.errors import TeskdError

FOLDER = ".sweep"  # hidden: `teskd report OUT` and `--collect` look at run folders only
STATE = "state.json"


class SweepState:
    def __init__(self, out: Path):
        self.folder = Path(out) / FOLDER
        self.path = self.folder / STATE
        self.runs: dict[str, dict] = self._read()

    def _read(self) -> dict:
        if not os.path.lexists(self.path):
            return {}
        text = fileio.read_text(self.path, "sweep state file")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TeskdError(f"sweep state file {self.path} is not valid JSON ({exc}); remove it to forget "
                             f"which jobs ran (the run folders keep all progress)") from exc
        runs = data.get("runs") if isinstance(data, dict) else None
        if not isinstance(runs, dict) or not all(isinstance(v, dict) for v in runs.values()):
            raise TeskdError(f"sweep state file {self.path} is not a teskd sweep state (no 'runs' mapping)")
        return runs

    def log_path(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    def record(self, name: str, **fields) -> None:
        """Replace what is known of run ``name`` (launcher, pid or job, log, ...) and save at once."""
        self.runs[name] = {**fields, "host": socket.gethostname(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.save()

    def update(self, name: str, **fields) -> None:
        self.runs.setdefault(name, {}).update(fields)
        self.save()

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fileio.atomic_write_bytes(self.path, (json.dumps({"runs": self.runs}, indent=1) + "\n").encode())
