"""Image decoding shared by every stage (local paths and ``s3://`` URIs)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import storage
from ..errors import SlsrError


class ImageReadError(SlsrError, ValueError):
    """An image file is missing, empty or cannot be decoded."""


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes to an RGB PIL image (greyscale, palette and RGBA are converted)."""
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{name}: not a decodable image ({e})") from e
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)  # PIL's convert("RGB") clips 16-bit/float values instead of scaling them
    return img.convert("RGB") if img.mode != "RGB" else img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer greyscale -> 8-bit by the top 8 of 16 bits; float greyscale in [0, 1] -> 0..255."""
    arr = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(arr, 0.0, 1.0) * 255.0 if np.nanmax(arr) <= 1.0 else np.clip(arr, 0.0, 255.0)
        return Image.fromarray(np.nan_to_num(scaled).round().astype(np.uint8))
    return Image.fromarray((np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8))


def read_image(uri: str) -> Image.Image:
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as e:
        raise ImageReadError(str(e)) from e
    return decode_image(data, uri)


def read_image_array(uri: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """HxWx3 uint8 array; ``size`` is (height, width)."""
    img = read_image(uri)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)
