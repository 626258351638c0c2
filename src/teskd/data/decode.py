"""Reading one image file from a stranger, within bounds: a regular file of at most :data:`MAX_IMAGE_BYTES`, in a
format the decoder reads (:data:`IMAGE_SUFFIXES`), whose header promises at most :data:`MAX_IMAGE_PIXELS` pixels.

The pixel count is read from the header before decoding: a few-KB PNG can declare 30000 x 30000 pixels, which
the decoder would allocate (2.7 GB) before reading a row. The headers of the four formats are parsed here (no
third-party parser), so an image is measured by the same bytes that would be decoded; a file in any other format
never reaches the decoder.

The decoder is Pillow's, limited to those four formats. (torchvision's ``decode_image`` read them before; its image
decoders are deprecated since torchvision 0.29 in favour of TorchCodec, a video library with FFmpeg underneath.
Pillow is installed with torchvision and matplotlib, and torchvision's own transforms use it.)
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from teskd.errors import TeskdError, printable
from teskd.fileio import read_regular

# The suffixes listed in image folders and searched by ``teskd predict``: exactly the formats decoded here (JPEG,
# PNG, GIF, WebP: those torchvision's decode_image read; BMP, TIFF and AVIF are refused), matched case-insensitively.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
MAX_IMAGE_BYTES = 256 << 20  # no photograph is larger; a larger "image" is a mistake or a trap
MAX_IMAGE_PIXELS = 89_478_485  # PIL's default decompression-bomb guard (2**30 / 12): ~268 MB as uint8 RGB

SOURCE_LINE = re.compile(r"^[\w.]+, \S+\.(?:cpp|h):\d+, ")  # a C++ source location in a message: noise
_PIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")  # what Image.open may try: the formats image_extent measures


class BadImage(TeskdError):
    """An image that cannot be read; ``reason`` is one line without the path (for :class:`BadSample`)."""

    def __init__(self, path: Path | str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image {printable(path)}: {reason}")

    def __reduce__(self):  # picklable as raised (it may cross from a DataLoader worker)
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class Extent:
    """What a header promises: the first frame's size, the frame count, and the pixels the decoder allocates."""

    width: int
    height: int
    frames: int = 1
    pixels: int = -1

    def __post_init__(self):
        if self.pixels < 0:
            object.__setattr__(self, "pixels", self.width * self.height)

    def __str__(self) -> str:
        size = f"{self.width}x{self.height} pixels"
        return f"{self.frames} frames, the first of {size}" if self.frames > 1 else size


class _Damaged(ValueError):
    pass


def _png(data) -> Extent:
    # IHDR must be the first chunk (libpng refuses anything else): length, "IHDR", width, height
    if len(data) < 24 or bytes(data[12:16]) != b"IHDR":
        raise _Damaged("PNG")
    return Extent(*struct.unpack_from(">II", data, 16))


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_STANDALONE = frozenset((0x00, 0x01, *range(0xD0, 0xD9)))  # no length field (0x00: stuffing, skipped as garbage)


def _jpeg(data) -> Extent:
    """The frame header (SOFn) that comes before the first scan, found marker by marker as libjpeg does."""
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:  # garbage between segments: libjpeg skips it with a warning
            i += 1
            continue
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i + 2 >= n:
            break
        marker = data[i]
        i += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image, or a scan without a frame header
            break
        length = struct.unpack_from(">H", data, i)[0]
        if marker in _SOF:
            if i + 7 > n:
                break
            height, width = struct.unpack_from(">HH", data, i + 3)
            return Extent(width, height)
        if length < 2:
            break
        i += length
    raise _Damaged("JPEG")


def _skip_sub_blocks(data, i: int) -> int:
    n = len(data)
    while i < n:
        size = data[i]
        i += 1 + size
        if size == 0:
            break
    return i


def _gif(data) -> Extent:
    """Every frame's size, each at its own (Pillow decodes the first frame only: counting all is the safe side)."""
    if len(data) < 13:
        raise _Damaged("GIF")
    flags, i, n = data[10], 13, len(data)
    if flags & 0x80:  # global colour table
        i += 3 << ((flags & 7) + 1)
    frames: list[tuple[int, int]] = []
    while i < n:
        kind = data[i]
        if kind == 0x21:  # extension: label, then data sub-blocks
            i = _skip_sub_blocks(data, i + 2)
        elif kind == 0x2C:  # image descriptor: left, top, width, height, flags
            if i + 10 > n:
                break
            frames.append(struct.unpack_from("<HH", data, i + 5))
            flags = data[i + 9]
            i += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)  # and a local colour table
            i = _skip_sub_blocks(data, i + 1)  # LZW code size, then the image data
        else:  # 0x3B trailer (or garbage, which giflib refuses)
            break
    if not frames:
        raise _Damaged("GIF")
    width, height = frames[0]
    return Extent(width, height, len(frames), sum(w * h for w, h in frames))


