"""Damaged or hostile run folders (issue 20): every run file is read through teskd.runfiles, with bounds.

Each test damages a copy of a run folder made once per module (a synthetic one for report, curves and
sweep; a real 1-epoch run for ``train --resume`` and ``predict``) and asserts the exit code and the one line
teskd prints. Calls that hung or ate memory before the fix (FIFOs, /dev/zero, alias bombs) run in a
subprocess with a timeout, so a regression fails the test instead of hanging the suite.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from teskd.cli import main
from teskd.deploy.predict import Predictions, format_predictions, format_skipped
from teskd.engine.checkpoint import digest_path, read_digests

from conftest import REPO, SHARED_CIFAR100

CE = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")
TIMEOUT = 240  # seconds for one CLI call in a subprocess (importing torch on a busy machine included)
ESC = "\x1b[2J\x1b[31m\nforged line"  # clears the screen, turns the text red, starts a line of its own
ESC_SHOWN = "\\x1b[2J\\x1b[31m\\nforged line"


def records(n=3):
    return [{"epoch": e, "lr": 0.1, "train_loss": 4.0 - e / 10, "loss_ce": 4.0 - e / 10,
             "train_acc": {"teacher": 5.0 * e}, "test_acc": {"teacher": 10.0 * e}, "epoch_seconds": 2.0,
             "train_images_per_sec": 100.0} for e in range(1, n + 1)]


def summary(**changes):
    data = {"method": "ce", "epochs": 3, "teacher_top1_last": 30.0, "teacher_top1_best": 30.0,
            "selected_on": "test", "params_train": 100, "params_deploy": 100, "train_images_per_sec": 100.0}
    return {**data, **changes}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A finished 3-epoch CE run folder as training leaves it (without the weights, which these files never need)."""
    run = tmp_path_factory.mktemp("template") / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "method": {"name": "ce"}, "data": {"dataset": "cifar100"},
        "model": {"arch": "resnet18", "width_mult": 0.125}, "train": {"epochs": 3, "seed": 0}}, sort_keys=False))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    (run / "summary.json").write_text(json.dumps(summary()))
    return run


