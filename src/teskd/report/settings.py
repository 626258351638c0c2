"""A run's settings as the report compares them: dotted keys (``optim.lr``), today's defaults filled in, and
which keys never split runs into groups (the seed, and where or how fast a run goes)."""

from __future__ import annotations

import json

from teskd.errors import TeskdError

# Keys that never split runs into groups: the seed (a group's runs are its seeds) and settings that change
# where or how fast a run goes, not what it computes.
OPERATIONAL_KEYS = frozenset({"train.seed", "data.root", "train.threads", "train.progress", "train.device",
                              "data.workers", "data.eval_batch_size", "train.tensorboard"})
OPERATIONAL_PREFIXES = ("train.checkpoint_",)
OWN_COLUMNS = ("data.dataset", "model.arch", "model.width_mult", "method.name")  # shown in columns of their own
UNSET = object()  # a key one run's config.yaml lacks


def is_operational(key: str) -> bool:
    return key in OPERATIONAL_KEYS or key.startswith(OPERATIONAL_PREFIXES)


def render_value(value) -> str:
    """A setting's value as it would be written in an override (``true``, ``null``, ``[100,150]``)."""
    if value is UNSET:
        return "unset"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def with_defaults(flat: dict) -> dict:
    """The settings with today's defaults filled in: a config.yaml written by an older teskd lacks the settings
    added since, which had their default value (so they do not count as differing)."""
    from teskd.config import dotted, load_config, to_dict

    try:
        defaults = dotted(to_dict(load_config(None, [f"method.name={flat.get('method.name', 'teskd')}"])))
    except TeskdError:  # a method of a plug-in that is not loaded: fill in the non-method settings only
        defaults = {k: v for k, v in dotted(to_dict(load_config(None, []))).items() if not k.startswith("method.")}
    return {**defaults, **flat}
