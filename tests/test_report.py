"""`teskd report`: the comparison table (finished and unfinished runs) and the training-curve plot."""

import json

import pytest
import yaml

from teskd.cli import main
from teskd.errors import TeskdError
from teskd.report import LOSS_NOTE, curve_panels, draw_panels, plot_path

BRANCHES = ("student1", "student2", "student3", "students_ensemble")


def records_for(method, accs):
    """metrics.jsonl records as training writes them; TESKD runs have students, CE runs only the teacher."""
    records = []
    for i, a in enumerate(accs):
        test = {"teacher": a}
        if method == "teskd":
            test.update({b: a - 2 - j for j, b in enumerate(BRANCHES)})
        records.append({"epoch": i + 1, "train_loss": 4.0123 - i, "loss_ce": 0.8123 - i / 10,
                        "train_acc": {"teacher": 5.0 + 10 * i}, "test_acc": test,
                        "val_acc": {"teacher": a - 1}, "epoch_seconds": 10.0, "train_images_per_sec": 100.0 + i})
    return records


def fake_run(path, method, accs, params=(100, 50), finished=True, planned=None):
    path.mkdir(parents=True)
    records = records_for(method, accs)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method},
                                                      "train": {"epochs": planned or len(accs)}}))
    if finished:
        summary = {"method": method, "epochs": len(accs), "teacher_top1_last": accs[-1],
                   "teacher_top1_best": max(accs), "selected_on": "val", "params_train": params[0],
                   "params_deploy": params[1], "train_images_per_sec": 123.4}
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def report(capsys, *argv):
    code = main(["report", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def row_of(out, name):
    return next(line.split() for line in out.splitlines() if line.startswith(name + " "))


def test_table_and_plot(tmp_path, capsys):
    from matplotlib.image import imread

    a = fake_run(tmp_path / "ce", "ce", [10.0, 20.0, 25.0], (50, 50))
    b = fake_run(tmp_path / "teskd", "teskd", [8.0, 22.0, 30.5])
    png = tmp_path / "plots" / "curves.png"
    code, out, _ = report(capsys, a, b, "--plot", png)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run", "method", "epochs", "top-1"]
    assert row_of(out, "teskd") == ["teskd", "teskd", "3", "30.50", "30.50", "val", "100", "50", "123"]
    assert row_of(out, "ce") == ["ce", "ce", "3", "25.00", "25.00", "val", "50", "50", "123"]
    assert lines[-1] == f"curves: {png}"
    assert "unfinished" not in out and "note:" not in out
    image = imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.shape[0] > 300 and image.shape[1] > 1200  # three panels side by side
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_plot_without_png_suffix_writes_and_prints_the_png(tmp_path, capsys):
    run = fake_run(tmp_path / "ce", "ce", [10.0, 20.0])
    target = tmp_path / "out" / "curves"
    code, out, _ = report(capsys, run, "--plot", target)
    written = tmp_path / "out" / "curves.png"
    assert code == 0 and out.splitlines()[-1] == f"curves: {written}"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not target.exists()
    assert plot_path(tmp_path / "c.v2") == tmp_path / "c.v2.png"
    assert plot_path(tmp_path / "c.PNG") == tmp_path / "c.PNG"


def test_plotted_series_are_comparable_quantities(tmp_path):
    ce = fake_run(tmp_path / "ce", "ce", [10.0, 20.0, 25.0])
    teskd = fake_run(tmp_path / "teskd", "teskd", [8.0, 22.0, 30.5])
    records = {name: records_for(name, accs) for name, accs in (("ce", [10.0, 20.0, 25.0]),
                                                                   ("teskd", [8.0, 22.0, 30.5]))}
    panels = curve_panels([ce, teskd])
    assert [p.title for p in panels] == ["deployed network (teacher): test top-1",
                                         "teacher: training top-1 (same quantity for every method)",
                                         "every branch: test top-1 (teskd)"]
    series = {p.title: {s.label: s for s in p.series} for p in panels}
    test, train, branches = (series[p.title] for p in panels)
    assert list(test) == ["ce", "ce (val)", "teskd", "teskd (val)"]
    assert test["teskd"].values == [r["test_acc"]["teacher"] for r in records["teskd"]]
    assert test["ce (val)"].dashed and test["ce (val)"].values == [9.0, 19.0, 24.0]
    # the teacher's training top-1 of both methods, never a loss (TESKD's loss is a weighted multi-term sum)
    assert list(train) == ["ce", "teskd"]
    for name in ("ce", "teskd"):
        assert train[name].values == [r["train_acc"]["teacher"] for r in records[name]]
        assert train[name].epochs == [1, 2, 3]
    plotted = [v for p in panels for s in p.series for v in s.values]
    assert not {r[k] for rs in records.values() for r in rs for k in ("train_loss", "loss_ce")} & set(plotted)
    # every branch of the TESKD run, and nothing of the CE run, in the third panel
    assert list(branches) == ["teacher", *BRANCHES]
    assert branches["student2"].values == [r["test_acc"]["student2"] for r in records["teskd"]]

    fig = draw_panels(panels)
    try:
        axes = fig.axes
        assert [ax.get_title() for ax in axes] == [p.title for p in panels]
        for ax, panel in zip(axes, panels):
            lines = ax.get_lines()
            assert [line.get_label() for line in lines] == [s.label for s in panel.series]
            assert [list(line.get_ydata()) for line in lines] == [s.values for s in panel.series]
        assert any(LOSS_NOTE in t.get_text() for t in fig.texts)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_ce_runs_only_have_two_panels(tmp_path):
    ce = fake_run(tmp_path / "ce", "ce", [10.0, 20.0])
    assert [p.title.split(":")[0] for p in curve_panels([ce])] == ["deployed network (teacher)", "teacher"]


def test_unfinished_run_is_reported_from_its_metrics(tmp_path, capsys):
    done = fake_run(tmp_path / "done", "ce", [10.0, 20.0])
    running = fake_run(tmp_path / "running", "teskd", [8.0, 22.0, 21.0], finished=False, planned=200)
    code, out, err = report(capsys, done, running)
    assert code == 0, err
    # last epoch's test top-1, best selected on val (epoch 2), img/s over all epochs, params unknown
    assert row_of(out, "running") == ["running", "teskd", "3/200", "unfinished", "21.00", "22.00", "val",
                                      "-", "-", "101"]
    assert row_of(out, "done")[2] == "2"
    assert "unfinished: no summary.json yet" in out


def test_torn_last_metrics_line_is_ignored(tmp_path, capsys):
    run = fake_run(tmp_path / "killed", "ce", [10.0, 20.0, 30.0], finished=False, planned=15)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + text.splitlines()[0][:25])  # killed while writing epoch 4
    code, out, err = report(capsys, run, "--plot", tmp_path / "c.png")
    assert code == 0, err
    assert row_of(out, "killed")[2:5] == ["3/15", "unfinished", "30.00"]
    assert f"note: ignored the incomplete last line (4) of {run / 'metrics.jsonl'}" in out
    assert (tmp_path / "c.png").is_file()


def test_damaged_metrics_line_is_a_one_line_error(tmp_path, capsys):
    run = fake_run(tmp_path / "edited", "ce", [10.0, 20.0, 30.0], finished=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = report(capsys, run)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {run / 'metrics.jsonl'} line 2 is not an epoch record")


@pytest.mark.parametrize("content", ["", "\n", "{\"epoch\": 1"])
def test_no_finished_epoch_is_a_one_line_error_naming_the_file(tmp_path, capsys, content):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    code, _, err = report(capsys, run)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"error: {run / 'metrics.jsonl'} holds no finished epoch" in err


@pytest.mark.parametrize("content", ["", "{truncated", "[1, 2]", "{\"method\": \"ce\"}"])
def test_broken_summary_falls_back_to_metrics_with_a_note(tmp_path, capsys, content):
    run = fake_run(tmp_path / "broken", "ce", [10.0, 20.0])
    (run / "summary.json").write_text(content)
    code, out, err = report(capsys, run)
    assert code == 0, err
    assert row_of(out, "broken")[2:5] == ["2/2", "unfinished", "20.00"]
    note = next(line for line in out.splitlines() if line.startswith("note: "))
    assert str(run / "summary.json") in note and "reported from metrics.jsonl" in note


def test_broken_summary_without_metrics_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("")
    code, _, err = report(capsys, run)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{run / 'summary.json'} is empty or not valid JSON" in err and "no metrics.jsonl" in err


def test_summary_older_than_metrics_is_reported_as_unfinished(tmp_path, capsys):
    run = fake_run(tmp_path / "resumed", "ce", [10.0, 20.0], planned=5)
    with (run / "metrics.jsonl").open("a") as f:  # resumed with train.epochs=5 after finishing 2
        f.write(json.dumps(records_for("ce", [10.0, 20.0, 27.0])[-1]) + "\n")
    code, out, _ = report(capsys, run)
    assert code == 0 and row_of(out, "resumed")[2:5] == ["3/5", "unfinished", "27.00"]
    assert "is from epoch 2, but metrics.jsonl goes on to epoch 3" in out


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such run directory"),
    (lambda p: (p.mkdir(), p)[1], "is not a teskd run directory (it has no summary.json and no metrics.jsonl)"),
    (lambda p: (p.write_text("x"), p)[1], "is a file, not a run directory"),
])
def test_not_a_run_is_a_one_line_error(tmp_path, capsys, make, message):
    path = make(tmp_path / "thing")
    code, _, err = report(capsys, path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_summary_table_raises_teskd_error(tmp_path):
    from teskd.report import summary_table

    with pytest.raises(TeskdError, match="no such run directory"):
        summary_table([tmp_path / "absent"])