@pytest.fixture
def run(synthetic, tmp_path):
    return Path(shutil.copytree(synthetic, tmp_path / "run"))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real 1-epoch, 1/8-width CE run on 400 CIFAR-100 images (its checkpoint, config and teacher)."""
    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100}")
    out = tmp_path_factory.mktemp("real") / "run"
    args = [f"data.root={SHARED_CIFAR100}", "model.width_mult=0.125", "data.subset_per_class=4",
            "data.test_subset_per_class=1", "data.batch_size=50", "train.epochs=1", "train.progress=false",
            "train.threads=1"]
    assert main(["train", CE, *args, "--out", str(out)]) == 0
    return out


def cli(capsys, *argv):
    code = main([*map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_subprocess(*argv, cwd=None):
    """The CLI in a child process: a call that would hang or fill memory fails the test at TIMEOUT instead."""
    proc = subprocess.run([sys.executable, "-m", "teskd.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return proc.returncode, proc.stdout, proc.stderr


def call(capsys, isolated, *argv):
    """The CLI in this process, or (``isolated``: where a regression would hang or fill memory) in a child."""
    return cli_subprocess(*argv) if isolated else cli(capsys, *argv)


def notes(out):
    return [line for line in out.splitlines() if line.startswith("note: ")]


def the_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def alias_bomb(indent=""):
    """Lines of a YAML block of nine anchored lists, each holding the previous one nine times."""
    return (f"{indent}a: &a [x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"{indent}{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")))


ALIAS_BOMB = alias_bomb()


def test_the_alias_bomb_is_small():
    assert len(ALIAS_BOMB) < 500  # 9**9 = 387 million strings once expanded


# --- config.yaml ----------------------------------------------------------------------------------------

DAMAGED_CONFIGS = {
    "alias bomb": (ALIAS_BOMB, "is refused: line 2: a YAML alias (*name); teskd writes none, and aliases nested "
                               "in each other expand to billions of values"),
    "deep flow": ("method: " + "[" * 200_000, "is refused: line 1: nested more than 32 levels deep"),
    "deep block": ("".join(" " * i + f"k{i}:\n" for i in range(2000)),
                   "is refused: line 32: nested more than 32 levels deep"),
    "huge integer": ("train: {epochs: " + "9" * 400 + "}\n", "is refused: it holds an integer of more than 20 digits"),
    "nan": ("optim: {lr: .nan}\n", "is refused: it holds nan (no setting is meaningful at nan or inf)"),
    "not a mapping": ("- a\n- b\n", "is not a mapping of settings (got ['a', 'b'])"),
}


@pytest.mark.parametrize("case", DAMAGED_CONFIGS)
def test_damaged_config_yaml_is_one_note_in_report_and_one_warning_in_curves(run, capsys, case):
    text, message = DAMAGED_CONFIGS[case]
    (run / "config.yaml").write_text(text)
    isolated = case == "alias bomb"  # it hung, filling memory
    code, out, err = call(capsys, isolated, "report", run)
    assert code == 0 and "Traceback" not in err, err
    assert notes(out) == [f"note: {run / 'config.yaml'} {message}: the settings of {run} are unknown"]
    assert out.splitlines()[2].split()[:6] == ["run", "ce", "3", "30.00", "30.00", "test"]  # the row is intact
    code, out, err = call(capsys, isolated, "curves", run)
    assert code == 0 and err == "", err
    assert out.splitlines() == [f"warning: {run / 'config.yaml'} {message}; drawing without it",
                                str(run / "curves.png")]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- summary.json ---------------------------------------------------------------------------------------

DAMAGED_SUMMARIES = {
    "nan": ('{"method": "ce", "epochs": 3, "teacher_top1_last": NaN}', "is refused: NaN is not a number JSON allows"),
    "infinity": ('{"teacher_top1_last": -Infinity}', "is refused: -Infinity is not a number JSON allows"),
    "out of range": ('{"teacher_top1_last": 1e999}', "is refused: the number 1e999 is out of range"),
    "huge integer": ('{"epochs": ' + "9" * 400 + "}", "is refused: an integer of 400 digits (at most 20)"),
    "deep": ("[" * 200_000 + "]" * 200_000, "is refused: nested more than 32 levels deep"),
    "deep in a string": ('{"method": "' + "[" * 100 + '"}', "is not a teskd summary: epochs, deployed_top1_last, "
                                                           "deployed_top1_best, selected_on missing"),
    "text top-1": (json.dumps(summary(teacher_top1_last="high")),
                   "is not a teskd summary: teacher_top1_last should be a finite number, got 'high'"),
    "text epochs": (json.dumps(summary(epochs="3")),
                    "is not a teskd summary: epochs should be an integer >= 1, got '3'"),
    "bool epochs": (json.dumps(summary(epochs=True)),
                    "is not a teskd summary: epochs should be an integer >= 1, got True"),
    "number method": (json.dumps(summary(method=5)), "is not a teskd summary: method should be a string, got 5"),
    "negative params": (json.dumps(summary(params_train=-1)),
                        "is not a teskd summary: params_train should be an integer >= 0 or null, got -1"),
    "text branch": (json.dumps(summary(test_acc_last={"teacher": "x"})),
                    "is not a teskd summary: test_acc_last should be a mapping of branch names to finite numbers "
                    "(at most 256), got {'teacher': 'x'}"),
    "a list": ("[1, 2]", "is not a JSON object (got [1, 2])"),
}


@pytest.mark.parametrize("case", DAMAGED_SUMMARIES)
def test_damaged_summary_is_reported_from_metrics_with_one_note(run, capsys, case):
    text, message = DAMAGED_SUMMARIES[case]
    (run / "summary.json").write_text(text)
    code, out, err = cli(capsys, "report", run)
    assert code == 0, err
    assert notes(out) == [f"note: {run / 'summary.json'} {message}; run is reported from metrics.jsonl"]
    assert out.splitlines()[2].split()[:6] == ["run", "ce", "3/3", "unfinished", "30.00", "30.00"]


@pytest.mark.parametrize("case", ["nan", "deep", "text top-1"])
def test_damaged_summary_without_metrics_is_one_error_line(run, capsys, case):
    text, message = DAMAGED_SUMMARIES[case]
    (run / "summary.json").write_text(text)
    (run / "metrics.jsonl").unlink()
    code, _, err = cli(capsys, "report", run)
    assert code == 2
    assert the_error(err) == f"error: {run / 'summary.json'} {message}, and {run} has no metrics.jsonl to report " \
                             f"it from instead"


# --- metrics.jsonl --------------------------------------------------------------------------------------

def with_line(run, number, text):
    """metrics.jsonl with line ``number`` (1-based; one past the end: appended without a newline) replaced."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[number - 1:number] = [text]
    (run / "metrics.jsonl").write_text("\n".join(lines) + ("" if number > 3 else "\n"))