def _webp_bitstream(fourcc: bytes, data, at: int) -> tuple[int, int] | None:
    if fourcc == b"VP8 " and at + 10 <= len(data) and bytes(data[at + 3:at + 6]) == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, at + 6)
        return width & 0x3FFF, height & 0x3FFF
    if fourcc == b"VP8L" and at + 5 <= len(data) and data[at] == 0x2F:
        bits = struct.unpack_from("<I", data, at + 1)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _webp(data) -> Extent:
    """A simple file's VP8/VP8L size; an extended (VP8X) file's canvas, or its bitstream's if larger."""
    sizes, i, n = [], 12, len(data)
    while i + 8 <= n:
        fourcc, length = bytes(data[i:i + 4]), struct.unpack_from("<I", data, i + 4)[0]
        if fourcc == b"VP8X" and i + 18 <= n:
            width, height = (int.from_bytes(data[at:at + 3], "little") + 1 for at in (i + 12, i + 15))
            sizes.append((width, height))  # the canvas
        elif (size := _webp_bitstream(fourcc, data, i + 8)) is not None:
            sizes.append(size)
            break  # the image data: what follows is metadata
        i += 8 + length + (length & 1)
    if not sizes:
        raise _Damaged("WebP")
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    return Extent(width, height)


def image_format(head: bytes) -> str | None:
    """``JPEG``, ``PNG``, ``GIF`` or ``WebP`` when ``head`` (a file's first 16 bytes) starts with that format's
    magic number, as the decoders recognise it; None for anything else."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:15] == b"WEBPVP8":
        return "WebP"
    return None


def image_extent(data) -> Extent:
    """The size an image file's header declares (``data``: bytes or a buffer); ValueError when the format is not
    one decoded here, or the header is damaged."""
    head = bytes(data[:16])
    measure = {"JPEG": _jpeg, "PNG": _png, "GIF": _gif, "WebP": _webp}.get(image_format(head))
    try:
        if measure is not None:
            return measure(data)
    except (_Damaged, struct.error) as exc:
        raise ValueError(f"its {exc.args[0] if isinstance(exc, _Damaged) else 'image'} header is damaged or cut "
                         f"short (no image size found)") from exc
    raise ValueError("it is empty" if not head else "it is not a JPEG, PNG, GIF or WebP image")


def check_extent(data) -> Extent:
    """:func:`image_extent`, refusing (ValueError) an image over :data:`MAX_IMAGE_PIXELS` before it is decoded."""
    extent = image_extent(data)
    if extent.pixels > MAX_IMAGE_PIXELS:
        raise ValueError(f"its header declares {extent} ({extent.pixels:,} in all), more than the {MAX_IMAGE_PIXELS:,} "
                         f"pixels teskd decodes (a decompression bomb, or an image to shrink first)")
    return extent


def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """An image file's bytes (uint8 tensor) -> uint8 (3, H, W) RGB (grayscale, CMYK, palette and alpha converted;
    an animated GIF's first frame; 16 bits per sample scaled to 8). Refuses (ValueError) what :func:`check_extent`
    refuses, without decoding, and a file the decoder cannot read, in one line."""
    encoded = memoryview(data.numpy())
    check_extent(encoded)
    try:
        pixels = _decode(encoded.tobytes())
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:  # Pillow's ways of saying "damaged"
        from PIL import UnidentifiedImageError

        if isinstance(exc, UnidentifiedImageError):  # its text names a BytesIO object: say what it means
            raise ValueError("it is damaged or cut short: the decoder cannot read it past its header") from exc
        raise ValueError(" ".join(str(exc).split()) or type(exc).__name__) from exc
    # HWC -> CHW (as the transforms take it) in the one copy that also makes Pillow's read-only array writable
    return torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C"))


def _decode(encoded: bytes) -> np.ndarray:
    """Pillow's decoding of one image (JPEG, PNG, GIF or WebP only) -> uint8 (H, W, 3) RGB, maybe read-only."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded), formats=_PIL_FORMATS) as image:
        image.load()  # decode now: a truncated or damaged file fails here, inside this function
        if image.mode.startswith("I"):  # 16-bit grayscale PNG ("I;16", "I"): keep the 8 high bits, as a scaling
            gray = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        if image.mode == "P" and "transparency" in image.info:  # via RGBA: Pillow warns on P -> RGB with it
            image = image.convert("RGBA")
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # (convert copies even RGB)


def read_rgb(path: Path | str) -> torch.Tensor:
    """An image file -> uint8 (3, H, W) RGB; anything unreadable (not a regular file, over the size or pixel
    limits, not an image, damaged) -> :class:`BadImage` naming it in one line."""
    try:
        data = read_regular(Path(path), "image", MAX_IMAGE_BYTES)
    except TeskdError as exc:  # fileio's one line names the path; keep only its reason
        reason = str(exc)
        for prefix in (f"cannot read image {path}: ", f"refusing to read image {path}: "):
            reason = reason.removeprefix(prefix)
        raise BadImage(path, reason) from exc
    try:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return decode_rgb(encoded)
    except (RuntimeError, ValueError) as exc:
        text = SOURCE_LINE.sub("", " ".join(str(exc).split()))  # a C++ source location: noise
        raise BadImage(path, text[:300] or type(exc).__name__) from exc
