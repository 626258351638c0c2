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
    assert inf["deployed_images_per_sec"] > 0 and inf["backbone_images_per_sec"] > 0
    assert inf["ratio"] == pytest.approx(inf["backbone_images_per_sec"] / inf["deployed_images_per_sec"])


def test_format_bench_is_a_small_table(result):
    text = format_bench(result)
    assert "teskd" in text and "ce" in text and "step time ratio" in text and "inference" in text
    assert len(text.splitlines()) < 12


def _fake_clock(monkeypatch, step_seconds: dict[str, list[float]]) -> list[str]:
    """Make bench's timer return ``step_seconds[name]`` for the training steps of model ``name``
    ("method": the first model built, "ce": the second), in order; the steps themselves still run.
    Returns the names of the timed steps in the order they ran."""
    import teskd.bench as bench

    built, ran, order = [], [], []
    queues = {name: iter(times) for name, times in step_seconds.items()}

    class Recorded(bench._Trainee):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    real_step = bench.train_step

    def step(t, images, labels, batch=0):
        ran.append(t)
        return real_step(t, images, labels, batch)

    def timed(fn, device):
        ran.clear()
        fn()
        if not ran:  # the augmentation or inference timings
            return 1e-3
        (t,) = ran
        name = "method" if t is built[0] else "ce"
        order.append(name)
        return next(queues[name])

    monkeypatch.setattr(bench, "_Trainee", Recorded)
    monkeypatch.setattr(bench, "train_step", step)
    monkeypatch.setattr(bench, "_timed", timed)
    return order


def test_ce_against_itself_times_both_models_alternately(monkeypatch):
    """No wall clock: the timer is fabricated, so what is checked is what bench computes from it."""
    cfg = load_config(CE_CONFIG, [*TINY])
    # per step, "method" takes 3x as long as "ce"; the step times themselves vary 5x
    ce = [0.010, 0.050, 0.020]
    order = _fake_clock(monkeypatch, {"method": [3 * t for t in ce], "ce": ce})
    r = run_bench(cfg, steps=3, warmup=1, memory=False, progress=False)
    assert order == ["method", "ce", "ce", "method", "method", "ce"]  # each step of both, alternating
    assert r["steps"] == 3 and r["config"]["method"] == "ce"
    assert r["step_ms"] == pytest.approx({"method": 60.0, "ce": 20.0})  # medians of the recorded times
    assert r["images_per_sec"] == pytest.approx({"method": 8 / 0.060, "ce": 8 / 0.020})
    assert r["step_time_ratio"] == pytest.approx(3.0)  # median per-step ratio and ratio of medians agree here
    # the same network on the same batch saves the very same tensors
    assert r["activation_mb"]["method"] == r["activation_mb"]["ce"] > 0


def test_ce_config_replaces_only_the_method():
    cfg = load_config(CONFIG, TINY)
    base = ce_config(cfg)
    assert base.method.name == "ce" and cfg.method.name == "teskd"
    assert base.model == cfg.model and base.optim == cfg.optim and base.data == cfg.data


def test_activation_bytes_excludes_parameters():
    cfg = load_config(CE_CONFIG, [*TINY])
    from teskd.build import build_model

    method = build_model(cfg, 100)
    ((images, labels),) = synthetic_batches(cfg, torch.device("cpu"))
    nbytes = activation_bytes(method, images, labels, torch.device("cpu"), None)
    # at least the input to the first convolution; no more than a few dozen feature maps of
    # batch 8 x 8..64 channels, and the weights (~0.7 MB) are not in it
    assert images.numel() * 4 <= nbytes < 20 * 2**20


def test_cpu_memory_in_a_fresh_process_is_positive_and_larger_for_teskd():
    mem = {name: measure_memory(load_config(path, [*TINY, "data.batch_size=16"]), 100, torch.device("cpu"))
           for name, path in (("ce", CE_CONFIG), ("teskd", CONFIG))}
    assert all(m["peak_mb"] > 0 and m["growth_mb"] == m["peak_mb"] for m in mem.values())
    # four branches with their KD terms keep far more alive than one network (about 3x here)
    assert mem["teskd"]["peak_mb"] > mem["ce"]["peak_mb"]


def test_failed_memory_subprocess_is_a_teskd_error(monkeypatch):
    import teskd.bench as bench
    from teskd.errors import TeskdError

    monkeypatch.setattr(bench.sys, "executable", "false")
    with pytest.raises(TeskdError, match=r"memory measurement subprocess failed \(exit 1\)"):
        measure_memory(load_config(CE_CONFIG, TINY), 100, torch.device("cpu"))


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


@pytest.mark.parametrize("name", ["label_smoothing", "byot", "cskd", "dks", "dml", "frskd", "one", "okddip",
                                  "pskd"])
def test_every_method_benches_with_the_inputs_its_loader_gives(name):
    """Same-class pairs for cskd, sample indices for pskd's table: bench feeds each method as training does."""
    cfg = load_config(None, ["model.width_mult=0.0625", "data.batch_size=8", "train.threads=1",
                             f"method.name={name}"])
    r = run_bench(cfg, steps=1, warmup=0, memory=False, progress=False)
    assert r["config"]["method"] == name and r["step_time_ratio"] > 0
    extra_modules = name not in ("label_smoothing", "pskd", "cskd")  # these train the plain network alone
    assert r["activation_mb"]["method"] > r["activation_mb"]["ce"] or not extra_modules