DAMAGED_RECORDS = {
    "nan": ('{"epoch": 2, "train_loss": NaN}', "NaN is not a number JSON allows"),
    "huge integer": ('{"epoch": ' + "1" * 400 + "}", "an integer of 400 digits (at most 20)"),
    "deep": ("[" * 200_000, "nested more than 32 levels deep"),
    "text accuracy": ('{"epoch": 2, "test_acc": {"teacher": "x"}}',
                      "test_acc should be a mapping of branch names to finite numbers (at most 256), "
                      "got {'teacher': 'x'}"),
    "text loss part": ('{"epoch": 2, "train_loss": 1.0, "loss_kd": "high"}',
                       "loss_kd should be a finite number, got 'high'"),
    "epoch zero": ('{"epoch": 0, "train_loss": 1.0}', "epoch should be an integer >= 1, got 0"),
    "no epoch": ('{"train_loss": 1.0}', "epoch missing"),
    "a list": ("[1, 2]", "not a JSON object"),
}


@pytest.mark.parametrize("case", DAMAGED_RECORDS)
def test_damaged_metrics_line_is_one_error_line(run, capsys, case):
    text, reason = DAMAGED_RECORDS[case]
    (run / "summary.json").unlink()
    with_line(run, 2, text)
    message = f"{run / 'metrics.jsonl'} line 2 is not an epoch record ({reason}); the file is damaged or was edited"
    code, _, err = cli(capsys, "report", run)
    assert code == 2 and the_error(err) == f"error: {message}"
    code, out, err = cli(capsys, "curves", run)
    assert code == 2 and out == "" and the_error(err) == f"error: {message}"


@pytest.mark.parametrize("case", DAMAGED_RECORDS)
def test_damaged_last_metrics_line_is_dropped_with_a_warning(run, capsys, case):
    (run / "summary.json").unlink()
    with_line(run, 4, DAMAGED_RECORDS[case][0])
    code, out, err = cli(capsys, "report", run)
    assert code == 0, err
    assert notes(out) == [f"note: ignored the incomplete last line (4) of {run / 'metrics.jsonl'}"]
    assert out.splitlines()[2].split()[:5] == ["run", "ce", "3/3", "unfinished", "30.00"]
    code, out, err = cli(capsys, "curves", run)
    assert code == 0 and err == ""
    assert out.splitlines() == [f"warning: ignoring the incomplete last line (4) of {run / 'metrics.jsonl'}",
                                str(run / "curves.png")]


# --- FIFOs, devices, huge files: refused at once, never read ------------------------------------------

def fifo(path):
    path.unlink()
    os.mkfifo(path)


def dev_zero(path):
    path.unlink()
    path.symlink_to("/dev/zero")


def huge(path):
    """A sparse 65 MiB file (more than a run file may be) in place of ``path``, through a symlink."""
    target = path.with_name("huge.bin")
    with open(target, "wb") as f:
        f.truncate(65 << 20)
    path.unlink()
    path.symlink_to(target)


KINDS = {fifo: "it is a FIFO (named pipe), not a regular file",
         dev_zero: "it is a character device, not a regular file"}


@pytest.mark.parametrize("make", [fifo, dev_zero], ids=["fifo", "dev-zero"])
def test_summary_that_is_not_a_regular_file_is_a_note(run, make):
    make(run / "summary.json")
    code, out, err = cli_subprocess("report", run)
    assert code == 0, err
    assert notes(out) == [f"note: cannot read run summary {run / 'summary.json'}: {KINDS[make]}; run is reported "
                          f"from metrics.jsonl"]


@pytest.mark.parametrize("make", [fifo, dev_zero], ids=["fifo", "dev-zero"])
def test_metrics_that_is_not_a_regular_file_is_one_error_line(run, make):
    make(run / "metrics.jsonl")
    message = f"cannot read metrics log {run / 'metrics.jsonl'}: {KINDS[make]}"
    code, out, err = cli_subprocess("report", run)  # the row comes from summary.json; the note says why not both
    assert code == 0, err
    assert notes(out) == [f"note: {message}; the row of run comes from summary.json alone"]
    (run / "summary.json").unlink()
    code, _, err = cli_subprocess("report", run)
    assert code == 2 and the_error(err) == f"error: {message}"
    code, out, err = cli_subprocess("curves", run)
    assert code == 2 and out == "" and the_error(err) == f"error: {message}"


