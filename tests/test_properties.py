"""Property-based tests (hypothesis) for the config parser, the in-memory loaders and the
batched augmentation.

Some tests pin down library bugs this file found (since fixed), each with an explicit
example: YAML values that crashed the override parser, NaN accepted by method validation,
and a multi-line unknown-key message.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from teskd.config import (
    Config,
    TrainConfig,
    apply_override,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from teskd.data.arrays import ImageArrays
from teskd.data.augment import BatchAugment, normalize
from teskd.data.memory_loader import InMemoryLoader
from teskd.data.splits import first_k_per_class, split_val_per_class
from teskd.errors import TeskdError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ============================================================================================
# helpers
# ============================================================================================


def yrepr(value) -> str:
    """A single-line YAML spelling of ``value`` that ``yaml.safe_load`` reads back exactly."""
    if isinstance(value, str):
        text = yaml.safe_dump(value, default_style='"', width=10**9)
    else:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    text = text.rstrip("\n")
    assert "\n" not in text
    return text


def one_line(exc: BaseException) -> bool:
    msg = str(exc)
    return bool(msg) and "\n" not in msg and "\r" not in msg


def get_path(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def override_error(overrides: list[str]) -> TeskdError:
    with pytest.raises(TeskdError) as info:
        load_config(None, overrides)
    return info.value


# ============================================================================================
# 1. config: typed overrides
# ============================================================================================

pos_int = st.integers(1, 10**6)
nonneg_int = st.integers(0, 10**6)
any_int = st.integers(-(2**70), 2**70)
pos_float = st.floats(min_value=1e-12, max_value=1e12, allow_nan=False, allow_infinity=False).filter(lambda x: x > 0)
nonneg_float = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
# keys validate() bounds (see the MAX_* constants of teskd.config)
seed_int = st.integers(0, 2**32 - 1)
padding_int = st.integers(0, 64)
threads_int = st.integers(0, 4096)
lr_float = st.floats(min_value=1e-12, max_value=1e3).filter(lambda x: x > 0)
decay_float = st.floats(min_value=0.0, max_value=1.0)
# gamma <= 1: with gamma > 1 the peak learning rate lr * gamma ** milestones is bounded too, which
# depends on lr, milestones and epochs drawn independently (tests/test_config.py covers gamma > 1)
gamma_float = st.floats(min_value=1e-12, max_value=1.0).filter(lambda x: x > 0)
unit_float = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)
bools = st.booleans()
# strings without constraints (model.arch / data.dataset / data.root are free-form in the schema)
free_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
levels_strategy = st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=3, unique=True)
milestones_strategy = st.lists(st.integers(1, 10**5), max_size=6, unique=True).map(sorted)

# key -> (value strategy, extra overrides that make the value valid in context)
TYPED_FIELDS: dict[str, tuple] = {
    "train.epochs": (pos_int, []),
    "train.seed": (seed_int, []),
    "train.threads": (threads_int, []),
    "train.checkpoint_every": (nonneg_int, []),
    "train.deterministic": (bools, []),
    "train.channels_last": (bools, []),
    "train.compile": (bools, []),
    "train.progress": (bools, []),
    "train.amp": (st.sampled_from(["auto", "off", "bf16", "fp16"]), []),
    "train.device": (st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:7"]), []),
    "data.batch_size": (pos_int, []),
    "data.eval_batch_size": (pos_int, []),
    "data.crop_padding": (padding_int, []),
    "data.val_per_class": (nonneg_int, []),
    "data.subset_per_class": (st.none() | pos_int, []),
    "data.test_subset_per_class": (st.none() | pos_int, []),
    "data.download": (bools, []),
    "data.hflip": (bools, []),
    "data.dataset": (free_text, []),
    "data.root": (free_text, []),
    "model.arch": (free_text, []),
    "model.width_mult": (pos_float, []),
    "optim.lr": (lr_float, []),
    "optim.momentum": (unit_float, ["optim.nesterov=false"]),
    "optim.weight_decay": (decay_float, []),
    "optim.nesterov": (bools, []),
    "schedule.name": (st.sampled_from(["step", "cosine"]), []),
    "schedule.milestones": (milestones_strategy, []),
    "schedule.gamma": (gamma_float, []),
    "schedule.warmup_epochs": (nonneg_int, []),
    "method.temperature": (pos_float, []),
    "method.ce_weight": (nonneg_float, []),
    "method.kd_weight": (nonneg_float, []),
    "method.feat_weight": (nonneg_float, []),
    "method.kl_eps": (nonneg_float, []),
    "method.detach_teacher": (bools, []),
    "method.feature_loss": (bools, []),
    "method.fast_students": (bools, []),
    "method.checkpoint_students": (bools, []),
    "method.kd_direction": (st.sampled_from(["teacher_to_student", "student_to_teacher"]), []),
    "method.levels": (levels_strategy, []),
    "method.student_width": (st.none() | st.integers(1, 4096), []),
}


def _expected(key: str, value):
    if key in ("model.width_mult", "optim.lr", "optim.momentum", "optim.weight_decay", "schedule.gamma",
               "method.temperature", "method.ce_weight", "method.kd_weight", "method.feat_weight",
               "method.kl_eps"):
        return float(value)
    return value


@FAST
@given(data=st.data(), key=st.sampled_from(sorted(TYPED_FIELDS)))
def test_typed_override_yields_exact_value(data, key):
    strategy, extra = TYPED_FIELDS[key]
    value = data.draw(strategy, label="value")
    text = f"{key}={yrepr(value)}"
    parts, parsed = parse_override(text)
    assert parts == key.split(".")
    assert parsed == value
    cfg = load_config(None, [*extra, text])
    got = get_path(cfg, key)
    want = _expected(key, value)
    assert got == want and type(got) is type(want)
    # everything else keeps its default
    base = to_dict(load_config(None, extra))
    d = to_dict(cfg)
    section, name = key.split(".")
    d[section].pop(name)
    base[section].pop(name)
    assert d == base


@FAST
@given(data=st.data(), key=st.sampled_from(["optim.lr", "model.width_mult", "method.temperature", "schedule.gamma",
                                            "optim.weight_decay", "method.kl_eps"]))
def test_float_override_with_python_repr(data, key):
    """``optim.lr=1e-05`` (no dot: a string to YAML 1.1) is still the float 1e-05."""
    value = data.draw(TYPED_FIELDS[key][0].filter(lambda x: x > 0), label="value")
    cfg = load_config(None, [f"{key}={value!r}"])
    got = get_path(cfg, key)
    assert type(got) is float and got == value


@FAST
@given(key=st.sampled_from(["train.deterministic", "data.hflip", "method.feature_loss"]),
       spelling=st.sampled_from([("true", True), ("false", False), ("True", True), ("FALSE", False),
                                 ("yes", True), ("no", False), ("on", True), ("off", False)]))
def test_bool_override_spellings(key, spelling):
    text, want = spelling
    assert get_path(load_config(None, [f"{key}={text}"]), key) is want


@FAST
@given(levels=levels_strategy,
       weights=st.dictionaries(st.sampled_from(["teacher", "student1", "student2", "student3"]), nonneg_float))
def test_levels_and_branch_weights(levels, weights):
    weights = {k: v for k, v in weights.items() if k == "teacher" or int(k[-1]) in levels}
    cfg = load_config(None, [f"method.levels={yrepr(levels)}",
                             f"method.branch_ce_weights={yrepr(weights)}"])
    assert cfg.method.levels == levels  # order kept
    assert cfg.method.branch_ce_weights == {k: float(v) for k, v in weights.items()}
    # one key at a time through the dotted syntax
    cfg2 = load_config(None, [f"method.levels={yrepr(levels)}",
                              *(f"method.branch_ce_weights.{k}={v!r}" for k, v in weights.items())])
    assert cfg2.method.branch_ce_weights == cfg.method.branch_ce_weights


@FAST
@given(left=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
       rest=st.lists(st.from_regex(r"[A-Za-z0-9_]{1,6}", fullmatch=True), min_size=1, max_size=3),
       key=st.sampled_from(["model.arch", "data.dataset", "data.root"]))
def test_value_keeps_everything_after_first_equals(left, rest, key):
    value = "=".join([left, *rest])
    parts, parsed = parse_override(f"{key}={value}")
    assert parts == key.split(".")
    assert parsed == yaml.safe_load(value)
    assert isinstance(parsed, str) and parsed == value
    assert get_path(load_config(None, [f"{key}={value}"]), key) == value
    # also with a quoted value holding '=' (and spaces)
    spaced = f" {value} = x "
    assert get_path(load_config(None, [f"{key}={yrepr(spaced)}"]), key) == spaced


@FAST
@given(data=st.data(), key=st.sampled_from(sorted(TYPED_FIELDS)))
def test_last_override_wins(data, key):
    strategy, extra = TYPED_FIELDS[key]
    a, b = data.draw(strategy), data.draw(strategy)
    cfg = load_config(None, [*extra, f"{key}={yrepr(a)}", f"{key}={yrepr(b)}"])
    assert get_path(cfg, key) == _expected(key, b)


# --------------------------------------------------------------------------------------------
# to_dict -> YAML -> load_config round trip
# --------------------------------------------------------------------------------------------


@st.composite
def random_config(draw) -> Config:
    method = draw(st.sampled_from(["teskd", "ce"]))
    overrides = [f"method.name={method}"]
    extras = []
    for key in draw(st.lists(st.sampled_from(sorted(TYPED_FIELDS)), unique=True, max_size=12)):
        if key.startswith("method.") and method != "teskd":
            continue
        strategy, extra = TYPED_FIELDS[key]
        overrides.append(f"{key}={yrepr(draw(strategy))}")
        extras += extra
    overrides += extras  # e.g. optim.nesterov=false when optim.momentum may be 0
    if method == "ce":
        overrides.append(f"method.label_smoothing={draw(unit_float)!r}")
    elif draw(st.booleans()):
        overrides.append("method.student_width={1: 8, 2: 16, 3: 32}")
    return load_config(None, overrides)


@FAST
@given(cfg=random_config())
def test_config_round_trip(cfg):
    d = to_dict(cfg)
    # in memory
    again = from_dict(d)
    assert again == cfg and to_dict(again) == d
    # through a YAML file written by save_config
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        save_config(cfg, path)
        loaded = load_config(path)
        assert to_dict(loaded) == d
        assert loaded == cfg
        # and through a plain yaml.safe_dump of to_dict
        path.write_text(yaml.safe_dump(d))
        assert to_dict(load_config(path)) == d


# --------------------------------------------------------------------------------------------
# unknown keys
# --------------------------------------------------------------------------------------------

SECTIONS = {name: sorted(to_dict(Config())[name]) for name in ("data", "model", "optim", "schedule", "train")}
SECTIONS["method"] = sorted(to_dict(load_config(None, []))["method"])
identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)


@FAST
@given(section=st.none() | st.sampled_from(sorted(SECTIONS)), name=identifiers,
       tail=st.lists(identifiers, max_size=3), value=st.sampled_from(["1", "x", "[1, 2]", "{a: 1}", "null", "true"]))
def test_unknown_key_rejected(section, name, tail, value):
    valid = set(SECTIONS) if section is None else set(SECTIONS[section])
    assume(name not in valid)
    key = ".".join([*([section] if section else []), name, *tail])
    err = override_error([f"{key}={value}"])
    msg = str(err)
    assert one_line(err)
    assert "unknown config key" in msg
    shown = f"{section}.{name}" if section else name
    assert shown in msg


def test_key_below_a_scalar_is_rejected():
    """``train.epochs.foo=1`` is rejected too (as a type error of ``train.epochs``, not as an unknown key)."""
    err = override_error(["train.epochs.foo=1"])
    assert one_line(err) and "train.epochs" in str(err)


@FAST
@example(name="foo\nbar")
@given(name=st.text(min_size=1, max_size=10).filter(lambda s: "=" not in s and "." not in s and s.strip()))
def test_unknown_key_message_is_one_line_for_any_key(name):
    assume(name.strip() not in SECTIONS)
    assume(name.strip() not in {f.name for f in dataclasses.fields(TrainConfig)})  # real train.* keys
    err = override_error([f"train.{name}=1"])
    assert "unknown config key" in str(err)
    assert one_line(err)


# --------------------------------------------------------------------------------------------
# wrong types
# --------------------------------------------------------------------------------------------

INT_KEYS = ["train.epochs", "train.seed", "train.threads", "data.batch_size", "data.eval_batch_size",
            "data.crop_padding", "data.val_per_class", "schedule.warmup_epochs", "train.checkpoint_every"]
FLOAT_KEYS = ["optim.lr", "optim.momentum", "optim.weight_decay", "model.width_mult", "schedule.gamma",
              "method.temperature", "method.ce_weight"]
BOOL_KEYS = ["train.deterministic", "data.hflip", "optim.nesterov", "method.feature_loss"]
STR_KEYS = ["model.arch", "data.dataset", "data.root", "train.device", "train.amp", "schedule.name"]
LIST_KEYS = ["schedule.milestones", "method.levels"]

non_numeric_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).filter(
    lambda s: not _floatable(s))


def _floatable(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


small_lists = st.lists(st.integers(-5, 5), max_size=3)
small_dicts = st.dictionaries(identifiers, st.integers(0, 5), min_size=1, max_size=2)
non_integral_floats = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x))

WRONG = {
    "int": st.one_of(free_text, non_integral_floats, st.floats(-1e6, 1e6).filter(math.isfinite).map(float),
                     st.booleans(), small_lists, small_dicts),
    "float": st.one_of(non_numeric_text, st.booleans(), small_lists, small_dicts),
    "bool": st.one_of(st.integers(), st.floats(allow_nan=False), free_text, small_lists, small_dicts),
    "str": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), small_lists, small_dicts),
    "list": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), free_text, small_dicts,
                      st.lists(st.sampled_from(["a", 1.5, True, None, [1]]), min_size=1, max_size=3)),
}


@FAST
@given(data=st.data(), kind=st.sampled_from(sorted(WRONG)))
def test_wrong_type_rejected(data, kind):
    key = data.draw(st.sampled_from({"int": INT_KEYS, "float": FLOAT_KEYS, "bool": BOOL_KEYS,
                                     "str": STR_KEYS, "list": LIST_KEYS}[kind]), label="key")
    value = data.draw(WRONG[kind], label="value")
    if kind == "list" and isinstance(value, list):
        assume(any(not isinstance(v, int) or isinstance(v, bool) for v in value))
    err = override_error([f"{key}={yrepr(value)}"])
    assert one_line(err)
    assert key in str(err)


# --------------------------------------------------------------------------------------------
# semantic validation of out-of-range values (NaN slips through some `x <= 0` / `x < 0` checks)
# --------------------------------------------------------------------------------------------

NAN_REJECTED = ["optim.lr", "model.width_mult", "optim.momentum", "optim.weight_decay", "schedule.gamma"]
NAN_ACCEPTED_BUG = ["method.temperature", "method.ce_weight", "method.kd_weight", "method.feat_weight",
                    "method.kl_eps", "method.branch_ce_weights.teacher"]


@pytest.mark.parametrize("key", NAN_REJECTED)
def test_nan_rejected(key):
    err = override_error([f"{key}=.nan"])
    assert one_line(err) and key in str(err)


@pytest.mark.parametrize("key", NAN_ACCEPTED_BUG)
def test_nan_rejected_method_params(key):
    err = override_error([f"{key}=.nan"])
    assert one_line(err)


@FAST
@given(key=st.sampled_from(["train.epochs", "data.batch_size", "data.eval_batch_size"]), value=st.integers(-10**6, 0))
def test_nonpositive_counts_rejected(key, value):
    err = override_error([f"{key}={value}"])
    assert one_line(err) and key in str(err)


@FAST
@example(seed=2**32 - 1)
@example(seed=2**32)
@example(seed=-1)
@given(seed=any_int)
def test_seed_range(seed):
    """numpy's seeding takes [0, 2**32 - 1]; anything else is a config error, not a crash at start."""
    if 0 <= seed <= 2**32 - 1:
        assert load_config(None, [f"train.seed={seed}"]).train.seed == seed
    else:
        err = override_error([f"train.seed={seed}"])
        assert one_line(err) and "train.seed must be in [0, 2**32 - 1]" in str(err)


