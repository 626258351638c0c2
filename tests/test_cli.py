"""Command-line behaviour: clean one-line errors, info numbers, refusing to overwrite runs."""

import json
import subprocess
import sys

import pytest

from teskd.cli import main

from conftest import REPO

CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_teskd.yaml")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_exact_parameter_counts(capsys):
    code, out, _ = run_cli(capsys, "info", CONFIG, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["params_train"] == 37_050_832 and info["params_deploy"] == 11_220_132
    assert info["macs_deploy"] == pytest.approx(0.555e9, rel=0.01)
    assert info["macs_train"] == pytest.approx(0.555e9 + 1.49e9, rel=0.01)
    # the fast students run the three top-down 1x1 convs (512x512) at a quarter of the pixels:
    # 8x8, 16x16, 32x32 -> 4x4, 8x8, 16x16
    assert info["macs_train"] - info["macs_train_executed"] == 512 * 512 * (64 + 256 + 1024) * 3 // 4
    assert info["branches"] == "teacher, student1, student2, student3, students_ensemble"
    code, out, _ = run_cli(capsys, "info", str(REPO / "configs/cifar100/resnet18_ce.yaml"), "--json")
    info = json.loads(out)
    assert info["params_train"] == info["params_deploy"] == 11_220_132
    assert info["branches"] == "deployed" and info["deployed"].startswith("resnet18 (branch 'deployed')")


@pytest.mark.parametrize("name, branches", [("one", "branch1, branch2, branch3, ensemble"),
                                            ("dml", "peer1, peer2"), ("byot", "teacher, exit1, exit2, exit3")])
def test_info_names_each_methods_branches_and_what_it_deploys(capsys, name, branches):
    code, out, _ = run_cli(capsys, "info", str(REPO / "configs/cifar100/resnet18_ce.yaml"), f"method.name={name}",
                           "--json")
    info = json.loads(out)
    assert code == 0 and info["branches"] == branches and info["params_deploy"] == 11_220_132
    assert info["params_train"] > info["params_deploy"]


@pytest.mark.parametrize("argv, message", [
    (["train", CONFIG, "train.epochz=1"], "error: unknown config key train.epochz"),
    (["train", CONFIG, "train.epochs=x"], "error: config key 'train.epochs': expected int, got 'x'"),
    (["train", "nope.yaml"], "error: config file not found: nope.yaml"),
    (["train", CONFIG, "data.root=/nonexistent/cifar", "train.progress=false"], "/nonexistent/cifar"),
    (["eval", "/nonexistent/run"], "error: no such run directory, checkpoint or export: /nonexistent/run"),
    (["train", "--resume", "/nonexistent/run"], "error: cannot resume"),
    (["info", CONFIG, "model.arch=resnet1000"], "resnet1000"),
    (["train", CONFIG, "train.amp=fp16", "train.device=cpu"], "error: train.amp=fp16 needs a CUDA device"),
])
def test_errors_are_one_line_and_nonzero(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, *argv, *(["--out", str(tmp_path / "r")] if argv[0] == "train" and "--resume" not in argv else []))
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_corrupt_checkpoint_is_named(capsys, tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "eval", str(bad))
    assert code == 2 and f"checkpoint {bad} is corrupt" in err


def test_existing_run_directory_is_not_overwritten(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("precious\n")
    code, _, err = run_cli(capsys, "train", CONFIG, "--out", str(run))
    assert code == 2 and "already exists" in err and "--resume" in err
    assert (run / "metrics.jsonl").read_text() == "precious\n"


def test_console_entry_point_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "teskd.cli", "train", CONFIG, "optim.lr=-1"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: optim.lr must be > 0") and proc.stderr.strip().endswith("got -1.0")
    assert len(proc.stderr.strip().splitlines()) == 1


OFFICIAL_COUNTS = {  # spec section 2: (with students, teacher alone), 100 classes
    "resnet18": (37_050_832, 11_220_132), "resnet34": (47_158_992, 21_328_292),
    "resnet50": (434_915_280, 23_705_252), "seresnet18": (37_144_712, 11_314_012),
    "seresnet34": (47_328_700, 21_498_000), "seresnet50": (437_472_832, 26_262_804),
    "resnext18": (48_040_144, 22_209_444), "resnext34": (68_252_752, 42_422_052),
    "resnext50": (434_387_152, 23_177_124), "vgg16": (24_844_752, 15_299_748), "vgg19": (30_157_008, 20_612_004),
}


@pytest.mark.parametrize("arch", sorted(OFFICIAL_COUNTS))
def test_info_for_every_architecture_config(capsys, arch):
    for method in ("teskd", "ce"):
        code, out, _ = run_cli(capsys, "info", str(REPO / f"configs/cifar100/{arch}_{method}.yaml"), "--json")
        info = json.loads(out)
        assert code == 0 and info["arch"] == arch and info["method"] == method
        train, deploy = OFFICIAL_COUNTS[arch]
        assert info["params_deploy"] == deploy
        assert info["params_train"] == (train if method == "teskd" else deploy)
        assert info["macs_train"] > info["macs_deploy"] if method == "teskd" else info["macs_train"] == info["macs_deploy"]


def test_overrides_may_follow_options(capsys):
    code, out, _ = run_cli(capsys, "info", CONFIG, "--json", "model.width_mult=0.5")
    assert code == 0 and json.loads(out)["params_deploy"] < 11_220_132


def test_version_flag(capsys):
    from teskd import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"teskd {__version__}\n"


def test_python_dash_m_teskd_is_the_cli():
    from teskd import __version__

    proc = subprocess.run([sys.executable, "-m", "teskd", "--version"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout == f"teskd {__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "teskd", "info", CONFIG, "--json", "model.width_mult=0.125"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method"] == "teskd"
    proc = subprocess.run([sys.executable, "-m", "teskd", "train", CONFIG, "optim.lr=-1"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: optim.lr must be > 0")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "teskd"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: teskd ")


def test_closed_pipe_is_not_a_traceback():
    # `teskd ... | head`: the reader is gone before teskd writes (closed here before the process starts up)
    proc = subprocess.Popen([sys.executable, "-m", "teskd", "info", "configs/cifar100/resnet18_teskd.yaml", "--json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err and proc.returncode == 141
