"""Kill a short training run at every file operation in turn, resume it, and compare with an uninterrupted run.

Run as a script by ``test_killpoints.py``: ``python killpoints_driver.py WORKDIR``. It writes a tiny
CIFAR-10-layout dataset, then, from one process that has imported torch once, forks:

* a reference run that records every file operation of the save/resume path
  (``teskd.fileio.fault_point``: temporary-file writes, partial writes, fsyncs, renames,
  digest files, metrics appends, links, removals);
* for each operation N of a fresh run: a run killed with SIGKILL just before operation N,
  then the requeue command ``teskd train CONFIG ... --resume RUN`` to the end;
* for each operation M of a resume: a copy of a run killed mid-way, resumed and killed at
  its M-th operation, then resumed again to the end.

After each final resume the child compares the weights in ``last.pt`` tensor-for-tensor
with the reference and records the epochs logged in ``metrics.jsonl``. One JSON report
goes to stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch

from teskd import fileio
from teskd.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_teskd.yaml")
EPOCHS = 2


def write_data(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("test", 1)):
        n = 10 * per_class
        np.savez(root / f"{split}.npz", x=g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n) % 10, classes=np.array([f"c{i}" for i in range(10)]))


def train_args(data: Path) -> list[str]:
    # 2 epochs x 2 steps, a checkpoint after every step: every kind of save happens (mid-epoch, epoch end, best)
    return ["data.dataset=cifar10", f"data.root={data}", "data.batch_size=10", "data.eval_batch_size=10",
            "data.subset_per_class=null", "data.test_subset_per_class=null", "model.width_mult=0.0625",
            f"train.epochs={EPOCHS}", "train.progress=false", "train.deterministic=true", "train.threads=1",
            "train.checkpoint_every=1", "train.seed=0"]


def child(fn, log: Path) -> int:
    """Run ``fn`` in a forked child (stdout/stderr to ``log``); returns its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = fn()
        except BaseException as exc:  # noqa: BLE001 (report anything, then leave the child)
            print(f"child failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, 0)
    return status


def recorder(ops: list):
    def hook(op, path):
        ops.append([op, os.path.basename(path)])
    return hook


def killer(at: int):
    count = {"n": 0}

    def hook(op, path):
        count["n"] += 1
        if count["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def record_ops(args: list[str], out: Path, log: Path) -> list:
    """The file operations of ``main(args)``, recorded in a child."""
    def run():
        ops: list = []
        fileio.fault_hook = recorder(ops)
        code = main(args)
        out.write_text(json.dumps(ops))
        return code
    status = child(run, log)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise SystemExit(f"recording run failed, see {log}:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def killed_at(args: list[str], at: int, log: Path) -> bool:
    def run():
        fileio.fault_hook = killer(at)
        return main(args)
    status = child(run, log)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def resume_and_compare(resume: list[str], run: Path, reference: Path, out: Path, log: Path) -> dict:
    def go():
        fileio.fault_hook = None
        code = main(resume)
        got = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
        ref = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model"]
        differing = [k for k in ref if k not in got or not torch.equal(ref[k], got[k])]
        epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run / "summary.json").read_text())
        best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
        leftovers = sorted(p.name for p in run.rglob("*.tmp"))
        out.write_text(json.dumps({"code": code, "differing": differing[:3], "epochs": epochs,
                                   "summary_epochs": summary["epochs"], "best_epoch": best["epoch"],
                                   "summary_best_epoch": summary["best_epoch"], "leftover_tmp": leftovers}))
        return 0
    status = child(go, log)
    if not os.WIFEXITED(status) or not out.is_file():
        return {"code": None, "error": log.read_text()[-2000:]}
    result = json.loads(out.read_text())
    out.unlink()
    return result


def in_parallel(case, items, work: Path, jobs: int = 2) -> list[dict]:
    """``[case(i) for i in items]``, ``jobs`` forked workers at a time (each case is independent)."""
    items, results, running = list(items), {}, {}
    while items or running:
        while items and len(running) < jobs:
            i = items.pop(0)
            out = work / f"case{i}.json"
            pid = os.fork()
            if pid == 0:
                try:
                    out.write_text(json.dumps(case(i)))
                finally:
                    os._exit(0)
            running[pid] = (i, out)
        pid, _ = os.wait()
        i, out = running.pop(pid)
        results[i] = json.loads(out.read_text()) if out.is_file() else {"at": i, "killed": None, "code": None,
                                                                          "error": "worker died"}
        out.unlink(missing_ok=True)
    return [results[i] for i in sorted(results)]


def main_driver(work: Path) -> dict:
    data = work / "data"
    write_data(data)
    base_args = ["train", CONFIG, *train_args(data)]

    def requeue(run: Path) -> list[str]:  # what a cluster's requeue runs: the same command, with --resume
        return [*base_args, "--resume", str(run)]
    log = work / "log.txt"

    # the reference run happens in this process: the forked children then start warm (about 3x faster)
    reference = work / "reference"
    fresh_ops: list = []
    fileio.fault_hook = recorder(fresh_ops)
    with open(log, "a") as quiet, redirect_stdout(quiet):
        assert main([*base_args, "--out", str(reference)]) == 0
    fileio.fault_hook = None

    report = {"fresh_ops": fresh_ops, "fresh": [], "resume_ops": [], "resume": []}

    def fresh_case(n: int) -> dict:
        run, log_n = work / f"fresh{n}", work / f"log{n}.txt"
        killed = killed_at([*base_args, "--out", str(run)], n, log_n)
        result = resume_and_compare(requeue(run), run, reference, work / f"result{n}.json", log_n)
        shutil.rmtree(run)
        return {"at": n, "op": fresh_ops[n - 1], "killed": killed, **result}

    report["fresh"] = in_parallel(fresh_case, range(1, len(fresh_ops) + 1), work)

    # a run killed in epoch 2 after its mid-epoch save; then every operation of its resume is a kill point
    mid = next(i for i, (op, name) in enumerate(fresh_ops, 1)
               if op == "replace" and name == "last.pt.sha256" and i > len(fresh_ops) // 2)
    base = work / "base"
    assert killed_at([*base_args, "--out", str(base)], mid + 1, log)
    probe = work / "probe"
    shutil.copytree(base, probe)
    resume_ops = record_ops(requeue(probe), work / "ops2.json", log)
    report["resume_ops"] = resume_ops

    def resume_case(m: int) -> dict:
        run, log_m = work / f"resume{m}", work / f"rlog{m}.txt"
        shutil.copytree(base, run)
        killed = killed_at(requeue(run), m, log_m)
        result = resume_and_compare(requeue(run), run, reference, work / f"rresult{m}.json", log_m)
        shutil.rmtree(run)
        return {"at": m, "op": resume_ops[m - 1], "killed": killed, **result}

    report["resume"] = in_parallel(resume_case, range(1, len(resume_ops) + 1), work)
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)  # before anything runs: forked children never inherit a thread pool
    print(json.dumps(main_driver(Path(sys.argv[1]))))