def test_oversized_metrics_is_refused_before_reading(run, capsys):
    (run / "summary.json").unlink()
    huge(run / "metrics.jsonl")
    code, _, err = cli(capsys, "report", run)
    assert code == 2 and the_error(err) == (
        f"error: refusing to read metrics log {run / 'metrics.jsonl'}: it is 68,157,440 bytes, more than a metrics "
        f"log can plausibly be (67,108,864)")


# --- names from files are printed escaped -------------------------------------------------------------

def test_report_escapes_names_from_run_folders_and_json_keeps_them(synthetic, tmp_path, capsys):
    run = Path(shutil.copytree(synthetic, tmp_path / f"run{ESC}"))
    (run / "summary.json").write_text(json.dumps(summary(method=f"ce{ESC}", selected_on=f"test{ESC}")))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["method"]["name"] = f"ce{ESC}"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for fmt in ("table", "markdown"):
        code, out, err = cli(capsys, "report", run, "--format", fmt)
        assert code == 0, err
        assert "\x1b" not in out and not any(line.startswith("forged") for line in out.splitlines())
        assert ESC_SHOWN in out
    code, out, _ = cli(capsys, "report", run)
    row = out.splitlines()[2]
    assert row.startswith(f"run{ESC_SHOWN}  ce{ESC_SHOWN}  3 ") and f"test{ESC_SHOWN}" in row
    code, out, _ = cli(capsys, "report", run, "--format", "json")
    group = json.loads(out)[0]
    assert code == 0 and group["method"] == f"ce{ESC}" and group["run_dirs"] == [str(run)]
    assert group["runs"][0]["selected_on"] == f"test{ESC}"


def test_report_escapes_names_in_notes_and_errors(synthetic, tmp_path, capsys):
    run = Path(shutil.copytree(synthetic, tmp_path / f"run{ESC}"))
    (run / "summary.json").write_text("{")
    code, out, _ = cli(capsys, "report", run)
    assert code == 0 and notes(out) == [f"note: {tmp_path}/run{ESC_SHOWN}/summary.json is empty or not valid JSON "
                                        f"(JSONDecodeError: Expecting property name enclosed in double quotes: line 1 "
                                        f"column 2 (char 1)); run{ESC_SHOWN} is reported from metrics.jsonl"]
    (run / "metrics.jsonl").unlink()
    code, _, err = cli(capsys, "report", run)
    assert code == 2 and the_error(err).startswith(f"error: {tmp_path}/run{ESC_SHOWN}/summary.json is empty")


