"""What one Slurm job (array task) runs under submitit: ``teskd train ... --resume RUN`` as a child process.

Each task of the job (one per GPU: ``ntasks_per_node`` = GPUs per node) starts its own child with the
torch.distributed variables of the job exported (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK: what
torchrun sets; ``teskd train`` joins that group). Before the time limit or on preemption Slurm signals the job
(``--signal=USR2@<delay>``; SIGTERM on preemption): the task passes one SIGTERM to its child, which saves and
stops, and submitit requeues the job with this same object; the requeued job resumes the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _child_setup() -> None:
    # the scheduler's warning signal is the parent's to handle; the child stops on the SIGTERM passed on
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


class TrainJob:
    """Picklable by reference (submitit stores it in the job folder and loads it in the job)."""

    def __init__(self, argv: list[str], cwd: str, threads: int = 0):
        self.argv, self.cwd, self.threads = list(argv), cwd, threads
        self._child: subprocess.Popen | None = None
        self._stopping = False

    def __getstate__(self):
        return {"argv": self.argv, "cwd": self.cwd, "threads": self.threads}

    def __setstate__(self, state):
        self.__init__(state["argv"], state["cwd"], state["threads"])

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.threads:
            child_env["OMP_NUM_THREADS"] = str(self.threads)
        signal.signal(signal.SIGTERM, lambda *_: self._stop())  # scancel, preemption: save and stop
        self._child = subprocess.Popen([sys.executable, "-m", "teskd", *self.argv], cwd=self.cwd, env=child_env,
                                       preexec_fn=_child_setup, start_new_session=True)
        code = self._wait_child()
        if code == 0:
            return "done"
        if self._stopping or code in (128 + signal.SIGTERM, 130):
            return "stopped"  # saved; a requeued job or the next `teskd sweep` resumes it
        raise RuntimeError(f"teskd {' '.join(self.argv[:2])} ... exited with code {code}")

    def _wait_child(self) -> int | None:
        """The child's exit code. No Popen.wait: it holds a lock that this, called again from the signal
        handler interrupting it (``checkpoint``), would wait for forever."""
        child = self._child
        while child.returncode is None:
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by the other caller
                break
            if pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.2)
        return child.returncode

    def _stop(self) -> None:
        if self._child is not None and self._child.poll() is None and not self._stopping:
            self._stopping = True
            self._child.send_signal(signal.SIGTERM)

    def checkpoint(self):
        """submitit's hook on the scheduler's signal: the child saves and stops, then the job is requeued."""
        import submitit

        self._stop()
        if self._child is not None:
            self._wait_child()
        return submitit.helpers.DelayedSubmission(TrainJob(self.argv, self.cwd, self.threads))
