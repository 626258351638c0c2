"""How errors name the caller's options: as the caller wrote them, the command line's flags (``--resume``) or
the Python API's arguments (``resume=True``): an API user told to pass ``--resume`` has nothing to pass it to."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Spelling:
    """The names of the run-folder and output options in one of the two spellings."""

    resume: str
    overwrite: str
    out: str
    start: str  # the command that starts a not-yet-started folder, {} for the folder

    def start_command(self, path: Path) -> str:
        return self.start.format(str(path) if self is CLI else repr(str(path)))

    def out_is(self, path: Path) -> str:
        """``--out PATH`` or ``out='PATH'``."""
        return f"{self.out} {path}" if self is CLI else f"{self.out}={str(path)!r}"


CLI = Spelling("--resume", "--overwrite", "--out", "teskd train CONFIG --resume {}")
API = Spelling("resume=True", "overwrite=True", "out", "teskd.train(CONFIG, out={}, resume=True)")
