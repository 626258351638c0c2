"""Config loading, overrides and validation."""

from pathlib import Path

import pytest

from teskd.config import expand_path, load_config, parse_override
from teskd.errors import TeskdError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_paper_recipe_configs():
    paths = sorted((CONFIGS / "cifar100").glob("*.yaml"))
    assert len(paths) == 22  # 11 architectures x {ce, teskd}
    for path in paths:
        cfg = load_config(path)
        arch, method = path.stem.rsplit("_", 1)
        assert (cfg.model.arch, cfg.method.name, cfg.data.dataset) == (arch, method, "cifar100")
        assert cfg.train.epochs == 200 and cfg.data.batch_size == 128
        assert cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 5e-4 and cfg.optim.nesterov
        assert cfg.schedule.name == "step" and cfg.schedule.milestones == [100, 150]
        assert cfg.schedule.gamma == 0.1
    cfg = load_config(CONFIGS / "cifar100" / "resnet18_teskd.yaml")
    assert cfg.method.name == "teskd" and cfg.method.temperature == 4.0
    assert (cfg.method.ce_weight, cfg.method.kd_weight, cfg.method.feat_weight) == (0.2, 0.8, 1e-7)
    assert cfg.method.detach_teacher is False


def test_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=3", "optim.lr=5e-4", "model.width_mult=0.25",
                             "method.levels=[3]", "data.subset_per_class=20", "train.deterministic=true"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 5e-4 and cfg.model.width_mult == 0.25
    assert cfg.method.levels == [3] and cfg.data.subset_per_class == 20 and cfg.train.deterministic is True
    # an int where a float is expected is fine; null where optional is fine
    assert load_config(None, ["optim.lr=1", "data.subset_per_class=null"]).optim.lr == 1.0


def test_yaml_exponent_without_dot_reads_as_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 5e-4\n")
    assert load_config(path).optim.weight_decay == 5e-4


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key train.epoch; valid keys here: train.epochs"),
    ("trian.epochs=3", "unknown config key trian"),
    ("train.epochs=three", "config key 'train.epochs': expected int, got 'three'"),
    ("train.epochs=2.5", "config key 'train.epochs': expected int, got 2.5"),
    ("train.deterministic=3", "config key 'train.deterministic': expected bool"),
    ("method.levels=7", "config key 'method.levels': expected a list"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("optim.lr=-0.1", "optim.lr must be > 0, got -0.1"),
    ("method.levels=[4]", "method.levels must be distinct student levels among [1, 2, 3], got [4]"),
    ("method.name=nope", "unknown method.name 'nope'; known methods: ce, teskd"),
    ("schedule.name=poly", "schedule.name must be 'step' or 'cosine'"),
    ("method.branch_ce_weights={student9: 1.0}", "unknown branch 'student9'"),
    ("train", "is not of the form key=value"),
    ("optim.lr=.inf", "config key 'optim.lr': expected a finite number, got inf"),
    ("method.temperature=.nan", "config key 'method.temperature': expected a finite number, got nan"),
])
def test_bad_overrides_have_clear_messages(override, message):
    with pytest.raises(TeskdError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_method_params_depend_on_method_name():
    with pytest.raises(TeskdError, match="unknown config key method.temperature"):
        load_config(None, ["method.name=ce", "method.temperature=3"])
    assert load_config(None, ["method.name=ce"]).method.name == "ce"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(TeskdError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(TeskdError, match="not valid YAML"):
        load_config(bad)


def test_parse_override_values():
    assert parse_override("a.b=1e-3") == (["a", "b"], "1e-3")  # typed later, by the schema
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=a=b") == (["x"], "a=b")


def test_expand_path(monkeypatch):
    monkeypatch.setenv("TESKD_DATA", "/some/where")
    assert expand_path("${TESKD_DATA:-./data}/cifar100") == Path("/some/where/cifar100")
    monkeypatch.delenv("TESKD_DATA")
    assert expand_path("${TESKD_DATA:-./data}/cifar100") == Path("./data/cifar100")


def test_defaults_without_a_method_section_are_the_teskd_parameters():
    cfg = load_config(None, [])
    assert type(cfg.method).__name__ == "TeskdParams" and cfg.method.temperature == 4.0
