"""The evaluation preprocessing a deployed network was trained with, for any image a user has.

Exactly the pipeline of teskd's evaluation (shorter side resized, centre crop, ``(x/255 - mean)/std``),
built from the same functions, so a prediction on a saved test image equals the evaluated one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from teskd.data.decode import read_rgb
from teskd.deploy.metadata import DeployInfo
from teskd.errors import TeskdError


def read_image(path: Path | str) -> torch.Tensor:
    """A JPEG, PNG, GIF or WebP file -> uint8 (3, H, W) RGB. Anything else (not a regular file, over 256 MiB, a
    header declaring more pixels than :data:`teskd.data.decode.MAX_IMAGE_PIXELS`, damaged) is a one-line
    TeskdError naming the file, raised before the decoder allocates anything."""
    return read_rgb(path)


class Preprocess:
    """``preprocess(image) -> float32 (3, S, S)``; ``image``: a path, a PIL image, or a uint8 (3, H, W) tensor."""

    def __init__(self, info: DeployInfo):
        from teskd.data.center_crop import resize_center_crop

        self.info = info
        self.crop = resize_center_crop(info.input_size, info.resize)

    def __call__(self, image) -> torch.Tensor:
        from teskd.data.augment import normalize

        if isinstance(image, (str, Path)):
            image = read_image(image)
        elif not isinstance(image, torch.Tensor):  # a PIL image (or anything PIL-like)
            from torchvision.transforms.v2.functional import pil_to_tensor

            image = pil_to_tensor(image.convert("RGB"))
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise TeskdError(f"preprocess expects an RGB uint8 (3, H, W) image, got {image.dtype} "
                             f"{tuple(image.shape)}")
        return normalize(self.crop(image), self.info.mean, self.info.std)

    def __repr__(self) -> str:
        i = self.info
        return (f"Preprocess(resize shorter side to {i.resize}, centre crop {i.input_size}, "
                f"mean={i.mean}, std={i.std})")
