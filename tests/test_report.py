"""`teskd report`: the comparison table and the training-curve plot."""

import json

import pytest

from teskd.cli import main


def fake_run(path, method, accs, params=(100, 50)):
    path.mkdir(parents=True)
    records = [{"epoch": i + 1, "train_loss": 4.0 - i, "test_acc": {"teacher": a}, "val_acc": {"teacher": a - 1}}
               for i, a in enumerate(accs)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"method": method, "epochs": len(accs), "teacher_top1_last": accs[-1], "teacher_top1_best": max(accs),
               "selected_on": "val", "params_train": params[0], "params_deploy": params[1],
               "train_images_per_sec": 123.4}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_table_and_plot(tmp_path, capsys):
    from matplotlib.image import imread

    a = fake_run(tmp_path / "ce", "ce", [10.0, 20.0, 25.0], (50, 50))
    b = fake_run(tmp_path / "teskd", "teskd", [8.0, 22.0, 30.5])
    png = tmp_path / "plots" / "curves.png"
    assert main(["report", str(a), str(b), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run", "method", "epochs", "top-1"]
    assert "teskd  teskd" in out and "30.50" in out and "25.00" in out and "123" in out
    image = imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.shape[0] > 300 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_report_of_an_unfinished_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "has no summary.json" in capsys.readouterr().err