@FAST
@given(levels=st.lists(st.integers(-3, 6), min_size=0, max_size=4))
def test_levels_validation(levels):
    ok = bool(levels) and len(set(levels)) == len(levels) and all(lv in (1, 2, 3) for lv in levels)
    if ok:
        assert load_config(None, [f"method.levels={yrepr(levels)}"]).method.levels == levels
    else:
        err = override_error([f"method.levels={yrepr(levels)}"])
        assert one_line(err) and "method.levels" in str(err)


@FAST
@given(milestones=st.lists(st.integers(-3, 50), max_size=5))
def test_milestones_validation(milestones):
    ok = all(m >= 1 for m in milestones) and milestones == sorted(milestones)
    text = f"schedule.milestones={yrepr(milestones)}"
    if ok:
        assert load_config(None, [text]).schedule.milestones == milestones
    else:
        err = override_error([text])
        assert one_line(err) and "schedule.milestones" in str(err)


# --------------------------------------------------------------------------------------------
# parse_override on arbitrary text
# --------------------------------------------------------------------------------------------

# value parts that avoid YAML constructs whose constructors crash (see the xfail test below)
safe_value_text = st.text(st.characters(blacklist_categories=("Cs", "Nd"), blacklist_characters="![{"), max_size=20)
key_text = st.text(st.sampled_from(list("ab_.. \t\n")), max_size=10)


