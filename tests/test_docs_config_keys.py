"""docs/configuration.md's "Every key" table names every key of the config (outside method.) with its default."""

import dataclasses
import json
import re

from conftest import REPO


def config_keys() -> dict[str, object]:
    from teskd.config import Config

    keys = {}

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                keys[prefix + f.name] = value

    walk(Config(), "")
    return keys


def documented() -> dict[str, str]:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = text[text.index("## Every key"):]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \| `([^`]*)` \|", table, re.M)}


def spelled(value) -> str:
    """A default as YAML spells it in the table (null, true, 0.0005, [100, 150], cifar100)."""
    return value if isinstance(value, str) else json.dumps(value)


def test_every_config_key_is_documented_with_its_default():
    keys = config_keys()
    keys["method.name"] = "teskd"  # the method's own keys are listed per method in methods.md
    assert documented() == {key: spelled(value) for key, value in keys.items()}
