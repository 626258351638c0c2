"""`teskd report`: the comparison table (finished and unfinished runs) and the training-curve plot."""

import json

import pytest
import yaml

from teskd.cli import main
from teskd.errors import TeskdError
from teskd.report import LOSS_NOTE, draw_report, format_report, group_runs, plot_path, read_run

BRANCHES = ("student1", "student2", "student3", "students_ensemble")
DEPLOYED = {"ce": "deployed", "teskd": "teacher"}  # each method's deploy_branch


def records_for(method, accs):
    """metrics.jsonl records as training writes them; TESKD runs have students, CE runs only the deployed
    network (each under its method's deploy_branch)."""
    records, name = [], DEPLOYED[method]
    for i, a in enumerate(accs):
        test = {name: a}
        if method == "teskd":
            test.update({b: a - 2 - j for j, b in enumerate(BRANCHES)})
        records.append({"epoch": i + 1, "train_loss": 4.0123 - i, "loss_ce": 0.8123 - i / 10,
                        "train_acc": {name: 5.0 + 10 * i}, "test_acc": test,
                        "val_acc": {name: a - 1}, "epoch_seconds": 10.0, "train_images_per_sec": 100.0 + i})
    return records


def fake_run(path, method, accs, params=(100, 50), finished=True, planned=None):
    path.mkdir(parents=True)
    records = records_for(method, accs)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method},
                                                      "train": {"epochs": planned or len(accs)}}))
    if finished:
        summary = {"method": method, "epochs": len(accs), "deployed_top1_last": accs[-1],
                   "deployed_top1_best": max(accs), "selected_on": "val", "params_train": params[0],
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


def figure_of(*runs):
    return draw_report(group_runs([read_run(r, []) for r in runs]))


def lines_of(ax) -> dict[str, list[float]]:
    return {line.get_label(): [float(v) for v in line.get_ydata()] for line in ax.get_lines()}


def test_plotted_series_are_comparable_quantities(tmp_path):
    """Each method's deployed network, whatever its branch is called (CE: deployed, TESKD: teacher)."""
    ce = fake_run(tmp_path / "ce", "ce", [10.0, 20.0, 25.0])
    teskd = fake_run(tmp_path / "teskd", "teskd", [8.0, 22.0, 30.5])
    records = {name: records_for(name, accs) for name, accs in (("ce", [10.0, 20.0, 25.0]),
                                                                   ("teskd", [8.0, 22.0, 30.5]))}
    fig = figure_of(ce, teskd)  # groups: [1] ce, [2] teskd
    a, b, c, d = fig.axes[:4]
    assert [ax.get_title().split(" ")[0] for ax in (a, b, c, d)] == ["(a)", "(b)", "(c)", "(d)"]
    test = [list(line.get_ydata()) for line in a.get_lines() if line.get_linestyle() == "-"]
    val = [list(line.get_ydata()) for line in a.get_lines() if line.get_linestyle() == "--"]
    assert test == [[10.0, 20.0, 25.0], [8.0, 22.0, 30.5]] and val == [[9.0, 19.0, 24.0], [7.0, 21.0, 29.5]]
    # (c): the deployed network's training top-1 of both methods, never a loss (TESKD's is a weighted sum)
    assert c.get_title().startswith("(c) deployed network: training top-1")
    assert lines_of(c) == {"[1]": [r["train_acc"]["deployed"] for r in records["ce"]],
                           "[2]": [r["train_acc"]["teacher"] for r in records["teskd"]]}
    plotted = [v for ax in (a, c, d) for values in lines_of(ax).values() for v in values]
    assert not {r[k] for rs in records.values() for r in rs for k in ("train_loss", "loss_ce")} & set(plotted)
    # (d): every branch of the TESKD run, nothing of the CE run
    assert d.get_title().endswith("([2])") and list(lines_of(d)) == ["teacher", *BRANCHES]
    assert lines_of(d)["student2"] == [r["test_acc"]["student2"] for r in records["teskd"]]
    assert fig._suptitle.get_text() == LOSS_NOTE


def test_ce_runs_only_have_three_panels(tmp_path):
    fig = figure_of(fake_run(tmp_path / "ce", "ce", [10.0, 20.0]))
    assert [ax.get_title()[:3] for ax in fig.axes] == ["(a)", "(b)", "(c)"]


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


def test_format_report_raises_teskd_error(tmp_path):
    with pytest.raises(TeskdError, match="no such run directory"):
        format_report([tmp_path / "absent"])


# --- groups of seeds: --format table | markdown | csv | json ---------------------------------------------

def grouped_run(path, method, accs, seed, *overrides, finished=True, macs=None):
    """A run folder as training writes it: the full resolved config.yaml of a repository config."""
    from teskd.config import load_config, to_dict

    from conftest import REPO

    cfg = to_dict(load_config(REPO / "configs" / "cifar100" / f"resnet18_{method}.yaml",
                              ["model.width_mult=0.125", f"train.epochs={len(accs)}", f"train.seed={seed}",
                               f"data.root=/data/{seed}", f"train.threads={seed + 1}", *overrides]))
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    records = records_for(method, accs)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        best = max(range(len(accs)), key=lambda i: records[i]["val_acc"][DEPLOYED[method]])
        summary = {"method": method, "arch": "resnet18", "dataset": "cifar100", "epochs": len(accs),
                   "deployed_branch": DEPLOYED[method],
                   "deployed_top1_last": accs[-1], "deployed_top1_best": accs[best], "selected_on": "val",
                   "test_acc_last": records[-1]["test_acc"], "params_train": 300 if method == "teskd" else 100,
                   "params_deploy": 100, "train_images_per_sec": 100.0 + 10 * seed,
                   **({"macs_train": macs[0], "macs_deploy": macs[1]} if macs else {})}
        (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def seeded(tmp_path):
    """2 seeds of CE and TESKD, 1 of TESKD with the teacher detached, 1 of TESKD at another lr."""
    root = tmp_path / "sweep"
    runs = [grouped_run(root / "ce-s0", "ce", [10.0, 31.0, 30.0], 0),
            grouped_run(root / "ce-s1", "ce", [12.0, 22.0, 32.0], 1),
            grouped_run(root / "teskd-s0", "teskd", [11.0, 25.0, 35.0], 0, macs=(3_000_000, 1_000_000)),
            grouped_run(root / "teskd-s1", "teskd", [13.0, 27.0, 38.0], 1, macs=(3_000_000, 1_000_000)),
            grouped_run(root / "detach-s0", "teskd", [11.0, 25.0, 33.0], 0, "method.detach_teacher=true"),
            grouped_run(root / "lr-s0", "teskd", [9.0, 20.0, 29.0], 0, "optim.lr=0.05")]
    return root, runs


# (settings, n, last mean, last std, best mean, best std, delta vs CE), worked out by hand from the fixture
EXPECTED = [
    ("optim.lr=0.05 method.detach_teacher=false", 1, 29.0, None, 29.0, None, None),  # no CE at lr 0.05
    ("optim.lr=0.1", 2, 31.0, 2 ** 0.5, 31.5, 0.5 ** 0.5, None),  # CE: last 30, 32; best 31, 32
    ("optim.lr=0.1 method.detach_teacher=false", 2, 36.5, 4.5 ** 0.5, 36.5, 4.5 ** 0.5, 5.5),
    ("optim.lr=0.1 method.detach_teacher=true", 1, 33.0, None, 33.0, None, 2.0),
]


def test_groups_json_has_hand_computed_statistics(seeded, capsys):
    root, runs = seeded
    code, out, err = report(capsys, *runs, "--format", "json")
    assert code == 0, err
    groups = json.loads(out)
    assert [(g["method"], g["settings"]) for g in groups] == [("teskd", EXPECTED[0][0]), ("ce", EXPECTED[1][0]),
                                                              ("teskd", EXPECTED[2][0]), ("teskd", EXPECTED[3][0])]
    for g, (settings, n, last, last_std, best, best_std, delta) in zip(groups, EXPECTED):
        assert (g["dataset"], g["arch"], g["width_mult"]) == ("cifar100", "resnet18", 0.125)
        assert g["n"] == n and g["top1_last_mean"] == pytest.approx(last) and g["top1_best_mean"] == pytest.approx(best)
        for got, want in ((g["top1_last_std"], last_std), (g["top1_best_std"], best_std), (g["delta_vs_ce"], delta)):
            assert got == (None if want is None else pytest.approx(want))
    ce, teskd = groups[1], groups[2]
    assert ce["seeds"] == [0, 1] and ce["run_dirs"] == [str(runs[0]), str(runs[1])]
    assert [r["top1_last"] for r in ce["runs"]] == [30.0, 32.0] and [r["top1_best"] for r in ce["runs"]] == [31.0, 32.0]
    assert ce["settings_dict"] == {"optim.lr": 0.1} and ce["epochs"] == "3/3" and ce["unfinished"] == 0
    assert teskd["test_acc_last_mean"]["student1"] == pytest.approx(36.5 - 2)
    assert teskd["train_images_per_sec"] == pytest.approx(105.0)
    assert (teskd["params_train"], teskd["params_deploy"]) == (300, 100)
    assert (teskd["macs_train"], teskd["macs_deploy"]) == (3_000_000, 1_000_000) and ce["macs_train"] is None
    # the seed, data.root and train.threads differ between the runs but are not settings
    assert not any(k in out for k in ("train.seed=", "data.root=", "train.threads="))


def test_groups_csv_and_markdown_parse_back(seeded, capsys):
    import csv

    root, runs = seeded
    code, out, _ = report(capsys, *runs, "--format", "csv")
    rows = list(csv.DictReader(out.splitlines()))
    assert code == 0 and len(rows) == 4
    assert list(rows[0])[:6] == ["dataset", "arch", "width_mult", "method", "settings", "n"]
    assert "last_student1" in rows[0] and "macs_train" in rows[0]
    for row, (settings, n, last, last_std, best, best_std, delta) in zip(rows, EXPECTED):
        assert row["settings"] == settings and int(row["n"]) == n
        assert float(row["top1_last_mean"]) == pytest.approx(last)
        assert float(row["top1_best_mean"]) == pytest.approx(best)
        for key, want in (("top1_last_std", last_std), ("top1_best_std", best_std), ("delta_vs_ce", delta)):
            assert (row[key] == "") if want is None else float(row[key]) == pytest.approx(want, abs=1e-4)
    assert rows[2]["macs_train"] == "3000000" and rows[1]["macs_train"] == ""

    code, out, _ = report(capsys, root, "--format", "markdown")  # the folder holding the runs
    table = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]
    assert code == 0 and set(table[1].replace("|", "").split()) <= {"---", "---:"} and len(cells) == 4
    for cell, (settings, n, last, last_std, best, best_std, delta) in zip(cells, EXPECTED):
        assert cell["settings"] == settings and cell["n"] == str(n)
        assert cell["top-1 last"] == f"{last:.2f} ± " + ("—" if last_std is None else f"{last_std:.2f}")
        assert cell["top-1 best"] == f"{best:.2f} ± " + ("—" if best_std is None else f"{best_std:.2f}")
        assert cell["Δ vs CE"] == ("—" if delta is None else f"{delta:+.2f}")
    assert cells[2]["MACs train"] == "3.0M" and cells[1]["MACs train"] == "not measured"


def test_table_shows_runs_then_groups(seeded, capsys):
    root, runs = seeded
    code, out, _ = report(capsys, *runs)
    assert code == 0
    assert row_of(out, "ce-s0")[:5] == ["ce-s0", "ce", "3", "30.00", "31.00"]  # the per-run table, first
    groups = out[out.index("groups ("):].splitlines()
    # groups are keyed [k]: results, then each one's settings, then cost, then branches
    key = next(g.split()[0] for g in groups if g.endswith(" optim.lr=0.1 method.detach_teacher=false"))
    results = next(g for g in groups if g.startswith(key + " ") and "cifar100" in g)
    assert "36.50 ± 2.12" in results and "+5.50" in results
    cost = next(g for g in groups if g.startswith(key + " ") and "3.0M" in g)
    assert cost.split()[1:3] == ["25.00", "105"]  # train top-1, img/s (mean of 100 + 10 * seed, seeds 0 and 1)
    branches = next(g for g in groups[groups.index(cost) + 1:] if g.startswith(key + " "))
    assert branches == f"{key} teacher=36.50 student1=34.50 student2=33.50 student3=32.50 students_ensemble=31.50"
    ce = next(g for g in groups if g.split()[1:5] == ["cifar100", "resnet18", "0.125", "ce"])
    assert "31.00 ± 1.41" in ce and "31.50 ± 0.71" in ce
    ce_cost = next(g for g in groups if g.startswith(ce.split()[0] + " ") and "not measured" in g)
    assert ce_cost.split()[3:5] == ["100", "100"]  # params train, deploy


def test_text_table_fits_in_120_columns_and_markdown_keeps_every_column(seeded, capsys):
    """The groups of the text table used to be one 250-320 column line each; now they are narrower blocks."""
    root, runs = seeded
    code, out, _ = report(capsys, *runs)
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 120
    code, md, _ = report(capsys, *runs, "--format", "markdown")
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header[:5] == ["dataset", "arch", "width", "method", "settings"]
    assert {"params train", "MACs deploy", "branches (last top-1)"} <= set(header)


def test_numbers_are_printed_without_float_noise(tmp_path, capsys):
    """18.1 - 30.0 is -11.899999999999999 in binary floating point: csv, markdown and text print -11.9 rounded;
    json keeps the full value."""
    ce = grouped_run(tmp_path / "ce-s0", "ce", [20.0, 30.0], 0)
    teskd = grouped_run(tmp_path / "teskd-s0", "teskd", [10.0, 18.1], 0)
    outputs = {}
    for fmt in ("table", "markdown", "csv", "json"):
        code, outputs[fmt], err = report(capsys, ce, teskd, "--format", fmt)
        assert code == 0, err
    groups = {g["method"]: g for g in json.loads(outputs["json"])}
    assert groups["teskd"]["delta_vs_ce"] == 18.1 - 30.0 != -11.9  # full precision
    import csv

    row = next(r for r in csv.DictReader(outputs["csv"].splitlines()) if r["method"] == "teskd")
    assert row["delta_vs_ce"] == "-11.9" and row["delta_paired_mean"] == "-11.9"
    for fmt in ("table", "markdown", "csv"):
        assert "99999" not in outputs[fmt] and "00000" not in outputs[fmt], fmt
    assert "-11.90" in outputs["table"] and "-11.90" in outputs["markdown"]


def test_folder_of_runs_and_unfinished_seed(seeded, capsys, tmp_path):
    root, runs = seeded
    grouped_run(root / "ce-s2", "ce", [14.0, 20.0], 2, "train.epochs=3", finished=False)  # 2 of 3 epochs
    waiting = root / "ce-s3"  # a run that has not finished an epoch: left out, with a note
    waiting.mkdir()
    (waiting / "config.yaml").write_text((runs[0] / "config.yaml").read_text())
    (waiting / "metrics.jsonl").write_text("")
    (root / "notes").mkdir()  # not a run: ignored
    code, out, err = report(capsys, tmp_path, "--format", "json")  # two levels above the runs
    assert code == 0, err
    ce = next(g for g in json.loads(out) if g["method"] == "ce")
    # the unfinished seed is listed but not averaged with the finished ones
    assert ce["n"] == 2 and ce["seeds"] == [0, 1] and ce["epochs"] == "3/3,3/3,2/3*" and ce["unfinished"] == 1
    assert ce["top1_last_mean"] == pytest.approx((30 + 32) / 2)
    assert [r["finished"] for r in ce["runs"]] == [True, True, False] and ce["runs"][2]["top1_last"] == 20.0
    assert f"note: left out {waiting}: it has not finished an epoch yet" in err  # stderr: stdout stays JSON
    code, out, _ = report(capsys, root)
    assert code == 0 and "*: unfinished run" in out and "2/3 unfinished" in out


def test_unfinished_run_between_evaluations_names_the_epoch_of_its_numbers(tmp_path, capsys):
    """train.eval_every=2: epochs 3 and 4 finished, only 2 and 4 evaluated; stopped after 5 of 10."""
    run = fake_run(tmp_path / "sparse", "ce", [10.0, 20.0, 25.0, 28.0, 29.0], finished=False, planned=10)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records[0::2]:
        del r["test_acc"], r["val_acc"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = report(capsys, run)
    assert code == 0, err
    assert " ".join(row_of(out, "sparse")[2:10]) == "5/10 unfinished (top-1 of epoch 4) 28.00 28.00"


def test_folder_without_runs_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    code, _, err = report(capsys, tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{tmp_path} is not a teskd run directory" in err and "one or two levels below" in err


def test_group_plot_is_written(seeded, capsys, tmp_path):
    from matplotlib.image import imread

    root, runs = seeded
    png = tmp_path / "groups.png"
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    code, out, _ = report(capsys, root, "--format", "csv", "--plot", png)
    assert code == 0 and png.stat().st_size > 10_000
    image = imread(png)
    assert image.shape[0] > 600 and image.shape[1] > 1200 and image[..., :3].std() > 0.05
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # the report never writes into runs


def test_group_figure_panels(seeded):
    from teskd.report import group_curves

    root, runs = seeded
    groups = group_runs([read_run(r, []) for r in runs])
    curves = group_curves(groups)
    ce = curves[1]  # (10, 12), (31, 22), (30, 32)
    assert ce.epochs == [1, 2, 3] and ce.mean == [11.0, 26.5, 31.0]
    assert ce.low == [10.0, 22.0, 30.0] and ce.high == [12.0, 31.0, 32.0]
    fig = draw_report(groups)
    a, b = fig.axes[:2]
    assert [t.get_text() for t in b.get_yticklabels()][1].startswith("[2] ce optim.lr=0.1 (n=2)")
    assert [round(p.get_width(), 6) for p in b.patches] == [29.0, 31.0, 36.5, 33.0]
    assert len(a.collections) == 4  # a min-max band per group


def test_paired_delta_panel(seeded):
    """(e): each group matched with a CE group, its per-seed differences as dots and their mean +- std as a
    bar; the group at lr 0.05 has no CE to compare with and is left out (hand-computed from the fixture)."""
    root, runs = seeded
    fig = draw_report(group_runs([read_run(r, []) for r in runs]))
    (e,) = [ax for ax in fig.axes if ax.get_title().startswith("(e)")]
    labels = [t.get_text() for t in e.get_yticklabels()]
    assert [label.split(" (n=")[0].split("\n")[0][:9] for label in labels] == ["[3] teskd", "[4] teskd"]
    assert [round(p.get_width(), 6) for p in e.patches] == [5.5, 3.0]  # teskd: 35-30, 38-32; detach: 33-30
    dots = [sorted(float(x) for x in line.get_xdata()) for line in e.get_lines() if line.get_marker() == "o"]
    assert dots == [[5.0, 6.0], [3.0]]
    bars = [c for c in e.containers if getattr(c, "errorbar", None) is not None]
    whisker = bars[0].errorbar.lines[2][0].get_segments()[0]
    assert [round(float(x), 6) for x in whisker[:, 0]] == [round(5.5 - 0.5 ** 0.5, 6), round(5.5 + 0.5 ** 0.5, 6)]
    texts = [t.get_text().strip() for t in e.texts]
    assert texts == ["+5.50 \u00b1 0.71 (n=2)", "+3.00 (n=1)"]


def test_no_paired_delta_panel_without_a_ce_match(tmp_path):
    fig = figure_of(grouped_run(tmp_path / "teskd-s0", "teskd", [10.0, 20.0], 0))
    assert not [ax for ax in fig.axes if ax.get_title().startswith("(e)")]


def test_folder_whose_runs_have_not_finished_an_epoch(tmp_path, capsys):
    run = tmp_path / "sweep" / "ce-s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method: {name: ce}\n")
    code, _, err = report(capsys, tmp_path / "sweep")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"no run in {tmp_path / 'sweep'} has finished an epoch yet" in err


def test_a_setting_missing_from_an_older_config_counts_as_its_default(tmp_path, capsys):
    """A config.yaml written before a setting existed groups with runs that have it at its default."""
    old = grouped_run(tmp_path / "old-s0", "ce", [10.0, 20.0], 0)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    del cfg["data"]["cutout"], cfg["data"]["autoaugment"]
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    new = grouped_run(tmp_path / "new-s1", "ce", [12.0, 24.0], 1)
    other = grouped_run(tmp_path / "cut-s0", "ce", [12.0, 14.0], 0, "data.cutout=16")
    code, out, err = report(capsys, old, new, other, "--format", "json")
    assert code == 0, err
    groups = {g["settings"]: g for g in json.loads(out)}
    assert set(groups) == {"data.cutout=0", "data.cutout=16"}
    assert groups["data.cutout=0"]["n"] == 2 and groups["data.cutout=0"]["top1_last_mean"] == pytest.approx(22.0)


def test_a_group_of_unfinished_runs_only_reports_them(tmp_path, capsys):
    a = grouped_run(tmp_path / "a-s0", "ce", [14.0, 20.0], 0, "train.epochs=3", finished=False)
    b = grouped_run(tmp_path / "a-s1", "ce", [16.0, 24.0], 1, "train.epochs=3", finished=False)
    code, out, err = report(capsys, a, b, "--format", "json")
    (ce,) = json.loads(out)
    assert ce["n"] == 2 and ce["unfinished"] == 2 and ce["top1_last_mean"] == pytest.approx(22.0)


def test_no_delta_vs_ce_for_a_group_without_a_finished_seed(tmp_path, capsys):
    ce = grouped_run(tmp_path / "ce-s0", "ce", [10.0, 20.0], 0)
    teskd = grouped_run(tmp_path / "teskd-s0", "teskd", [5.0], 0, "train.epochs=2", finished=False)
    code, out, err = report(capsys, ce, teskd, "--format", "json")
    groups = {g["method"]: g for g in json.loads(out)}
    assert groups["teskd"]["delta_vs_ce"] is None and groups["teskd"]["top1_last_mean"] == 5.0


def test_watching_a_run_is_not_a_setting_but_evaluation_precision_is():
    from teskd.report import is_operational

    assert is_operational("train.tensorboard")  # TensorBoard on or off computes the same run
    assert not is_operational("train.eval_amp")  # autocast evaluation can change the reported accuracy


def test_groups_have_paired_deltas_and_training_top1_computed_by_hand(seeded, capsys):
    """Paired Δ: TESKD - CE seed by seed (35 - 30 = 5, 38 - 32 = 6: mean 5.5, sample std 0.7071, 2 pairs); the
    detached variant has one pair (33 - 30 = 3, no std). Training top-1: the last record's, 5 + 10 * 2 = 25."""
    root, runs = seeded
    code, out, err = report(capsys, *runs, "--format", "json")
    assert code == 0, err
    groups = {g["settings"]: g for g in json.loads(out)}
    teskd = groups["optim.lr=0.1 method.detach_teacher=false"]
    assert (teskd["delta_paired_mean"], teskd["delta_paired_n"]) == (pytest.approx(5.5), 2)
    assert teskd["delta_paired_std"] == pytest.approx(0.5 ** 0.5)
    detach = groups["optim.lr=0.1 method.detach_teacher=true"]
    assert (detach["delta_paired_mean"], detach["delta_paired_std"], detach["delta_paired_n"]) == (3.0, None, 1)
    assert groups["optim.lr=0.05 method.detach_teacher=false"]["delta_paired_n"] == 0  # no CE at that lr
    assert all(g["train_top1_last_mean"] == pytest.approx(25.0) for g in groups.values())
    code, out, err = report(capsys, *runs, "--format", "markdown")
    row = next(line for line in out.splitlines() if "detach_teacher=false" in line and "lr=0.1" in line)
    assert "| +5.50 | +5.50 \u00b1 0.71 (2) | 25.00 |" in row
