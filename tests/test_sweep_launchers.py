"""`teskd sweep --launcher local|slurm`, `--status`, `--cancel`: real processes training tiny runs.

The local launcher runs two runs at once and must give the weights of the same runs trained one after the
other; the Slurm launcher runs against stand-ins for sbatch/srun/sacct/squeue/scancel/scontrol
(tests/fake_slurm/fake_slurm.py, put first on PATH) that run the submitted script on this machine, and a
preemption (Slurm's USR2 before the time limit) must checkpoint, requeue and finish with the weights of an
uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

CE = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")
FAKE_SLURM = REPO / "tests" / "fake_slurm" / "fake_slurm.py"
EPOCHS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """CIFAR-10 layout: 120 training images (12 steps of 10 an epoch), 10 test images."""
    root = tmp_path_factory.mktemp("data") / "cifar10"
    root.mkdir()
    g = np.random.default_rng(0)
    for split, n in (("train", 120), ("test", 10)):
        np.savez(root / f"{split}.npz", x=g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n) % 10, classes=np.array([f"c{i}" for i in range(10)]))
    return root


def write_sweep(path: Path, out: Path, data: Path, seeds=(0, 1), epochs=EPOCHS, **extra) -> Path:
    overrides = ["data.dataset=cifar10", f"data.root={data}", "data.subset_per_class=null",
                 "data.test_subset_per_class=null", "data.batch_size=10", "model.width_mult=0.0625",
                 f"train.epochs={epochs}", "train.progress=false", "train.threads=1", "train.deterministic=true"]
    path.write_text(yaml.safe_dump({"out": str(out), "base": CE, "overrides": overrides, "seeds": list(seeds),
                                    "runs": {"ce": {}}, **extra}))
    return path


def teskd(*argv, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "teskd", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{a} and {b} differ in {different[:5]}"


def epochs_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for(condition, what: str, timeout: float = 600):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextmanager
def paused(run: Path):
    """The process training ``run`` (its lock's holder) stopped (SIGSTOP) meanwhile: the signals sent to it
    then reach it mid-run however fast the machine is; it handles them when continued."""
    pid = json.loads((run / ".teskd.lock").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def sigterm_pending(pid: int) -> bool:
    """SIGTERM was sent to the (stopped) process and waits for it (Linux: /proc/PID/status)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return bool(pending & (1 << (signal.SIGTERM - 1)))


@pytest.fixture(scope="module")
def serial(data, tmp_path_factory):
    """The reference: both runs trained one after the other in one process (the default launcher)."""
    tmp = tmp_path_factory.mktemp("serial")
    path = write_sweep(tmp / "s.yaml", tmp / "runs", data)
    result = teskd("sweep", path)
    assert result.returncode == 0, result.stderr
    return tmp / "runs"


# --- local ------------------------------------------------------------------------------------------------

def test_local_two_at_once_equal_serial(data, serial, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "runs", data)
    result = teskd("sweep", path, "--launcher", "local", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CPU: ") and lines[0].endswith(
        "cores for 2 runs at once: train.threads=" + lines[0].split("train.threads=")[1])
    started = [i for i, line in enumerate(lines) if ": started (pid " in line]
    finished = [i for i, line in enumerate(lines) if line.endswith(f": done, {EPOCHS}/{EPOCHS} epochs")]
    assert len(started) == 2 and len(finished) == 2 and max(started) < min(finished)  # both ran at once
    assert lines[-1] == f"sweep {path}: 2 runs: 2 trained"
    for name in ("ce-s0", "ce-s1"):
        assert_same_weights(serial / name, tmp_path / "runs" / name)
        log = tmp_path / "runs" / ".sweep" / "logs" / f"{name}.log"
        assert f"epoch {EPOCHS}/{EPOCHS} " in log.read_text()

    status = teskd("sweep", path, "--status")
    rows = [line.split() for line in status.stdout.splitlines()]
    assert rows[0] == ["run", "state", "epoch", "launcher", "job", "log"]
    assert [r[:4] for r in rows[1:3]] == [["ce-s0", "done", f"{EPOCHS}/{EPOCHS}", "local"],
                                         ["ce-s1", "done", f"{EPOCHS}/{EPOCHS}", "local"]]
    assert rows[1][5] == str(tmp_path / "runs" / ".sweep" / "logs" / "ce-s0.log")
    again = teskd("sweep", path, "--launcher", "local", "--jobs", "2")
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == f"sweep {path}: 2 runs: 2 already done"


def test_local_sigint_saves_and_the_sweep_resumes(data, serial, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "runs", data)
    first = tmp_path / "runs" / "ce-s0"
    proc = subprocess.Popen([sys.executable, "-m", "teskd", "sweep", str(path), "--launcher", "local", "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: epochs_logged(first), "the first epoch of ce-s0")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert err.strip() == (f"error: SIGINT received: the runs saved and stopped; run `teskd sweep {path} --launcher "
                           f"local --jobs 2` again to resume (finished runs are skipped)")
    assert "ce-s0: stopped after " in out and out.splitlines()[-1].startswith(f"sweep {path}: 2 runs: ")
    assert len(epochs_logged(first)) < EPOCHS and (first / "checkpoints" / "last.pt").is_file()
    status = teskd("sweep", path, "--status")
    assert status.stdout.splitlines()[1].split()[:2] == ["ce-s0", "stopped"]

    resumed = teskd("sweep", path, "--launcher", "local", "--jobs", "2")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("ce-s0", "ce-s1"):
        assert epochs_logged(tmp_path / "runs" / name) == list(range(1, EPOCHS + 1))
        assert_same_weights(serial / name, tmp_path / "runs" / name)


def test_a_locked_run_is_reported_as_locked(data, tmp_path):
    from teskd.engine.rundir import RunDir, RunLock

    path = write_sweep(tmp_path / "s.yaml", tmp_path / "runs", data, seeds=(0,))
    with RunLock(RunDir(tmp_path / "runs" / "ce-s0")):  # another writer holds the run folder
        result = teskd("sweep", path, "--launcher", "local", "--jobs", "2")
        status = teskd("sweep", path, "--status")
    assert result.returncode == 0, result.stderr
    holder = f"locked by pid {os.getpid()} on {socket.gethostname()}, started "
    assert result.stdout.splitlines()[1].startswith(f"ce-s0: {holder}")
    assert result.stdout.splitlines()[-1] == f"sweep {path}: 1 run: 1 locked (ce-s0)"
    assert f"ce-s0  {holder}" in status.stdout
    assert not (tmp_path / "runs" / "ce-s0" / "config.yaml").exists()  # nothing trained it


def test_the_serial_sweep_reports_a_locked_run_too(data, tmp_path, capsys):
    from teskd.cli import main
    from teskd.engine.rundir import RunDir, RunLock

    path = write_sweep(tmp_path / "s.yaml", tmp_path / "runs", data, seeds=(0,))
    with RunLock(RunDir(tmp_path / "runs" / "ce-s0")):
        code = main(["sweep", str(path)])
    out = capsys.readouterr().out.splitlines()
    holder = f"locked by pid {os.getpid()} on {socket.gethostname()}, started "
    assert code == 0 and out[0].startswith(f"[1/1] ce-s0: {holder}") and out[0].endswith("; skipped")
    assert out[-1] == (f"sweep {path}: 1 runs: 0 already done, 0 trained, 0 failed, 1 locked by other processes "
                       f"(ce-s0)")


# --- slurm (stand-ins) ------------------------------------------------------------------------------------

@pytest.fixture
def slurm(tmp_path):
    """PATH with sbatch, srun, sacct, squeue, scancel and scontrol running jobs here; their state folder."""
    pytest.importorskip("submitit")
    bin_dir, state = tmp_path / "slurm-bin", tmp_path / "slurm-state"
    bin_dir.mkdir()
    state.mkdir()
    for name in ("sbatch", "srun", "sacct", "squeue", "scancel", "scontrol"):
        (bin_dir / name).symlink_to(FAKE_SLURM)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(state)}
    return env, state


def job_info(state: Path, job: str) -> dict:
    return json.loads((state / f"job-{job}.json").read_text())


def test_slurm_preemption_checkpoints_requeues_and_resumes_exactly(data, serial, tmp_path, slurm):
    env, state = slurm
    epochs = EPOCHS + 1  # the signal comes after the first epoch: three more to go
    reference = write_sweep(tmp_path / "ref.yaml", tmp_path / "ref", data, seeds=(0,), epochs=epochs)
    assert teskd("sweep", reference).returncode == 0
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "runs", data, seeds=(0,), epochs=epochs,
                       launcher={"partition": "debug", "time": 30})
    run = tmp_path / "runs" / "ce-s0"
    result = teskd("sweep", path, "--launcher", "slurm", env=env)
    assert result.returncode == 0, result.stderr
    log = tmp_path / "runs" / ".sweep" / "slurm" / "1000_0_log.out"
    assert result.stdout.splitlines() == [
        f"ce-s0: submitted as job 1000 (log {log})",
        f"sweep {path}: 1 run submitted; watch with `teskd sweep {path} --status`"]
    script = (tmp_path / "runs" / ".sweep" / "slurm" / "1000_submission.sh").read_text()
    for line in ("#SBATCH --partition=debug", "#SBATCH --time=30", "#SBATCH --requeue", "#SBATCH --signal=USR2@120"):
        assert line in script.splitlines()

    wait_for(lambda: epochs_logged(run), "the first epoch")
    with paused(run) as pid:
        status = teskd("sweep", path, "--status", env=env).stdout.splitlines()[1].split()
        assert status[:2] == ["ce-s0", "running"] and status[3:5] == ["slurm", "1000"]
        subprocess.run(["scancel", "--signal=USR2", "1000"], env=env, check=True)  # Slurm's warning before the limit
        wait_for(lambda: sigterm_pending(pid), "the job to pass SIGTERM on to teskd train")
        assert len(epochs_logged(run)) < epochs
    wait_for(lambda: job_info(state, "1000")["state"] not in ("RUNNING", "PENDING"), "the job to end")

    info = job_info(state, "1000")
    assert info["state"] == "COMPLETED" and info["requeues"] == 1
    err = (tmp_path / "runs" / ".sweep" / "slurm" / "1000_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in err and "error: SIGTERM received: stopped " in err  # saved, then stopped
    assert "Requeued job 1000 " in log.read_text()
    assert epochs_logged(run) == list(range(1, epochs + 1))
    assert_same_weights(tmp_path / "ref" / "ce-s0", run)
    status = teskd("sweep", path, "--status", env=env).stdout.splitlines()[1].split()
    assert status[:3] == ["ce-s0", "done", f"{epochs}/{epochs}"]


def test_slurm_array_cancel_then_local_resumes(data, serial, tmp_path, slurm):
    env, state = slurm
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "runs", data, launcher={"time": 30})
    result = teskd("sweep", path, "--launcher", "slurm", "--slurm", "partition=short",
                   "--slurm", "sbatch.constraint=cpu", env=env)
    assert result.returncode == 0, result.stderr
    assert [line.split(" (log")[0] for line in result.stdout.splitlines()[:2]] == [
        "ce-s0: submitted as job 1000_0", "ce-s1: submitted as job 1000_1"]
    script = (tmp_path / "runs" / ".sweep" / "slurm" / "1000_submission.sh").read_text().splitlines()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --partition=short" in script
    assert "#SBATCH --constraint=cpu" in script

    wait_for(lambda: epochs_logged(tmp_path / "runs" / "ce-s0"), "the first epoch of ce-s0")
    with paused(tmp_path / "runs" / "ce-s0") as pid:
        cancel = teskd("sweep", path, "--cancel", env=env)
        wait_for(lambda: sigterm_pending(pid), "the job to pass SIGTERM on to teskd train")
    assert cancel.returncode == 0, cancel.stderr
    assert "ce-s0: running -> cancelled (it saves and stops)" in cancel.stdout
    for job in ("1000_0", "1000_1"):
        wait_for(lambda: job_info(state, job)["state"] not in ("RUNNING", "PENDING"), f"job {job} to end")
    rows = [line.split() for line in teskd("sweep", path, "--status", env=env).stdout.splitlines()[1:3]]
    assert rows[0][:2] == ["ce-s0", "stopped"] and int(rows[0][2].split("/")[0]) < EPOCHS
    assert (tmp_path / "runs" / "ce-s0" / "checkpoints" / "last.pt").is_file()

    # whichever launcher ran them before: the local one finishes them
    resumed = teskd("sweep", path, "--launcher", "local", "--jobs", "2", env=env)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("ce-s0", "ce-s1"):
        assert epochs_logged(tmp_path / "runs" / name) == list(range(1, EPOCHS + 1))
        assert_same_weights(serial / name, tmp_path / "runs" / name)


# --- the GPU acceptance check -----------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["gpu_check: no CUDA GPU visible to torch; nothing to check (exit 0)"]
