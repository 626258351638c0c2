"""``teskd bench``: the method's training cost against the ce baseline (tiny models, few steps)."""

import json

import pytest
import torch

from teskd.bench import (activation_bytes, ce_config, format_bench, measure_memory, run_bench,
                         synthetic_batches)
from teskd.cli import main
from teskd.config import load_config

from conftest import REPO

CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_teskd.yaml")
CE_CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")  # method.name: ce
TINY = ["model.width_mult=0.125", "data.batch_size=8", "train.device=cpu"]


@pytest.fixture(scope="module")
def result():
    cfg = load_config(CONFIG, TINY)
    return run_bench(cfg, steps=2, warmup=1, inference=True, memory=False, progress=False)


def test_json_keys_and_types(result):
    json.loads(json.dumps(result))  # JSON-able as is
    for key in ("step_ms", "images_per_sec", "activation_mb", "peak_mem_mb", "peak_mem_growth_mb"):
        assert set(result[key]) == {"method", "ce"}, key
    for key in ("step_ms", "images_per_sec", "activation_mb"):
        assert all(isinstance(v, float) and v > 0 for v in result[key].values()), key
    assert result["peak_mem_mb"] == {"method": None, "ce": None}  # memory=False
    assert isinstance(result["step_time_ratio"], float) and result["step_time_ratio"] > 0
    assert isinstance(result["input_images_per_sec"], float) and result["input_images_per_sec"] > 0
    assert result["device"] == "cpu" and result["threads"] == torch.get_num_threads()
    assert result["torch"] == torch.__version__
    assert result["steps"] == 2 and result["warmup"] == 1
    assert result["config"] == {"arch": "resnet18", "width_mult": 0.125, "batch_size": 8, "method": "teskd",
                                "dataset": "cifar100", "image_size": 32, "amp": "off",
                                "channels_last": True, "compile": False}


def test_ratio_and_throughput_follow_the_step_times(result):
    ms = result["step_ms"]
    assert result["step_time_ratio"] == pytest.approx(ms["method"] / ms["ce"])
    for key in ("method", "ce"):
        assert result["images_per_sec"][key] == pytest.approx(8 / (ms[key] / 1000.0))


def test_teskd_saves_more_activations_than_ce(result):
    assert result["activation_mb"]["method"] > result["activation_mb"]["ce"]


def test_inference_numbers(result):
    inf = result["inference"]
    assert inf["teacher_images_per_sec"] > 0 and inf["backbone_images_per_sec"] > 0
    assert inf["ratio"] == pytest.approx(inf["backbone_images_per_sec"] / inf["teacher_images_per_sec"])


def test_format_bench_is_a_small_table(result):
    text = format_bench(result)
    assert "teskd" in text and "ce" in text and "step time ratio" in text and "inference" in text
    assert len(text.splitlines()) < 12


def test_ce_against_itself_is_close_to_one():
    cfg = load_config(CE_CONFIG, [*TINY])
    r = run_bench(cfg, steps=3, warmup=1, memory=False, progress=False)
    assert 0.5 < r["step_time_ratio"] < 2.0
    assert r["activation_mb"]["method"] == pytest.approx(r["activation_mb"]["ce"])


def test_ce_config_replaces_only_the_method():
    cfg = load_config(CONFIG, TINY)
    base = ce_config(cfg)
    assert base.method.name == "ce" and cfg.method.name == "teskd"
    assert base.model == cfg.model and base.optim == cfg.optim and base.data == cfg.data


def test_activation_bytes_excludes_parameters():
    cfg = load_config(CE_CONFIG, [*TINY])
    from teskd.engine.trainer import build_model

    method = build_model(cfg, 100)
    ((images, labels),) = synthetic_batches(cfg, torch.device("cpu"))
    nbytes = activation_bytes(method, images, labels, torch.device("cpu"), None)
    # at least the input to the first convolution; no more than a few dozen feature maps of
    # batch 8 x 8..64 channels, and the weights (~0.7 MB) are not in it
    assert images.numel() * 4 <= nbytes < 20 * 2**20


def test_cpu_memory_in_a_fresh_process_is_positive():
    cfg = load_config(CE_CONFIG, [*TINY, "data.batch_size=16"])
    mem = measure_memory(cfg, 100, torch.device("cpu"))
    assert mem["peak_mb"] > 0 and mem["growth_mb"] == mem["peak_mb"]


def test_cli_json_on_stdout(capsys):
    code = main(["bench", CONFIG, *TINY, "--steps", "1", "--warmup", "0", "--no-memory", "--json"])
    out = capsys.readouterr()
    assert code == 0
    r = json.loads(out.out)
    assert r["step_time_ratio"] > 0 and set(r["peak_mem_mb"]) == {"method", "ce"}
    assert "bench:" in out.err  # progress goes to stderr


def test_cli_table(capsys):
    code = main(["bench", CONFIG, *TINY, "--steps", "1", "--warmup", "0", "--no-memory"])
    assert code == 0 and "step time ratio" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["model.widht_mult=0.5"], "error: unknown config key model.widht_mult"),
    (["--steps", "0"], "error: bench needs --steps >= 1"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    code = main(["bench", CONFIG, *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