def _should_reject(text: str) -> bool:
    if "=" not in text:
        return True
    key = text.split("=", 1)[0].strip()
    return not key or any(not p for p in key.split("."))


@FAST
@given(key=key_text, value=safe_value_text, has_eq=st.booleans())
def test_parse_override_raises_iff_malformed(key, value, has_eq):
    text = f"{key}={value}" if has_eq else key + value.replace("=", "")
    if _should_reject(text):
        with pytest.raises(TeskdError) as info:
            parse_override(text)
        assert one_line(info.value)
        return
    parts, parsed = parse_override(text)
    raw = text.split("=", 1)[1]
    assert parts == text.split("=", 1)[0].strip().split(".")
    assert all(parts)
    if not raw.strip():
        assert parsed is None
    else:
        try:
            want = yaml.safe_load(raw)
        except yaml.YAMLError:
            want = raw
        assert repr(parsed) == repr(want)  # repr: NaN (".nan") compares unequal to itself


@FAST
@given(text=st.text(max_size=30))
def test_parse_override_arbitrary_text_safe_alphabet(text):
    # arbitrary text, restricted to a value part that cannot reach the crashing YAML constructors
    assume(not any(c.isdigit() or c in "![{" for c in text.partition("=")[2]))
    try:
        parse_override(text)
    except TeskdError as exc:
        assert one_line(exc)
        assert _should_reject(text)
    else:
        assert not _should_reject(text)


