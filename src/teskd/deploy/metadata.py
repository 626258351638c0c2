"""What a deployer needs beside the weights: how to rebuild the network and how to feed it.

Stored as string key/values in every export (safetensors header, ONNX ``metadata_props``, a
JSON file inside a ``.pt2``), so an export alone is enough to rebuild and use the network.
Preprocessing: resize the shorter side to ``resize`` (bilinear, antialiased), centre-crop
``input_size``, scale to [0, 1], normalise with ``mean``/``std`` — the dataset spec's
``preprocessing`` (image folders: evaluation's sizes; CIFAR-size arrays: ``resize == input_size``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from teskd.errors import TeskdError, printable

# the keys every teskd export has (older ones, e.g. a run's teacher.safetensors, have exactly these three plus extras)
REQUIRED = ("arch", "num_classes", "width_mult")
# Upper bounds of what metadata may ask for: a few bytes of metadata must not make teskd build a network or
# an image of gigabytes before the weights are compared (ImageNet-21k has 21,841 classes; data.image_size is
# capped at 4096 by the config too).
MAX_CLASSES = 1_000_000
MAX_WIDTH_MULT = 16.0
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class DeployInfo:
    arch: str
    num_classes: int
    width_mult: float = 1.0
    input_size: int = 32  # the square crop the network sees
    resize: int = 32  # the shorter side before the centre crop
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    classes: tuple[str, ...] | None = None  # names in label order; None: unknown (labels shown as numbers)
    dataset: str | None = None
    config_hash: str | None = None  # sha256 of the training config (see config_hash)
    teskd_version: str | None = None

    def class_name(self, label: int) -> str:
        return self.classes[label] if self.classes else str(label)

    def to_metadata(self) -> dict[str, str]:
        meta = {"arch": self.arch, "num_classes": str(self.num_classes), "width_mult": repr(self.width_mult),
                "image_size": str(self.input_size), "resize": str(self.resize),
                "mean": ",".join(map(repr, self.mean)), "std": ",".join(map(repr, self.std))}
        optional = {"classes": json.dumps(list(self.classes), ensure_ascii=False) if self.classes else None,
                    "dataset": self.dataset, "config_hash": self.config_hash, "teskd_version": self.teskd_version}
        meta.update({k: v for k, v in optional.items() if v is not None})
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> DeployInfo:
        """Parse and validate; ``source`` (a path) names the file in the one-line errors."""
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise TeskdError(f"{source} lacks the metadata {', '.join(missing)} that teskd writes with the weights "
                             f"(arch, num_classes, width_mult); it was not exported by teskd")

        def number(key: str, kind, default=None, limit: float = math.inf):
            if key not in meta:
                return default
            shown = printable(meta[key][:40])
            try:
                value = kind(meta[key][:40])
            except ValueError:
                raise TeskdError(f"{source}: bad metadata {key}={shown!r} (expected a {kind.__name__})") from None
            if not (0 < value <= limit and value < math.inf):
                bound = f" at most {limit:g}" if limit < math.inf else ""
                raise TeskdError(f"{source}: bad metadata {key}={shown!r} (expected a positive finite number{bound})")
            return value

        def triple(key: str, default):
            if key not in meta:
                return default
            try:
                values = tuple(float(x) for x in meta[key].split(","))
            except ValueError:
                values = ()
            if len(values) != 3 or not all(math.isfinite(x) for x in values) or (key == "std" and min(values) <= 0):
                raise TeskdError(f"{source}: bad metadata {key}={meta[key]!r} (expected three numbers)")
            return values

        num_classes = number("num_classes", int, limit=MAX_CLASSES)
        size = number("image_size", int, 32, limit=MAX_IMAGE_SIZE)
        classes = _class_names(meta, num_classes, source)
        width_mult = number("width_mult", float, limit=MAX_WIDTH_MULT)
        info = cls(arch=meta["arch"], num_classes=num_classes, width_mult=width_mult, input_size=size,
                   resize=number("resize", int, size, limit=MAX_IMAGE_SIZE), mean=triple("mean", cls.mean),
                   std=triple("std", cls.std), classes=tuple(classes) if classes else None,
                   dataset=meta.get("dataset"), config_hash=meta.get("config_hash"),
                   teskd_version=meta.get("teskd_version"))
        if info.resize < info.input_size:
            raise TeskdError(f"{source}: bad metadata resize={info.resize} < image_size={info.input_size}")
        return info

    @classmethod
    def from_config(cls, cfg, num_classes: int, classes=None) -> DeployInfo:
        """What a run of ``cfg`` deploys: its backbone, the dataset's evaluation preprocessing."""
        from teskd.version import __version__
        from teskd.data.registry import get_dataset_spec

        p = get_dataset_spec(cfg.data.dataset).preprocessing(cfg.data)
        return cls(arch=cfg.model.arch, num_classes=num_classes, width_mult=float(cfg.model.width_mult),
                   input_size=p.input_size, resize=p.resize, mean=tuple(p.mean), std=tuple(p.std),
                   classes=tuple(classes) if classes else None, dataset=cfg.data.dataset,
                   config_hash=config_hash(cfg), teskd_version=__version__)


def _class_names(meta: dict[str, str], num_classes: int, source: str) -> list[str] | None:
    """The metadata's class names (a JSON list of ``num_classes`` strings), None where it has none."""
    if not meta.get("classes"):
        return None
    try:
        classes = json.loads(meta["classes"])
    except ValueError:
        classes = None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(classes) == num_classes):
        raise TeskdError(f"{source}: bad metadata classes (expected a JSON list of {num_classes} names)")
    return classes


def config_hash(cfg) -> str:
    """sha256 of the config's canonical JSON: the same settings give the same hash on any machine
    (``data.root`` is left out: where the data lay is not a setting of the model)."""
    from teskd.config import to_dict

    settings = to_dict(cfg)
    settings.get("data", {}).pop("root", None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
