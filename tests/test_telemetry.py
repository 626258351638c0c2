"""Training telemetry: TensorBoard events (train.tensorboard=true) and RUN/curves.png, their place in the run
folder (--overwrite, resume), and `teskd curves`."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from teskd.cli import main
from teskd.curves import draw_curves, plot_curves, plot_run, run_title
from teskd.engine.rundir import RunDir
from teskd.engine.tensorboard import TensorBoardLog
from teskd.errors import TeskdError

from conftest import REPO

CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_teskd.yaml")
TESKD_RUN = REPO / "benchmarks" / "results" / "reduced" / "teskd-e15-s0"
CE_RUN = REPO / "benchmarks" / "results" / "reduced" / "ce-e15-s0"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INSTALL_HINT = "pip install 'teskd[tensorboard]'"


def records_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files of ``log_dir``, as (step, value) pairs, as TensorBoard reads them."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_png(path: Path, size=(540, 1440)) -> None:
    """A PNG file that matplotlib reads back at the expected pixel size (12 x 4.5 in at 120 dpi)."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.shape[:2] == size and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].std() > 0.05  # something is drawn (not a blank canvas)


def record(epoch: int, teacher: float, **extra) -> dict:
    r = {"epoch": epoch, "lr": 0.1 / epoch, "train_loss": 4.0 - epoch, "loss_ce": 3.5 - epoch, "loss_kd": 0.5,
         "train_acc": {"teacher": 10.0 * epoch, "student1": 9.0 * epoch}, "epoch_seconds": 5.0 + epoch,
         "train_images_per_sec": 100.0 * epoch, "data_wait_share": 0.01 * epoch,
         "test_acc": {"teacher": teacher, "student1": teacher - 1}, "test_top5": {"teacher": teacher + 20}}
    r.update(extra)
    return r


# --- TensorBoard ------------------------------------------------------------------------------------


def test_tensorboard_scalars_read_back_by_tag_and_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    records = [record(1, 12.5, val_acc={"teacher": 11.0}),
               record(2, 20.25, loss_kd=float("nan"), loss_feat=float("inf"), note="text", flag=True)]
    with TensorBoardLog(tmp_path / "tb") as tb:
        for r in records:
            tb.log_epoch(r)
    assert all(p.name.startswith("events.out.tfevents.") for p in (tmp_path / "tb").iterdir())
    got = scalars(tmp_path / "tb")
    assert set(got) == {"test_acc/teacher", "test_acc/student1", "test_top5/teacher", "val_acc/teacher",
                        "train_acc/teacher", "train_acc/student1", "loss/train_loss", "loss/loss_ce",
                        "loss/loss_kd", "lr", "throughput/train_images_per_sec", "throughput/data_wait_share",
                        "time/epoch_seconds"}  # the non-finite loss_feat, the string and the bool are skipped
    assert got["test_acc/teacher"] == [(1, 12.5), (2, 20.25)]
    assert got["test_acc/student1"] == [(1, 11.5), (2, 19.25)]
    assert got["val_acc/teacher"] == [(1, 11.0)]
    assert got["loss/loss_kd"] == [(1, 0.5)]  # NaN at epoch 2 is not written
    for tag, key in (("lr", "lr"), ("loss/train_loss", "train_loss"), ("time/epoch_seconds", "epoch_seconds"),
                     ("throughput/train_images_per_sec", "train_images_per_sec"),
                     ("throughput/data_wait_share", "data_wait_share")):
        assert [s for s, _ in got[tag]] == [1, 2]
        assert [v for _, v in got[tag]] == pytest.approx([r[key] for r in records], rel=1e-6), tag


