"""Config loading, overrides and validation."""

from pathlib import Path

import pytest

from teskd.config import DataConfig, expand_path, load_config, parse_override, resolve_data_root
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
    ("method.levels=7", "config key 'method.levels': expected list[int] | None, got 7"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("optim.lr=-0.1", "optim.lr must be > 0 and <= 1000, got -0.1"),
    ("method.levels=[4]", "method.levels must be distinct student levels among [1, 2, 3], got [4]"),
    ("method.name=nope", "unknown method.name 'nope'; known methods: byot, ce, cskd, dks, dml, frskd, kd, "
                          "label_smoothing, okddip, one, pskd, teskd"),
    ("schedule.name=poly", "schedule.name must be 'step' or 'cosine'"),
    ("method.branch_ce_weights={student9: 1.0}", "unknown branch 'student9'"),
    ("train", "is not of the form key=value"),
    ("optim.lr=.inf", "config key 'optim.lr': expected a finite number, got inf"),
    ("method.temperature=.nan", "config key 'method.temperature': expected a finite number, got nan"),
    # values that pass the type checks but crashed later (numpy seeding, torch.device, F.pad, SGD's float32)
    ("train.seed=1180591620717411303424", "train.seed must be in [0, 2**32 - 1] (numpy's seed range), "
                                          "got 1180591620717411303424"),
    ("train.seed=4294967296", "train.seed must be in [0, 2**32 - 1]"),
    ("train.seed=-1", "train.seed must be in [0, 2**32 - 1] (numpy's seed range), got -1"),
    ("train.device=cuda:x", "train.device must be auto, cpu, cuda or cuda:N (N in 0..127), got 'cuda:x'"),
    ("train.device=cuda:01", "got 'cuda:01'"),
    ("train.device=cuda:128", "got 'cuda:128'"),  # torch keeps the index in an int8
    ("train.device=gpu", "got 'gpu'"),
    ("train.device='cuda '", "got 'cuda '"),
    ("data.crop_padding=100000", "data.crop_padding must be in [0, 64] (pixels of zero padding before the "
                                 "random crop), got 100000"),
    ("data.crop_padding=65", "data.crop_padding must be in [0, 64]"),
    ("optim.lr=1e308", "optim.lr must be > 0 and <= 1000, got 1e+308"),
    ("optim.lr=1000.5", "optim.lr must be > 0 and <= 1000, got 1000.5"),
    ("optim.weight_decay=1e39", "optim.weight_decay must be in [0, 1], got 1e+39"),
    ("schedule.gamma=1e308", "schedule.gamma=1e+308 > 1 raises the learning rate at each milestone before "
                             "train.epochs, to about 1e615"),
    ("train.threads=2147483648", "train.threads must be in [0, 4096] (0: torch's default), got 2147483648"),
])
def test_bad_overrides_have_clear_messages(override, message):
    with pytest.raises(TeskdError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides", [
    ["train.seed=0"], ["train.seed=4294967295"],
    ["train.device=auto"], ["train.device=cpu"], ["train.device=cuda"], ["train.device=cuda:0"],
    ["train.device=cuda:127"],
    ["data.crop_padding=0"], ["data.crop_padding=64"],
    ["optim.lr=1000"], ["optim.weight_decay=1"], ["train.threads=4096"],
    # gamma > 1 is fine while the peak rate stays <= 1000: 0.1 * 100 ** 2 = 1000
    ["schedule.gamma=100"],
    # ... and only milestones the run reaches count (none of 100, 150 within 50 epochs)
    ["schedule.gamma=1e300", "train.epochs=50"],
])
def test_bounds_are_inclusive(overrides):
    load_config(None, overrides)  # no error


def test_gamma_bound_counts_the_milestones_reached():
    # 0-based epoch e runs at lr * gamma ** #(milestones <= e): with epochs=3, milestones 1 and 2 are
    # reached (peak 0.1 * 1e2 ** 2 = 1000, allowed); with milestone 3 only one is (peak 10)
    assert load_config(None, ["schedule.gamma=100", "schedule.milestones=[1, 2]", "train.epochs=3"])
    assert load_config(None, ["schedule.gamma=1e4", "schedule.milestones=[1, 3]", "train.epochs=3"])
    with pytest.raises(TeskdError, match=r"to about 1e7 \(optim.lr \* gamma \*\* milestones\); the peak must be "
                                         r"<= 1000$"):
        load_config(None, ["schedule.gamma=1e4", "schedule.milestones=[1, 2]", "train.epochs=3"])