YAML_CRASHERS = ["2001-02-30", "2001-13-01", "0x_", "0b_", "!!float abc", "!!int x", "!!float", "!!bool maybe",
                 "[" * 3000]


@FAST
@example(text="data.root=2001-02-30")
@given(text=st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["a", "data.root", "train.epochs"]),
                      st.sampled_from(YAML_CRASHERS) | st.text(max_size=20)))
def test_parse_override_raises_only_teskderror(text):
    try:
        parse_override(text)
    except TeskdError as exc:
        assert one_line(exc)


@pytest.mark.parametrize("value", YAML_CRASHERS)
def test_load_config_crashing_yaml_values_are_kept_as_text(value):
    # values YAML recognises but cannot build fall back to the raw text (a path here), never a crash
    assert load_config(None, [f"data.root={value}"]).data.root == value


@FAST
@given(parts=st.lists(identifiers, min_size=1, max_size=4), value=st.integers())
def test_apply_override_builds_nested_dicts(parts, value):
    data: dict = {}
    apply_override(data, parts, value)
    node = data
    for p in parts[:-1]:
        assert isinstance(node[p], dict) and len(node) == 1
        node = node[p]
    assert node == {parts[-1]: value}
    # an existing scalar on the way is an error naming the key
    if len(parts) >= 2:
        data2 = {parts[0]: 5}
        with pytest.raises(TeskdError) as info:
            apply_override(data2, parts, value)
        assert one_line(info.value) and ".".join(parts) in str(info.value)


