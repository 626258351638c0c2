"""SIGTERM/SIGINT: finish the current step, save, and stop with a message saying how to resume."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from teskd.errors import TeskdError


class Interrupted(TeskdError):
    """Training stopped by SIGTERM/SIGINT after saving a resumable checkpoint (exit code 128 + signal)."""

    def __init__(self, signal_name: str, epoch: int, step: int, run_dir: Path):
        self.exit_code = 128 + getattr(signal, signal_name)
        where = f"at epoch {epoch + 1}, batch {step}" if step else f"after epoch {epoch}"
        super().__init__(f"{signal_name} received: stopped {where}, after saving "
                         f"{run_dir / 'checkpoints' / 'last.pt'}; continue with: teskd train --resume {run_dir}")


@contextmanager
def stop_on_signals(owner):
    """SIGTERM/SIGINT set ``owner.stop_signal``: the loop saves and stops after the current step.

    A second signal stops at once (KeyboardInterrupt). Nested in another ``stop_on_signals`` (a sweep
    around its runs), a stop already asked for is inherited and a signal received is also the outer
    owner's. Outside the main thread signals cannot be caught, so nothing is installed there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    outer = getattr(signal.getsignal(signal.SIGTERM), "stop_owner", None)  # e.g. a sweep around a run
    if outer is not None and outer.stop_signal and not owner.stop_signal:
        owner.stop_signal = outer.stop_signal  # a stop asked for before this loop began

    def handler(signum, _frame):
        if outer is not None and not outer.stop_signal:  # the enclosing loop stops too once this one has
            outer.stop_signal = signal.Signals(signum).name
        if owner.stop_signal:
            raise KeyboardInterrupt
        owner.stop_signal = signal.Signals(signum).name

    handler.stop_owner = owner
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