def test_method_params_depend_on_method_name():
    with pytest.raises(TeskdError, match="unknown config key method.temperature"):
        load_config(None, ["method.name=ce", "method.temperature=3"])
    assert load_config(None, ["method.name=ce"]).method.name == "ce"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(TeskdError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(TeskdError, match="not valid YAML") as info:
        load_config(bad)
    assert info.value.__cause__ is not None  # the YAML error is kept as the cause
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(TeskdError, match=r"must hold a mapping at the top level, got \[1, 2\]"):
        load_config(listing)


@pytest.mark.parametrize("text", ["", "\n\n", "# model: {arch: resnet18}\n", "null\n", "~\n", "---\n"])
def test_empty_config_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(TeskdError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg == (f"config file {path} is empty (no settings, only comments or null); put settings in it, "
                   f"or give no config file to start from the defaults")


def _alias_bomb(depth: int, key: str = "epochs") -> str:
    """~100 bytes a level: level i is a list of 9 aliases of level i - 1, i.e. 9 ** (depth + 1) values."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, depth + 1)]
    return "\n".join([*lines, f"train: {{{key}: *a{depth}}}"]) + "\n"


@pytest.mark.parametrize("depth", [7, 8])
def test_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path, depth):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(depth))
    assert path.stat().st_size < 1100  # 9 ** 8 (43 million) values at depth 7
    with pytest.raises(TeskdError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"config file {path} has more than 100,000 values once its YAML aliases")
    assert len(msg) < 500 and "\n" not in msg
    # an alias inside its own anchor: infinitely many values
    path.write_text("train: &x {epochs: [*x]}\n")
    with pytest.raises(TeskdError, match="has more than 100,000 values"):
        load_config(path)


def test_alias_bomb_in_an_override_is_refused():
    value = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(["*a"] * 10_000) + "]"  # 110,012 values
    with pytest.raises(TeskdError) as info:
        load_config(None, [f"train.epochs={value}"])
    msg = str(info.value)
    assert msg.startswith("the value of override train.epochs has more than 100,000 values")
    assert len(msg) < 500


def test_values_in_messages_are_short(tmp_path):
    # 9 ** 5 = 59049 values (+ 7381 lists): under the size limit, so it reaches the type check, whose
    # message must not print it in full
    value = "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for i in range(1, 5):
        value = f"&a{i} [{value}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
    path = tmp_path / "big.yaml"
    path.write_text(f"train:\n  epochs: {value}\n")
    with pytest.raises(TeskdError) as info:
        load_config(path)
    assert str(info.value).startswith("config key 'train.epochs': expected int, got [[[")
    assert len(str(info.value)) < 200
    long_text = "x" * 100_000
    for override, start in [
        (f"train.epochs={long_text}", "config key 'train.epochs': expected int, got 'xxx"),
        (f"train.device={long_text}", "train.device must be auto, cpu, cuda or cuda:N (N in 0..127), got 'xxx"),
        (f"train.{long_text}=1", "unknown config key train.xxx"),
        (long_text, "override 'xxx"),
        (f"train.seed={'9' * 4000}", "train.seed must be in [0, 2**32 - 1] (numpy's seed range), got 999"),
        (f"schedule.milestones={list(range(20_000, 0, -1))}", "schedule.milestones must be increasing epochs >= 1, "
                                                              "got [20000, 19999,"),
        (f"data={list(range(50_000))}", "config section 'data': expected a mapping, got [0, 1,"),
    ]:
        with pytest.raises(TeskdError) as info:
            load_config(None, [override])
        msg = str(info.value)
        assert msg.startswith(start), msg[:200]
        assert len(msg) < 500 and "\n" not in msg, len(msg)


def test_parse_override_values():
    assert parse_override("a.b=1e-3") == (["a", "b"], "1e-3")  # typed later, by the schema
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=a=b") == (["x"], "a=b")


def test_expand_path(monkeypatch):
    monkeypatch.setenv("TESKD_DATA", "/some/where")
    assert expand_path("${TESKD_DATA:-./data}/cifar100") == Path("/some/where/cifar100")
    monkeypatch.delenv("TESKD_DATA")
    assert expand_path("${TESKD_DATA:-./data}/cifar100") == Path("./data/cifar100")


def test_default_data_root_follows_the_dataset(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TESKD_DATA", raising=False)
    assert DataConfig().root is None and load_config(None).data.root is None
    assert resolve_data_root(DataConfig()) == tmp_path / "data" / "cifar100"
    assert resolve_data_root(load_config(None, ["data.dataset=cifar10"]).data) == tmp_path / "data" / "cifar10"
    # the built-in default is what README and every shipped config spell out for CIFAR-100
    shipped = load_config(CONFIGS / "cifar100" / "resnet18_ce.yaml").data
    assert shipped.root == "${TESKD_DATA:-./data}/cifar100"
    assert resolve_data_root(shipped) == resolve_data_root(DataConfig())
    monkeypatch.setenv("TESKD_DATA", "/some/where")
    assert resolve_data_root(DataConfig(dataset="cifar10")) == Path("/some/where/cifar10")
    assert resolve_data_root(shipped) == Path("/some/where/cifar100")
    monkeypatch.setenv("TESKD_DATA", "")  # empty counts as unset, as in the shell's ${VAR:-default}
    assert resolve_data_root(DataConfig()) == tmp_path / "data" / "cifar100"


def test_resolve_data_root_is_absolute_and_keeps_symlinks(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TESKD_DATA", "rel")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for root, want in [("here/c100", tmp_path / "here" / "c100"),
                       ("~/c100", tmp_path / "home" / "c100"),
                       ("${TESKD_DATA}/x", tmp_path / "rel" / "x"),
                       ("${NOT_SET_ANYWHERE_42:-/abs}/x", Path("/abs/x")),
                       ("link/c100", tmp_path / "link" / "c100")]:
        got = resolve_data_root(DataConfig(root=root))
        assert got.is_absolute() and got == want, root
    assert resolve_data_root(DataConfig()) == tmp_path / "rel" / "cifar100"


def test_defaults_without_a_method_section_are_the_teskd_parameters():
    cfg = load_config(None, [])
    assert type(cfg.method).__name__ == "TeskdParams" and cfg.method.temperature == 4.0
