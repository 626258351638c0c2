"""`teskd sweep`: planning a grid of runs, validating the file, statuses, running, resuming, collecting."""

import json
import os
import signal
import types

import pytest
import yaml

from teskd.cli import main
from teskd.config import load_config, to_dict
from teskd.errors import TeskdError
from teskd.sweep_plan import grid_tag, load_sweep, override_text
from teskd.sweep_status import run_status

from conftest import REPO

CE = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")
TESKD = str(REPO / "configs" / "cifar100" / "resnet18_teskd.yaml")


def write_sweep(path, **doc):
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sweep_cli(capsys, *argv):
    code = main(["sweep", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- planning ------------------------------------------------------------------------------------------

def test_plan_names_order_and_overrides(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", out=str(tmp_path / "runs"), base=CE,
                       overrides=["data.subset_per_class=100", "model.width_mult=0.125"], seeds=[0, 1],
                       runs={"ce": {}, "teskd": {"config": TESKD},
                             "teskd-detach": {"config": TESKD, "overrides": ["method.detach_teacher=true"]}},
                       grid={"train.epochs": [15, 30]})
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs] == [
        "ce-e15-s0", "ce-e15-s1", "ce-e30-s0", "ce-e30-s1",  # variant, then grid, then seed
        "teskd-e15-s0", "teskd-e15-s1", "teskd-e30-s0", "teskd-e30-s1",
        "teskd-detach-e15-s0", "teskd-detach-e15-s1", "teskd-detach-e30-s0", "teskd-detach-e30-s1"]
    run = sweep.runs[-3]  # teskd-detach-e15-s1
    assert run.out == tmp_path / "runs" / "teskd-detach-e15-s1" and str(run.config) == TESKD
    # common overrides, the variant's, the grid's, then the seed: later ones win
    assert run.overrides == ("data.subset_per_class=100", "model.width_mult=0.125", "method.detach_teacher=true",
                             "train.epochs=15", "train.seed=1")
    cfg = load_config(run.config, list(run.overrides))
    assert cfg.method.detach_teacher is True and cfg.train.epochs == run.epochs == 15 and cfg.train.seed == 1
    assert run.command() == (f"teskd train {TESKD} data.subset_per_class=100 model.width_mult=0.125 "
                             f"method.detach_teacher=true train.epochs=15 train.seed=1 "
                             f"--out {run.out} --resume {run.out}")
    assert load_config(CE, list(sweep.runs[0].overrides)).method.name == "ce"


def test_grid_with_two_keys_and_no_seeds(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", out="runs/x", base=TESKD,
                       runs={"a": None}, grid={"method.detach_teacher": [False, True], "optim.lr": [0.1, 0.05]})
    sweep = load_sweep(path)
    # without `seeds` each run keeps its config's seed (0 in the repository configs), and no seed override
    assert [r.name for r in sweep.runs] == ["a-detach_teacher=false-lr0.1-s0", "a-detach_teacher=false-lr0.05-s0",
                                            "a-detach_teacher=true-lr0.1-s0", "a-detach_teacher=true-lr0.05-s0"]
    assert sweep.runs[1].overrides == ("method.detach_teacher=false", "optim.lr=0.05")
    assert str(sweep.runs[0].out) == "runs/x/a-detach_teacher=false-lr0.1-s0"  # relative to the current directory


@pytest.mark.parametrize("key, value, keys, tag", [
    ("train.epochs", 15, None, "e15"),
    ("model.width_mult", 0.25, None, "w0.25"),
    ("model.arch", "resnet34", None, "resnet34"),
    ("method.detach_teacher", True, None, "detach_teacher=true"),
    ("schedule.milestones", [50, 75], None, "milestones=50_75"),
    ("data.root", "/a b/c", None, "root=_a_b_c"),
    ("method.temperature", 3.0, ["method.temperature", "other.temperature"], "method.temperature=3"),
])
def test_grid_tags(key, value, keys, tag):
    assert grid_tag(key, value, keys or [key]) == tag


@pytest.mark.parametrize("value", [15, 0.05, 1e-7, True, None, "cosine", "10", [50, 75], {"teacher": 1.0}])
def test_grid_values_round_trip_through_overrides(value):
    from teskd.config import parse_override

    assert parse_override(override_text("a.b", value)) == (["a", "b"], value)


# --- validation: the whole file, before any run ------------------------------------------------------------

GOOD = {"out": "RUNS", "base": CE, "runs": {"ce": {}}}


@pytest.mark.parametrize("change, message", [
    ({"outt": "x"}, "unknown key 'outt'; valid keys: out, base, overrides, seeds, runs, grid"),
    ({"out": None}, "'out' (the folder the run folders go into"),
    ({"runs": {}}, "'runs' (named variants"),
    ({"runs": {"ce": {"confg": CE}}}, "run ce: unknown key 'confg'; valid keys: config, overrides"),
    ({"runs": {"ce": {}, "b": {"config": "missing.yaml"}}}, "run b: config file not found: missing.yaml"),
    ({"overrides": ["train.epochs"]}, "overrides: override 'train.epochs' is not of the form key=value"),
    ({"overrides": [{"train.epochs": 3}]}, "overrides must be a list of key=value strings"),
    ({"runs": {"ce": {"overrides": ["train.epochz=3"]}}}, "run ce: unknown config key train.epochz"),
    ({"overrides": ["train.epochs=x"]}, "run ce: config key 'train.epochs': expected int, got 'x'"),
    ({"grid": {"train.epochs": 15}}, "grid key train.epochs: expected a non-empty list of values"),
    ({"grid": {"train.seed": [0, 1]}}, "grid key train.seed: give the seeds in 'seeds' instead"),
    ({"grid": {"method.temperature": [3.0]}}, "run ce: unknown config key method.temperature"),
    ({"seeds": [0, "1"]}, "'seeds' must be a non-empty list of integers"),
    ({"seeds": [0, 0]}, "'seeds' repeats a seed"),
    ({"seeds": [0], "overrides": ["train.seed=3"]}, "overrides set train.seed, and 'seeds' sets it too"),
    ({"runs": {"a/b": {}}}, "run name 'a/b' must be letters, digits"),
    ({"base": None}, "run ce has no config, and the sweep has no 'base' config"),
    ({"runs": {"x": {}}, "grid": {"data.root": ["a/b", "a_b"]}}, "two runs are both named x-root=a_b-s0"),
    ({"grid": {"model.arch": ["resnet18", "resnet99"]}}, "run ce: model.arch: unknown architecture 'resnet99'"),
    ({"overrides": ["data.dataset=cifar1000"]}, "run ce: data.dataset: unknown dataset 'cifar1000'"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_invalid_sweep_is_one_line_and_starts_nothing(tmp_path, capsys, change, message, dry_run):
    doc = {**GOOD, "out": str(tmp_path / "runs"), **change}
    path = write_sweep(tmp_path / "s.yaml", **{k: v for k, v in doc.items() if v is not None or k != "base"})
    code, out, err = sweep_cli(capsys, path, *(["--dry-run"] if dry_run else []))
    assert code == 2 and out == ""
    assert err.startswith(f"error: sweep file {path}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_unreadable_sweep_files(tmp_path, capsys):
    code, _, err = sweep_cli(capsys, tmp_path / "nope.yaml")
    assert code == 2 and err.strip() == f"error: sweep file not found: {tmp_path / 'nope.yaml'}"
    (tmp_path / "bad.yaml").write_text("runs: [\n")
    code, _, err = sweep_cli(capsys, tmp_path / "bad.yaml")
    assert code == 2 and "is not valid YAML" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "list.yaml").write_text("- a\n")
    code, _, err = sweep_cli(capsys, tmp_path / "list.yaml")
    assert code == 2 and "expected a mapping with keys out, base" in err


# --- statuses of hand-made run folders ------------------------------------------------------------------

def fake_folder(run, cfg_overrides, epochs_done, summary_epochs=None, checkpoint=False):
    """A run folder as training leaves it: config.yaml, metrics.jsonl lines, maybe summary.json."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config(CE, cfg_overrides)), sort_keys=False))
    lines = [json.dumps({"epoch": e, "test_acc": {"teacher": 1.0}}) for e in range(1, epochs_done + 1)]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if summary_epochs is not None:
        (run / "summary.json").write_text(json.dumps({"epochs": summary_epochs}))
    if checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.pt").write_bytes(b"x")


def test_dry_run_statuses_and_list(tmp_path, capsys):
    runs = tmp_path / "runs"
    path = write_sweep(tmp_path / "s.yaml", out=str(runs), base=CE, overrides=["train.epochs=3"], seeds=[0, 1, 2, 3],
                       runs={"ce": {}, "other": {"overrides": ["optim.lr=0.05"]}})
    fake_folder(runs / "ce-s0", ["train.epochs=3"], 3, summary_epochs=3, checkpoint=True)  # done
    fake_folder(runs / "ce-s1", ["train.epochs=3"], 1, checkpoint=True)  # killed after epoch 1
    fake_folder(runs / "ce-s2", ["train.epochs=2"], 2, summary_epochs=2, checkpoint=True)  # finished 2: extend to 3
    (runs / "ce-s3").mkdir()  # an empty folder: new
    # config written, then killed; made from a config with another momentum (the sweep's overrides still apply)
    fake_folder(runs / "other-s0", ["train.epochs=3", "optim.momentum=0.8"], 0)
    code, out, err = sweep_cli(capsys, path, "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    status = {line.split()[0]: " ".join(line.split()[1:]) for line in lines[1:] if not line.startswith(" ")}
    assert status["ce-s0"] == "done" and status["ce-s1"] == "partial 1/3 epochs"
    assert status["ce-s2"] == "partial 2/3 epochs" and status["ce-s3"] == "new" and status["other-s1"] == "new"
    # an existing run keeps its own config.yaml on resume: the dry run says where it differs from the sweep's
    assert status["other-s0"].startswith("partial 0/3 epochs") and "differs from the sweep's config in optim.momentum" \
        in status["other-s0"]
    command = lines[lines.index(next(line for line in lines if line.startswith("ce-s1"))) + 1].strip()
    assert command == f"teskd train {CE} train.epochs=3 train.seed=1 --out {runs / 'ce-s1'} --resume {runs / 'ce-s1'}"
    assert sorted(p.name for p in runs.iterdir()) == ["ce-s0", "ce-s1", "ce-s2", "ce-s3", "other-s0"]  # nothing made

    code, out, _ = sweep_cli(capsys, path, "--list", "--only", "ce-s[12]")
    assert code == 0 and out.splitlines() == ["ce-s1", "ce-s2"]
    code, _, err = sweep_cli(capsys, path, "--list", "--only", "nothing*")
    assert code == 2 and "--only 'nothing*' matches none of the sweep's 8 runs" in err


def test_run_status_ahead(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", out=str(tmp_path / "runs"), base=CE, overrides=["train.epochs=2"],
                       runs={"ce": {}})
    run = load_sweep(path).runs[0]
    fake_folder(run.out, ["train.epochs=4"], 4, summary_epochs=4)
    assert str(run_status(run)).startswith("ahead: 4 epochs finished, train.epochs=2")


# --- running: failures, signals (the training itself replaced) -------------------------------------------

@pytest.fixture
def three_runs(tmp_path):
    return write_sweep(tmp_path / "s.yaml", out=str(tmp_path / "runs"), base=CE, seeds=[0, 1, 2], runs={"ce": {}})


def test_a_failing_run_is_reported_and_the_sweep_goes_on(three_runs, capsys, monkeypatch):
    import teskd.sweep

    started = []

    def fake_run(run):
        started.append(run.name)
        if run.name == "ce-s1":
            raise TeskdError("data folder /x not found")
        return "trained"

    monkeypatch.setattr(teskd.sweep, "run_one", fake_run)
    code, out, _ = sweep_cli(capsys, three_runs)
    assert code == 1 and started == ["ce-s0", "ce-s1", "ce-s2"]
    assert "[2/3] ce-s1: failed: data folder /x not found" in out
    assert out.splitlines()[-1].endswith("3 runs: 0 already done, 2 trained, 1 failed (ce-s1)")


def test_trainer_interrupt_stops_the_sweep(three_runs, capsys, monkeypatch):
    import teskd.sweep
    from teskd.engine.signals import Interrupted

    started = []

    def fake_run(run):
        started.append(run.name)
        raise Interrupted("SIGTERM", 3, 0, run.out)

    monkeypatch.setattr(teskd.sweep, "run_one", fake_run)
    code, _, err = sweep_cli(capsys, three_runs)
    assert code == 128 + signal.SIGTERM and started == ["ce-s0"]
    assert len(err.strip().splitlines()) == 1
    assert "SIGTERM received: stopped after epoch 3" in err
    assert f"run `teskd sweep {three_runs}` again to resume" in err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers put back


@pytest.mark.parametrize("inside_trainer", [False, True])
def test_signal_stops_before_the_next_run(three_runs, capsys, monkeypatch, inside_trainer):
    """A SIGTERM that reaches the sweep between runs stops it at once; one the trainer caught (its run then
    finished anyway, the signal coming in its last epoch) stops it before the next run."""
    import teskd.sweep

    started = []

    def fake_run(run):
        started.append(run.name)
        if inside_trainer:  # as the trainer does: its own handler while it trains
            from teskd.engine.signals import stop_on_signals

            trainer = types.SimpleNamespace(stop_signal=None)
            with stop_on_signals(trainer):
                os.kill(os.getpid(), signal.SIGTERM)
            assert trainer.stop_signal == "SIGTERM"  # the trainer saw it (and would have saved)
        else:
            os.kill(os.getpid(), signal.SIGTERM)
        return "trained"

    monkeypatch.setattr(teskd.sweep, "run_one", fake_run)
    code, _, err = sweep_cli(capsys, three_runs)
    assert code == 128 + signal.SIGTERM and started == ["ce-s0"]
    assert "SIGTERM received" in err and "again to resume" in err and len(err.strip().splitlines()) == 1


# --- a real sweep: 2 variants x 1 seed on CIFAR-100, re-run, extended, collected ---------------------------

def tiny_sweep(path, root, out, epochs):
    return write_sweep(path, out=str(out), base=CE, seeds=[0],
                       overrides=[f"data.root={root}", "model.width_mult=0.125", "data.subset_per_class=4",
                                  "data.test_subset_per_class=2", "data.batch_size=50", "train.progress=false",
                                  "train.threads=1", f"train.epochs={epochs}"],
                       runs={"ce": {}, "teskd": {"config": TESKD}})


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_real_sweep_skips_resumes_and_collects(tmp_path, capsys, cifar100_root, monkeypatch):
    runs = tmp_path / "runs"
    path = tiny_sweep(tmp_path / "s.yaml", cifar100_root, runs, epochs=1)
    code, out, err = sweep_cli(capsys, path)
    assert code == 0, err
    assert "[1/2] ce-s0: new -> teskd train" in out and "[2/2] teskd-s0: new -> teskd train" in out
    for name, method in (("ce-s0", "ce"), ("teskd-s0", "teskd")):
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["method"] == method and summary["epochs"] == 1
        assert (runs / name / "checkpoints" / "last.pt").is_file()

    # again: both are done, skipped without building anything, and no file changes
    import teskd.engine.trainer

    def no_build(*a, **k):
        raise AssertionError("a finished run was built again")

    before = snapshot(runs)
    monkeypatch.setattr(teskd.engine.trainer.Trainer, "__init__", no_build)
    code, out, _ = sweep_cli(capsys, path)
    assert code == 0
    assert "[1/2] ce-s0: done (1 epochs), skipped" in out and "[2/2] teskd-s0: done (1 epochs), skipped" in out
    assert snapshot(runs) == before
    monkeypatch.undo()

    # more epochs through the common overrides (the run names stay): both runs resume from epoch 1
    first = {name: (runs / name / "metrics.jsonl").read_text().splitlines()[0] for name in ("ce-s0", "teskd-s0")}
    path = tiny_sweep(tmp_path / "s.yaml", cifar100_root, runs, epochs=2)
    code, out, _ = sweep_cli(capsys, path, "--dry-run")
    assert code == 0 and out.count("partial 1/2 epochs") == 2
    code, out, err = sweep_cli(capsys, path, "--only", "*-s0", "--collect", tmp_path / "results")
    assert code == 0, err
    assert "[1/2] ce-s0: partial 1/2 epochs -> teskd train" in out
    for name in ("ce-s0", "teskd-s0"):
        lines = (runs / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
        assert lines[0] == first[name]  # resumed: epoch 1 was not trained again
        assert json.loads((runs / name / "summary.json").read_text())["epochs"] == 2
        # the collection: the three small files, byte for byte, nothing else
        collected = tmp_path / "results" / name
        assert sorted(p.name for p in collected.iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]
        for f in collected.iterdir():
            assert f.read_bytes() == (runs / name / f.name).read_bytes()
    assert "collected 2 of 2 runs into" in out

    # the collection is a folder of runs that teskd report reads
    code = main(["report", str(tmp_path / "results"), "--format", "json"])
    groups = json.loads(capsys.readouterr().out)
    assert code == 0 and [g["method"] for g in groups] == ["ce", "teskd"]
    assert all(g["epochs"] == "2/2" for g in groups)


def test_collect_only_and_never_into_run_folders(tmp_path, capsys):
    runs = tmp_path / "runs"
    path = write_sweep(tmp_path / "s.yaml", out=str(runs), base=CE, overrides=["train.epochs=3"], seeds=[0, 1],
                       runs={"ce": {}})
    fake_folder(runs / "ce-s0", ["train.epochs=3"], 3, summary_epochs=3, checkpoint=True)
    (runs / "ce-s0" / "deployed.safetensors").write_bytes(b"w")
    fake_folder(runs / "ce-s1", ["train.epochs=3"], 0)  # started, killed before its first epoch ended
    code, out, err = sweep_cli(capsys, path, "--collect", tmp_path / "res", "--no-run")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["ce-s0"]  # ce-s1 has no finished epoch
    assert sorted(p.name for p in (tmp_path / "res" / "ce-s0").iterdir()) == ["config.yaml", "metrics.jsonl",
                                                                               "summary.json"]
    assert "ce-s1: no finished epoch yet, nothing to collect" in out
    before = snapshot(runs)
    for target in (runs, runs / "ce-s0" / "x"):
        code, _, err = sweep_cli(capsys, path, "--collect", target, "--no-run")
        assert code == 2 and "would write into (or over) the run folders" in err
    assert snapshot(runs) == before
    code, _, err = sweep_cli(capsys, path, "--no-run")
    assert code == 2 and "--no-run only makes sense with --collect DIR" in err


# --- launchers: what they plan, without starting anything ------------------------------------------------

def test_local_slots_give_each_run_its_own_gpus(monkeypatch, tmp_path):
    import teskd.launchers.local as local
    from teskd.sweep import load_sweep

    monkeypatch.setattr(local, "_visible_gpus", lambda: ["0", "1", "2", "3", "4"])
    said = []
    slots = local.plan_slots(jobs=3, gpus_per_run=2, say=said.append)
    assert [s.gpus for s in slots] == [["0", "1"], ["2", "3"]]  # two fit; GPU 4 stays idle
    assert said == ["5 GPUs, 2 per run: 2 runs at once, not 3", "GPUs per run: 0,1; 2,3"]
    run = load_sweep(write_sweep(tmp_path / "s.yaml", out=str(tmp_path / "runs"), base=CE, runs={"ce": {}})).runs[0]
    argv, env = local.child_command(run, slots[1])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv[5:] == ["-m", "teskd", "train", CE, "--out", str(run.out), "--resume", str(run.out)]
    with pytest.raises(TeskdError, match="^6 GPUs per run, but this machine shows 5$"):
        local.plan_slots(jobs=1, gpus_per_run=6, say=said.append)


def test_local_slots_divide_the_cpu_cores(monkeypatch, tmp_path):
    import teskd.launchers.local as local
    from teskd.sweep import load_sweep

    monkeypatch.setattr(local, "_visible_gpus", lambda: [])
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    said = []
    slots = local.plan_slots(jobs=3, gpus_per_run=1, say=said.append)
    assert [s.threads for s in slots] == [2, 2, 2]
    assert said == ["CPU: 8 cores for 3 runs at once: train.threads=2 each (runs whose config sets train.threads "
                    "keep theirs)"]
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", out=str(tmp_path / "runs"), base=CE,
                                   runs={"ce": {}, "own": {"overrides": ["train.threads=3"]}}))
    (argv, env), (own, _) = (local.child_command(r, slots[0]) for r in sweep.runs)
    assert argv[-1] == "train.threads=2" and env["OMP_NUM_THREADS"] == "2"
    assert own[-1] == str(sweep.runs[1].out) and "train.threads=3" in own  # its own setting kept


def test_slurm_settings_from_the_file_then_the_command_line(tmp_path):
    from teskd.launchers.slurm import slurm_settings
    from teskd.sweep import LaunchOptions, load_sweep

    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", out=str(tmp_path / "runs"), base=CE, runs={"ce": {}},
                                   launcher={"partition": "gpu", "time": 120, "sbatch": {"constraint": "a100"}}))
    settings = slurm_settings(sweep, LaunchOptions("slurm", gpus_per_run=4,
                                                   slurm=("time=60", "sbatch.exclude=node7", "account=proj")))
    assert settings == {"time": 60, "nodes": 1, "signal_delay_s": 120, "max_timeouts": 50, "parallel": 64,
                        "partition": "gpu", "sbatch": {"constraint": "a100", "exclude": "node7"},
                        "gpus_per_node": 4, "account": "proj"}
    with pytest.raises(TeskdError, match="^Slurm launcher: unknown setting 'partiton'; known: partition, "):
        slurm_settings(sweep, LaunchOptions("slurm", slurm=("partiton=gpu",)))


def test_a_stop_asked_before_the_trainer_started_is_inherited():
    """A sweep's SIGTERM that came while the next run was being built stops that run at its first step."""
    from teskd.engine.signals import stop_on_signals

    sweep, trainer = types.SimpleNamespace(stop_signal=None), types.SimpleNamespace(stop_signal=None)
    with stop_on_signals(sweep):
        os.kill(os.getpid(), signal.SIGTERM)
        assert sweep.stop_signal == "SIGTERM"
        with stop_on_signals(trainer):
            assert trainer.stop_signal == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