def test_plot_labels_from_files_cannot_break_the_drawing(run, capsys, tmp_path):
    # a "$" would start matplotlib math ("$\frac{$" fails to parse, so the whole figure would fail)
    lines = [dict(r, test_acc={"teacher": r["test_acc"]["teacher"], "$\\frac{$": 1.0}) for r in records()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["method"]["name"] = "$\\frac{" + ESC
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, err = cli(capsys, "curves", run)
    assert code == 0 and out.splitlines() == [str(run / "curves.png")], err
    code, out, err = cli(capsys, "report", run, "--plot", tmp_path / "groups.png")
    assert code == 0 and out.splitlines()[-1] == f"curves: {tmp_path / 'groups.png'}", err


def test_predictions_escape_file_and_class_names():
    pred = Predictions(results=[{"file": f"cat{ESC}.png", "top": [{"label": 3, "class": f"tabby{ESC}", "prob": 0.75},
                                                                   {"label": 1, "class": "dog", "prob": 0.25}]}],
                       skipped=[(f"bad{ESC}.png", f"not an image{ESC}")])
    assert format_predictions(pred) == f"cat{ESC_SHOWN}.png  tabby{ESC_SHOWN} 0.750  dog 0.250"
    assert format_skipped(pred) == [f"skipped bad{ESC_SHOWN}.png: not an image{ESC_SHOWN}"]


def test_predict_cli_escapes_image_names(real_run, tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(images / f"red{ESC}.png")
    (images / f"broken{ESC}.png").write_bytes(b"not a png")
    code, out, err = cli(capsys, "predict", real_run / "deployed.safetensors", images, "--topk", "1")
    assert code == 0, err
    assert "\x1b" not in out + err
    assert len(out.splitlines()) == 1 and out.startswith(f"{images}/red{ESC_SHOWN}.png  ")
    assert len(err.splitlines()) == 1 and err.startswith(f"skipped {images}/broken{ESC_SHOWN}.png: ")
    code, out, _ = cli(capsys, "predict", real_run / "deployed.safetensors", images, "--json")
    result = json.loads(out)
    assert [r["file"] for r in result["results"]] == [str(images / f"red{ESC}.png")]
    assert [s["file"] for s in result["skipped"]] == [str(images / f"broken{ESC}.png")]


# --- train --resume -------------------------------------------------------------------------------------

def test_resume_drops_a_deeply_nested_torn_last_line(real_run, tmp_path, capsys):
    run = Path(shutil.copytree(real_run, tmp_path / "run"))
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(good + "[" * 200_000)  # killed while writing a (hostile) line
    code, out, err = cli(capsys, "train", "--resume", run)
    assert code == 0, err
    assert f"warning: ignoring the incomplete last line (2) of {run / 'metrics.jsonl'}" in out.splitlines()
    assert (run / "metrics.jsonl").read_text() == good  # the torn line is gone, the epoch record kept


@pytest.mark.parametrize("make", [fifo, dev_zero], ids=["fifo", "dev-zero"])
def test_resume_refuses_metrics_that_is_not_a_regular_file(real_run, tmp_path, make):
    run = Path(shutil.copytree(real_run, tmp_path / "run"))
    make(run / "metrics.jsonl")
    before = os.lstat(run / "metrics.jsonl")
    code, _, err = cli_subprocess("train", "--resume", run)
    assert code == 2
    assert the_error(err) == f"error: cannot read metrics log {run / 'metrics.jsonl'}: {KINDS[make]}"
    after = os.lstat(run / "metrics.jsonl")  # left as it was, not replaced by an emptied log
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


# --- checksum files -------------------------------------------------------------------------------------

def test_digest_file_that_is_oversized_vouches_for_nothing(tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"weights")
    digest = "a" * 64
    with open(tmp_path / "big.sha256", "wb") as f:
        f.write(f"{digest}  last.pt\n".encode())
        f.truncate(2 << 20)  # sparse: a digest file is one or two lines
    digest_path(ckpt).symlink_to(tmp_path / "big.sha256")
    assert read_digests(ckpt) == []
    digest_path(ckpt).unlink()
    digest_path(ckpt).write_text(f"{digest}  last.pt\n")
    assert read_digests(ckpt) == [digest]


def test_digest_file_that_is_a_fifo_does_not_hang(tmp_path):
    ckpt = tmp_path / "last.pt"
    os.mkfifo(digest_path(ckpt))
    code = "import sys, pathlib; from teskd.engine.checkpoint import read_digests; " \
           "print(read_digests(pathlib.Path(sys.argv[1])))"
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt)],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stderr


# --- sweeps ---------------------------------------------------------------------------------------------

def write_sweep(path, **doc):
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sweep_folder(synthetic, runs, name, epochs=3):
    """``synthetic`` as the sweep run ``name`` (its config.yaml the one the sweep builds)."""
    from teskd.config import load_config, to_dict

    run = Path(shutil.copytree(synthetic, runs / name))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config(CE, [f"train.epochs={epochs}",
                                                                             "train.seed=0"])), sort_keys=False))
    return run


def test_sweep_status_and_collect_of_damaged_runs(synthetic, tmp_path):
    runs = tmp_path / "runs"
    path = write_sweep(tmp_path / "s.yaml", out=str(runs), base=CE, overrides=["train.epochs=3"], seeds=[0],
                       runs={"fifo": {}, "zero": {}, "huge": {}})
    fifo(sweep_folder(synthetic, runs, "fifo-s0") / "metrics.jsonl")
    (runs / "fifo-s0" / "summary.json").unlink()
    dev_zero(sweep_folder(synthetic, runs, "zero-s0") / "summary.json")
    huge(sweep_folder(synthetic, runs, "huge-s0") / "metrics.jsonl")
    code, out, err = cli_subprocess("sweep", path, "--dry-run")
    assert code == 0, err
    status = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()[1:] if not line.startswith(" ")}
    assert status == {
        "fifo-s0": f"partial 0/3 epochs (unreadable: cannot read metrics log {runs / 'fifo-s0' / 'metrics.jsonl'}: "
                   f"{KINDS[fifo]})",
        "zero-s0": f"partial 3/3 epochs (unreadable: cannot read run summary {runs / 'zero-s0' / 'summary.json'}: "
                   f"{KINDS[dev_zero]})",
        "huge-s0": "done"}  # summary.json says 3 epochs; the metrics log is only copied by --collect
    code, out, err = cli_subprocess("sweep", path, "--collect", tmp_path / "res", "--no-run")
    assert code == 2
    assert the_error(err) == (f"error: refusing to read run file {runs / 'huge-s0' / 'metrics.jsonl'}: it is "
                              f"68,157,440 bytes, more than a run file can plausibly be (67,108,864)")
    assert "fifo-s0: no finished epoch yet, nothing to collect" in out.splitlines()
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["zero-s0"]  # huge-s0: nothing written
    assert sorted(p.name for p in (tmp_path / "res" / "zero-s0").iterdir()) == ["config.yaml", "metrics.jsonl"]