def test_purge_step_drops_the_events_a_killed_process_logged_past_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    log_dir = tmp_path / "tb"
    with TensorBoardLog(log_dir) as tb:  # epochs 1-3 logged, then killed with a checkpoint of epoch 2
        for epoch in (1, 2, 3):
            tb.log_epoch(record(epoch, 10.0 * epoch))
    redone = record(3, 77.0)
    del redone["test_acc"]["student1"]  # a tag only the discarded epoch 3 had at that step
    with TensorBoardLog(log_dir, purge_step=3) as tb:  # the resume redoes epoch 3, then epoch 4
        tb.log_epoch(redone)
        tb.log_epoch(record(4, 80.0))
    got = scalars(log_dir)
    assert got["test_acc/teacher"] == [(1, 10.0), (2, 20.0), (3, 77.0), (4, 80.0)]
    assert [s for s, _ in got["test_acc/student1"]] == [1, 2, 4]
    assert len(list(log_dir.iterdir())) == 2


@pytest.mark.parametrize("missing", ["torch.utils.tensorboard", "tensorboard"])
def test_missing_tensorboard_is_a_one_line_error(monkeypatch, tmp_path, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import of it now raises ImportError
    with pytest.raises(TeskdError) as info:
        TensorBoardLog(tmp_path / "tb")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and INSTALL_HINT in message and "train.tensorboard=true" in message
    assert not (tmp_path / "tb").exists()


def test_missing_tensorboard_fails_the_run_before_it_starts(monkeypatch, tmp_path, capsys, cifar100_root):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main(["train", CONFIG, *tiny(cifar100_root, "train.epochs=1", "train.tensorboard=true"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and INSTALL_HINT in err
    assert not out.exists()  # failed before the folder, the data or any epoch


# --- curves.png -------------------------------------------------------------------------------------


def test_plot_curves_one_epoch(tmp_path):
    out = plot_curves([record(1, 5.0)], tmp_path / "curves.png", title="one epoch")
    assert out == tmp_path / "curves.png"
    assert_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left


def test_plot_curves_of_a_real_teskd_run(tmp_path):
    records = records_of(TESKD_RUN)
    out = plot_curves(records, tmp_path / "teskd.png", title="teskd-e15-s0")
    assert_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["teskd.png"]
    acc, loss = draw_curves(records, "t", "teacher").axes
    labels = acc.get_legend_handles_labels()[1]
    assert labels == ["teacher (deployed)", "student1", "student2", "student3", "students_ensemble"]
    assert [len(line.get_xdata()) for line in acc.lines] == [len(records)] * 5
    assert loss.get_legend_handles_labels()[1] == ["train_loss (total)", "loss_ce", "loss_feat", "loss_kd"]
    assert loss.get_yscale() == "log"  # loss_feat ~1e-3 beside loss_ce ~3: linear would flatten it to zero
    assert draw_curves(records_of(CE_RUN)).axes[1].get_yscale() == "linear"  # one part, one decade


def test_plot_curves_val_many_branches_and_missing_keys(tmp_path):
    branches = [f"exit{i}" for i in range(14)]
    records = [record(e, 3.0 * e, val_acc={"teacher": 3.0 * e + 1}) for e in (1, 2, 3)]
    for r in records:
        r["test_acc"].update({b: float(i + r["epoch"]) for i, b in enumerate(branches)})
        r["loss_kd"] = 0.0  # a part that is zero: no log axis
    del records[1]["test_acc"]["student1"], records[2]["loss_ce"], records[0]["lr"]
    fig = draw_curves(records, "", "teacher")
    acc, loss = fig.axes
    labels = acc.get_legend_handles_labels()[1]
    assert labels[0] == "teacher (deployed)" and "teacher (deployed), val" in labels
    val = acc.lines[labels.index("teacher (deployed), val")]
    assert val.get_linestyle() == "--"
    student1 = acc.lines[labels.index("student1")]
    assert list(student1.get_xdata()) == [1, 3]
    others = [line for label, line in zip(labels, acc.lines) if "teacher" not in label]
    assert len({line.get_color() if isinstance(line.get_color(), str) else tuple(line.get_color())
                for line in others}) == len(others) == 15  # no colour repeats among 15 branches
    assert loss.get_yscale() == "linear"
    assert_png(plot_curves(records, tmp_path / "c.png"))


def test_plot_curves_refuses_nothing_to_draw(tmp_path):
    with pytest.raises(TeskdError, match="no finished epoch"):
        plot_curves([], tmp_path / "c.png")
    assert not list(tmp_path.iterdir())


def test_plot_run_of_a_folder_and_its_errors(tmp_path):
    run = tmp_path / "teskd-e15-s0"
    shutil.copytree(TESKD_RUN, run)
    (run / "curves.png").unlink(missing_ok=True)
    assert plot_run(run) == run / "curves.png"
    assert_png(run / "curves.png")
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    config = {"method": {"name": "teskd"}, "data": {"dataset": "cifar100"},
              "model": {"arch": "resnet18", "width_mult": 0.125}, "train": {"seed": 0}}
    assert run_title("r", config) == "r: teskd, cifar100, resnet18 x0.125, seed 0"
    assert run_title("r", None) == "r"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(TeskdError, match="no finished epoch") as info:
        plot_run(empty)
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(TeskdError, match="no such directory"):
        plot_run(tmp_path / "absent")


# --- run folder: what is teskd's ---------------------------------------------------------------------


def make_run(path: Path) -> RunDir:
    path.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png"):
        (path / name).write_text("x")
    (path / "tensorboard").mkdir()
    (path / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"e")
    (path / "tensorboard" / "events.out.tfevents.2.host.2.0").write_bytes(b"e")
    return RunDir(path)


def test_curves_and_event_files_are_the_runs_own(tmp_path):
    run = make_run(tmp_path / "run")
    assert run.foreign_entries() == []
    run.check_replaceable()
    run.clear()
    assert not (run.path / "curves.png").exists() and not (run.path / "tensorboard").exists()


@pytest.mark.parametrize("stray", ["file", "folder", "symlink", "folder-symlink"])
def test_anything_else_in_tensorboard_is_foreign(tmp_path, stray):
    run = make_run(tmp_path / "run")
    tb = run.path / "tensorboard"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("mine")
    if stray == "file":
        (tb / "notes.txt").write_text("mine")
        expected = "tensorboard/notes.txt"
    elif stray == "folder":
        (tb / "events.out.tfevents.sub").mkdir()
        expected = "tensorboard/events.out.tfevents.sub"
    elif stray == "symlink":
        (tb / "events.out.tfevents.3.host.3.0").symlink_to(outside / "data.txt")
        expected = "tensorboard/events.out.tfevents.3.host.3.0"
    else:
        shutil.rmtree(tb)
        tb.symlink_to(outside)
        expected = "tensorboard"
    assert run.foreign_entries() == [expected]
    with pytest.raises(TeskdError, match="refusing to --overwrite"):
        run.check_replaceable()
    run.clear()  # (never called on such a folder; even so it removes only teskd's files)
    assert (outside / "data.txt").read_text() == "mine"
    if stray == "file":
        assert (tb / "notes.txt").read_text() == "mine" and not list(tb.glob("events.out.tfevents.*"))


# --- end to end: a tiny real training run ------------------------------------------------------------


def tiny(root, *extra) -> list[str]:
    return [f"data.root={root}", "model.width_mult=0.125", "data.subset_per_class=2",
            "data.test_subset_per_class=1", "data.batch_size=100", "data.eval_batch_size=100",
            "train.progress=false", "train.deterministic=true", "train.threads=1", *extra]


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """One epoch with train.tensorboard=true, then resumed to a second."""
    pytest.importorskip("tensorboard")
    from conftest import SHARED_CIFAR100

    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100}")
    out = tmp_path_factory.mktemp("runs") / "tb"
    assert main(["train", CONFIG, *tiny(SHARED_CIFAR100, "train.epochs=1", "train.tensorboard=true"),
                 "--out", str(out)]) == 0
    first = {"events": sorted(p.name for p in (out / "tensorboard").iterdir()),
             "scalars": scalars(out / "tensorboard"), "curves": (out / "curves.png").read_bytes()}
    assert main(["train", "--resume", str(out), "train.epochs=2"]) == 0
    return out, first, SHARED_CIFAR100


def test_run_writes_events_and_curves(tb_run):
    run, first, _ = tb_run
    assert len(first["events"]) == 1 and first["events"][0].startswith("events.out.tfevents.")
    assert [s for s, _ in first["scalars"]["test_acc/teacher"]] == [1]
    assert_png(run / "curves.png")
    assert RunDir(run).foreign_entries() == []


def test_resume_continues_the_event_steps(tb_run):
    run, first, _ = tb_run
    events = sorted(p.name for p in (run / "tensorboard").iterdir())
    assert len(events) == 2 and all(name.startswith("events.out.tfevents.") for name in events)
    records = records_of(run)
    got = scalars(run / "tensorboard")
    assert got["test_acc/teacher"] == [(r["epoch"], pytest.approx(r["test_acc"]["teacher"], abs=1e-4))
                                       for r in records]
    assert [s for s, _ in got["test_acc/teacher"]] == [1, 2]
    assert [s for s, _ in got["loss/loss_kd"]] == [1, 2]
    assert {"val_acc/teacher"} & set(got) == set()  # no validation split in this run
    assert (run / "curves.png").read_bytes() != first["curves"]  # redrawn with both epochs


def test_teskd_curves_redraws_the_png(tb_run, tmp_path, capsys):
    run, _, _ = tb_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "curves.png").unlink()
    assert main(["curves", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "curves.png")
    assert_png(copy / "curves.png")
    assert main(["curves", str(copy), "--out", str(tmp_path / "elsewhere.png")]) == 0
    assert_png(tmp_path / "elsewhere.png")
    capsys.readouterr()
    assert main(["curves", str(copy), str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_overwrite_replaces_the_events_and_curves(tb_run, tmp_path):
    run, _, data = tb_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    old_events = {p.name for p in (copy / "tensorboard").iterdir()}
    assert main(["train", CONFIG, *tiny(data, "train.epochs=1", "train.tensorboard=true"),
                 "--out", str(copy), "--overwrite"]) == 0
    events = {p.name for p in (copy / "tensorboard").iterdir()}
    assert len(events) == 1 and not events & old_events
    assert [s for s, _ in scalars(copy / "tensorboard")["test_acc/teacher"]] == [1]
    assert [r["epoch"] for r in records_of(copy)] == [1]
    assert_png(copy / "curves.png")


def test_overwrite_refuses_a_stray_file_in_tensorboard(tb_run, tmp_path, capsys):
    run, _, data = tb_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "tensorboard" / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    assert main(["train", CONFIG, *tiny(data, "train.epochs=1", "train.tensorboard=true"),
                 "--out", str(copy), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to --overwrite" in err and "tensorboard/notes.txt" in err
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
    assert (copy / "tensorboard" / "notes.txt").read_text() == "mine"


def test_failed_drawing_never_fails_the_run(tb_run, tmp_path, monkeypatch, capsys):
    """Without train.tensorboard no events folder; a failing plot is one logged line, the run succeeds."""
    import teskd.run_callbacks as trainer_module

    def broken(*args, **kwargs):
        raise RuntimeError("no display\nat all")

    monkeypatch.setattr(trainer_module, "plot_curves", broken)
    run, _, data = tb_run
    out = tmp_path / "plain"
    assert main(["train", CONFIG, *tiny(data, "train.epochs=1"), "--out", str(out)]) == 0
    assert not (out / "tensorboard").exists() and not (out / "curves.png").exists()
    assert (out / "summary.json").is_file() and (out / "deployed.safetensors").is_file()
    notes = [line for line in capsys.readouterr().out.splitlines() if "curves.png not written" in line]
    assert len(notes) == 1 and "RuntimeError: no display at all" in notes[0] and f"teskd curves {out}" in notes[0]
