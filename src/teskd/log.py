"""teskd's output: one ``logging`` logger, printed on the primary rank only.

Messages go to the *current* ``sys.stdout`` at each call (a handler bound to the stream at
set-up would miss redirections made later, by a notebook or a test), without decoration, as
the CLI has always printed them. Library users silence it with
``logging.getLogger("teskd").setLevel(logging.WARNING)``.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("teskd")


class _CurrentStdout(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except Exception:  # noqa: BLE001  (logging must never break a run)
            self.handleError(record)


class _PrimaryOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from teskd.engine import distributed

        return distributed.is_primary()


if not log.handlers:
    _handler = _CurrentStdout()
    _handler.addFilter(_PrimaryOnly())
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False
