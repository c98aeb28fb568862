"""Image decoding shared by every stage (local paths and ``s3://`` URIs)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import storage


class ImageReadError(ValueError):
    """An image file is missing, empty or cannot be decoded."""


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes to an RGB PIL image (greyscale, palette and RGBA are converted)."""
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageReadError(f"{name}: not a decodable image ({e})") from e
    return img.convert("RGB") if img.mode != "RGB" else img


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