# ============================================================================================
# 2. data: InMemoryLoader, first_k_per_class, split_val_per_class
# ============================================================================================


@st.composite
def datasets(draw, max_n=60):
    n = draw(st.integers(1, max_n))
    size = draw(st.integers(4, 12))
    num_classes = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # pixel (0, 0, 0) encodes the index
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ImageArrays(images.contiguous(), labels, [f"c{i}" for i in range(num_classes)])


def identity(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def _ids(images: torch.Tensor) -> list[int]:
    return [int(v) for v in images[:, 0, 0, 0]]


@FAST
@given(arrays=datasets(), batch=st.integers(1, 70), shuffle=st.booleans(), drop_last=st.booleans(),
       seed=st.integers(0, 2**40), epoch=st.integers(0, 1000))
def test_loader_epoch_covers_every_sample(arrays, batch, shuffle, drop_last, seed, epoch):
    n = len(arrays)
    loader = InMemoryLoader(arrays, batch, shuffle=shuffle, drop_last=drop_last, transform=identity,
                            device="cpu", seed=seed)
    loader.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == len(loader) == (n // batch if drop_last else -(-n // batch))
    seen = []
    for images, labels, index in batches:
        assert images.dtype == torch.float32 and labels.dtype == index.dtype == torch.int64
        assert images.shape[1:] == arrays.images.shape[1:] and images.shape[0] == labels.shape[0]
        ids = _ids(images)
        assert index.tolist() == ids
        # images are exactly the source images, labels attached to them
        assert torch.equal(images, arrays.images[ids].float())
        assert torch.equal(labels, arrays.labels[ids])
        if drop_last:
            assert images.shape[0] == batch
        else:
            assert 1 <= images.shape[0] <= batch
        seen += ids
    assert len(seen) == len(set(seen))  # never twice in an epoch
    if drop_last:
        assert len(seen) == (n // batch) * batch
    else:
        assert sorted(seen) == list(range(n))
    if not shuffle:
        assert seen == list(range(len(seen)))
    # the same epoch again gives the same order; set_epoch is the only state
    other = InMemoryLoader(arrays, batch, shuffle=shuffle, drop_last=drop_last, transform=identity,
                           device="cpu", seed=seed)
    other.set_epoch(epoch + 1)
    list(other)
    other.set_epoch(epoch)
    assert [_ids(x) for x, *_ in other] == [_ids(x) for x, *_ in batches]


@FAST
@given(arrays=datasets(), batch=st.integers(1, 70), shuffle=st.booleans(), drop_last=st.booleans(),
       seed=st.integers(0, 2**40), epoch=st.integers(0, 50), data=st.data(), augment=st.booleans())
def test_loader_iter_from_is_tail(arrays, batch, shuffle, drop_last, seed, epoch, data, augment):
    size = arrays.images.shape[-1]
    transform = BatchAugment((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), crop=size, padding=2) if augment else identity
    loader = InMemoryLoader(arrays, batch, shuffle=shuffle, drop_last=drop_last, transform=transform,
                            device="cpu", seed=seed)
    loader.set_epoch(epoch)
    full = list(loader)
    start = data.draw(st.integers(0, len(loader) + 2), label="start")
    tail = list(loader.iter_from(start))
    assert len(tail) == len(full[start:])
    for got, want in zip(tail, full[start:]):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(TeskdError):
        list(loader.iter_from(-1 - start))


@QUICK
@given(arrays=datasets(max_n=40), batch=st.integers(1, 20), seed=st.integers(0, 1000))
def test_loader_shuffle_depends_on_epoch_only(arrays, batch, seed):
    def order(epoch):
        loader = InMemoryLoader(arrays, batch, shuffle=True, drop_last=False, transform=identity,
                                device="cpu", seed=seed)
        loader.set_epoch(epoch)
        return [i for x, *_ in loader for i in _ids(x)], loader.order()

    a, perm = order(3)
    b, _ = order(3)
    assert a == b == perm.tolist()


@FAST
@given(labels=st.lists(st.integers(0, 5), max_size=60), extra_classes=st.integers(0, 2), data=st.data())
def test_first_k_per_class(labels, extra_classes, data):
    num_classes = (max(labels) + 1 if labels else 1) + extra_classes
    t = torch.tensor(labels, dtype=torch.int64)
    counts = [labels.count(c) for c in range(num_classes)]
    k = data.draw(st.integers(0, min(counts) + 2), label="k")
    if k > min(counts):
        with pytest.raises(TeskdError) as info:
            first_k_per_class(t, k, num_classes)
        assert one_line(info.value)
        return
    idx = first_k_per_class(t, k, num_classes)
    assert idx.dtype == torch.int64
    got = idx.tolist()
    want = sorted(i for c in range(num_classes) for i in [j for j, y in enumerate(labels) if y == c][:k])
    assert got == want
    assert len(got) == k * num_classes


@FAST
@given(arrays=datasets(), data=st.data())
def test_split_val_per_class(arrays, data):
    labels = arrays.labels.tolist()
    counts = [labels.count(c) for c in range(len(arrays.classes))]
    present = [c for c in counts if c > 0]
    v = data.draw(st.integers(0, min(present) + 2), label="val_per_class")
    if v > min(present):
        with pytest.raises(TeskdError) as info:
            split_val_per_class(arrays, v)
        assert one_line(info.value)
        return
    train, val = split_val_per_class(arrays, v)
    if v == 0:
        assert val is None and train is arrays
        return
    tr, va = _ids(train.images), _ids(val.images)
    assert set(tr).isdisjoint(va) and sorted(tr + va) == list(range(len(labels)))
    assert tr == sorted(tr) and va == sorted(va)  # file order
    want_val = sorted(i for c in range(len(arrays.classes))
                      for i in [j for j, y in enumerate(labels) if y == c][-v:] if counts[c] > 0)
    assert va == want_val
    for part, ids in ((train, tr), (val, va)):
        assert torch.equal(part.images, arrays.images[ids]) and torch.equal(part.labels, arrays.labels[ids])
        assert part.classes == arrays.classes


# ============================================================================================
# 3. augmentation
# ============================================================================================

MEAN_STD = st.tuples(
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    st.lists(st.floats(0.05, 2.0), min_size=3, max_size=3),
)


@st.composite
def batches(draw):
    b = draw(st.integers(1, 16))
    size = draw(st.sampled_from([8, 16, 32]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


@QUICK
@given(x=batches(), padding=st.integers(0, 4), flip=st.booleans(), seed=st.integers(0, 2**40), ms=MEAN_STD,
       crop_delta=st.sampled_from([0, 0, 0, -3, 2]))
def test_augment_output_is_a_crop_of_padded_input(x, padding, flip, seed, ms, crop_delta):
    mean, std = ms
    b, _, h, w = x.shape
    crop = h + min(crop_delta, 2 * padding)
    aug = BatchAugment(mean, std, crop=crop, padding=padding, flip=flip)
    out = aug(x, torch.Generator().manual_seed(seed))
    assert out.shape == (b, 3, crop, crop) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    padded = normalize(F.pad(x, (padding,) * 4), mean, std)
    span = h + 2 * padding - crop
    for i in range(b):
        candidates = []
        for top in range(span + 1):
            for left in range(span + 1):
                window = padded[i, :, top:top + crop, left:left + crop]
                candidates.append(window)
                if flip:
                    candidates.append(window.flip(-1))
        assert any(torch.equal(out[i], c) for c in candidates), f"image {i} is no crop/flip of its input"
    # same seed, same output
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(seed)))


@QUICK
@given(x=batches(), padding=st.integers(0, 4), flip=st.booleans(), seed=st.integers(0, 2**40), ms=MEAN_STD)
def test_augment_draw_apply_matches_explicit_crop(x, padding, flip, seed, ms):
    mean, std = ms
    b, _, h, w = x.shape
    aug = BatchAugment(mean, std, crop=h, padding=padding, flip=flip)
    tops, lefts, flips = aug.draw(b, h, w, torch.Generator().manual_seed(seed))
    assert tops.shape == lefts.shape == flips.shape == (b,)
    assert int(tops.min()) >= 0 and int(tops.max()) <= 2 * padding
    assert int(lefts.min()) >= 0 and int(lefts.max()) <= 2 * padding
    if not flip:
        assert not flips.any()
    out = aug.apply(x, tops, lefts, flips)
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(seed)))
    padded = normalize(F.pad(x, (padding,) * 4), mean, std)
    for i in range(b):
        t, lft = int(tops[i]), int(lefts[i])
        want = padded[i, :, t:t + h, lft:lft + h]
        if bool(flips[i]):
            want = want.flip(-1)
        assert torch.equal(out[i], want)


@QUICK
@given(x=batches(), ms=MEAN_STD, seed=st.integers(0, 2**40))
def test_augment_identity_without_padding_and_flip(x, ms, seed):
    mean, std = ms
    aug = BatchAugment(mean, std, crop=x.shape[-1], padding=0, flip=False)
    want = normalize(x, mean, std)
    assert torch.equal(aug(x, torch.Generator().manual_seed(seed)), want)
    # normalize itself: (x / 255 - mean) / std per channel
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    assert torch.allclose(want.double(), ref, rtol=1e-5, atol=1e-5)
    assert x.dtype == torch.uint8  # input untouched (normalize works on a copy)


@QUICK
@given(x=batches(), padding=st.integers(0, 4), flip=st.booleans(), seed=st.integers(0, 2**40), data=st.data())
def test_augment_does_not_mix_images(x, padding, flip, seed, data):
    b, _, h, w = x.shape
    aug = BatchAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop=h, padding=padding, flip=flip)
    tops, lefts, flips = aug.draw(b, h, w, torch.Generator().manual_seed(seed))
    perm = torch.tensor(data.draw(st.permutations(range(b)), label="perm"), dtype=torch.int64)
    out = aug.apply(x, tops, lefts, flips)
    out_perm = aug.apply(x[perm], tops[perm], lefts[perm], flips[perm])
    assert torch.equal(out_perm, out[perm])
    # each image's result depends on that image only
    for i in range(b):
        single = aug.apply(x[i:i + 1], tops[i:i + 1], lefts[i:i + 1], flips[i:i + 1])
        assert torch.equal(single[0], out[i])


@QUICK
@given(x=batches(), padding=st.integers(0, 4), seed=st.integers(0, 2**40))
def test_augment_rejects_bad_input(x, padding, seed):
    aug = BatchAugment((0.5,) * 3, (0.5,) * 3, crop=x.shape[-1] + 2 * padding + 1, padding=padding)
    with pytest.raises(TeskdError) as info:
        aug(x, torch.Generator().manual_seed(seed))
    assert one_line(info.value)
    ok = BatchAugment((0.5,) * 3, (0.5,) * 3, crop=x.shape[-1], padding=padding)
    with pytest.raises(TeskdError):
        ok(x.float(), torch.Generator().manual_seed(seed))