@pytest.mark.parametrize("keys, planned", [(6, "1,000,000"), (12, "1,000,000,000,000")])
def test_sweep_grid_too_large_is_one_line_before_expanding(tmp_path, capsys, keys, planned):
    path = write_sweep(tmp_path / "s.yaml", out=str(tmp_path / "runs"), base=CE, runs={"ce": {}},
                       grid={f"method.k{i}": list(range(10)) for i in range(keys)})
    code, _, err = cli(capsys, "sweep", path, "--list")
    assert code == 2 and the_error(err) == (
        f"error: sweep file {path}: it plans {planned} runs (1 variant x {planned} grid combinations x 1 seed), "
        f"more than the 10,000 one sweep file may plan; split it into several sweep files")


def test_sweep_cap_counts_variants_grid_and_seeds(tmp_path, capsys, monkeypatch):
    import teskd.sweep_plan

    monkeypatch.setattr(teskd.sweep_plan, "MAX_PLANNED_RUNS", 8)
    doc = dict(out=str(tmp_path / "runs"), base=CE, runs={"a": {}, "b": {}}, grid={"train.epochs": [1, 2]})
    code, out, _ = cli(capsys, "sweep", write_sweep(tmp_path / "s.yaml", **doc, seeds=[0, 1]), "--list")
    assert code == 0 and len(out.splitlines()) == 8  # exactly the cap
    path = write_sweep(tmp_path / "s.yaml", **doc, seeds=[0, 1, 2])
    code, _, err = cli(capsys, "sweep", path, "--list")
    assert code == 2 and the_error(err) == (
        f"error: sweep file {path}: it plans 12 runs (2 variants x 2 grid combinations x 3 seeds), more than the 8 "
        f"one sweep file may plan; split it into several sweep files")


def test_sweep_file_alias_bomb_is_one_line(tmp_path):
    # a bad 'seeds' is quoted in the error message: quoting the bomb expanded it (it hung)
    path = tmp_path / "s.yaml"
    path.write_text(f"out: {tmp_path / 'runs'}\nruns: {{ce: {{}}}}\nseeds:\n" + alias_bomb("  "))
    code, _, err = cli_subprocess("sweep", path, "--list")
    assert code == 2 and the_error(err) == (
        f"error: sweep file {path} has more than 100,000 values once its YAML aliases (*name) are expanded; a "
        f"config needs a few dozen (is it an alias bomb?)")


# --- plug-ins -------------------------------------------------------------------------------------------

def test_plugin_with_a_syntax_error_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "teskd_test_syntax_plugin.py").write_text("import os\n\nx = = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TESKD_PLUGINS", "teskd_test_syntax_plugin")
    code, _, err = cli(capsys, "report", tmp_path / "absent")
    line = the_error(err)
    assert code == 2 and line.startswith(f"error: TESKD_PLUGINS plug-in 'teskd_test_syntax_plugin' failed to import "
                                         f"at {tmp_path / 'teskd_test_syntax_plugin.py'}:3 (SyntaxError: ")
    assert "teskd_test_syntax_plugin" not in sys.modules


def test_plugin_raising_at_import_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "teskd_test_raising_plugin.py").write_text("import os\nraise RuntimeError('no GPU\\nhere')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TESKD_PLUGINS", "teskd_test_raising_plugin")
    code, _, err = cli(capsys, "report", tmp_path / "absent")
    assert code == 2 and the_error(err) == (
        f"error: TESKD_PLUGINS plug-in 'teskd_test_raising_plugin' failed to import at "
        f"{tmp_path / 'teskd_test_raising_plugin.py'}:2 (RuntimeError: no GPU here)")
    monkeypatch.setenv("TESKD_PLUGINS", "teskd_test_no_such_plugin")
    code, _, err = cli(capsys, "report", tmp_path / "absent")
    assert code == 2 and the_error(err) == ("error: TESKD_PLUGINS names 'teskd_test_no_such_plugin', which cannot be "
                                            "imported (No module named 'teskd_test_no_such_plugin')")
