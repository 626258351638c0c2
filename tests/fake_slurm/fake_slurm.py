#!/usr/bin/env python3
"""A stand-in for Slurm's sbatch, srun, sacct, squeue, scancel and scontrol on one machine (the tests link
these names to this file and put the folder first on PATH). Jobs run at once, locally; the state lives in
$FAKE_SLURM (job counter, one state file per job or array task, requeue requests). Enough of Slurm's
behaviour for teskd's Slurm launcher: array jobs, --output patterns, signals to a job, requeue."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HOME = Path(os.environ["FAKE_SLURM"])


def _state(jid: str) -> Path:
    return HOME / f"job-{jid}.json"


def _read(jid: str) -> dict:
    return json.loads(_state(jid).read_text())


def _write(jid: str, **fields) -> None:
    path = _state(jid)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def sbatch(argv):
    script = Path(argv[-1])
    text = script.read_text()
    array = re.search(r"^#SBATCH --array=(\d+)-(\d+)", text, re.M)
    tasks = list(range(int(array.group(1)), int(array.group(2)) + 1)) if array else [None]
    counter = HOME / "counter"
    job = int(counter.read_text()) + 1 if counter.exists() else 1000
    counter.write_text(str(job))
    for task in tasks:
        jid = f"{job}_{task}" if task is not None else str(job)
        _write(jid, state="PENDING", requeues=0, script=str(script))
        subprocess.Popen([sys.executable, __file__, "--run-task", str(job), "" if task is None else str(task)],
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job}")


def run_task(job: str, task: str):
    jid = f"{job}_{task}" if task else job
    env = {**os.environ, "SLURM_JOB_ID": jid if not task else str(int(job) + 1 + int(task)), "SLURM_NTASKS": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "localhost", "FAKE_SLURM_JID": jid}
    if task:
        env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=task)
    while True:
        proc = subprocess.Popen(["bash", _read(jid)["script"]], env=env, start_new_session=True)
        _write(jid, state="RUNNING", pgid=proc.pid)
        code = proc.wait()
        info = _read(jid)
        if info.get("requeue"):
            _write(jid, state="PENDING", requeue=False, requeues=info["requeues"] + 1)
            continue
        if info["state"] != "CANCELLED":
            _write(jid, state="COMPLETED" if code == 0 else "FAILED", exit=code)
        return


def srun(argv):
    out = err = None
    i = 0
    while argv[i].startswith("--"):
        if argv[i] in ("--output", "--error"):
            value = argv[i + 1]
            if argv[i] == "--output":
                out = value
            else:
                err = value
            i += 2
        else:
            i += 1
    env = os.environ
    names = {"%A": env.get("SLURM_ARRAY_JOB_ID", ""), "%a": env.get("SLURM_ARRAY_TASK_ID", ""),
             "%j": env["SLURM_JOB_ID"], "%t": "0"}
    for flag, path in ((1, out), (2, err)):
        if path:
            for k, v in names.items():
                path = path.replace(k, v)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, flag)
    os.execvp(argv[i], argv[i:])


def _jobs(selected):
    for path in sorted(HOME.glob("job-*.json")):
        jid = path.stem[len("job-"):]
        if not selected or jid.split("_")[0] in selected or jid in selected:
            yield jid, json.loads(path.read_text())


def sacct(argv):
    selected = {a[2:] if a.startswith("-j") and len(a) > 2 else a for a in argv if re.fullmatch(r"(-j)?\d+(_\d+)?", a)}
    for jid, info in _jobs(selected):
        print(f"{jid}|{info['state']}")


def squeue(argv):
    for jid, info in _jobs(set()):
        if info["state"] in ("PENDING", "RUNNING"):
            print(f"{jid} {info['state']}")


def scancel(argv):
    sig = None
    rest = []
    for i, a in enumerate(argv):
        if a.startswith("--signal="):
            sig = a.split("=", 1)[1]
        elif a == "--signal":
            sig = argv[i + 1]
        elif i == 0 or argv[i - 1] != "--signal":
            rest.append(a)
    for jid, info in _jobs(set(rest)):
        if info["state"] != "RUNNING":
            if sig is None and info["state"] == "PENDING":
                _write(jid, state="CANCELLED")
            continue
        if sig is None:
            _write(jid, state="CANCELLED")
        name = sig or "TERM"
        number = getattr(signal, name if name.startswith("SIG") else "SIG" + name)
        for pid in _step_processes(info["pgid"]):  # as Slurm: the job's steps, not its batch shell
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass


def _step_processes(pgid: int) -> list:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if int(fields[2]) == pgid and pid != pgid:
            found.append(pid)
    return found


def scontrol(argv):
    if argv[:1] == ["requeue"]:
        _write(argv[1], requeue=True)
    elif argv[:2] == ["show", "hostnames"]:
        print("localhost")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run-task"]:
        run_task(sys.argv[2], sys.argv[3])
    else:
        {"sbatch": sbatch, "srun": srun, "sacct": sacct, "squeue": squeue, "scancel": scancel,
         "scontrol": scontrol}[Path(sys.argv[0]).name](sys.argv[1:])
