"""Image decoding shared by every stage (local paths and ``s3://`` URIs)."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import layout, storage
from ..errors import SlsrError

# Generated images live in tar shards (``<shard>.tar#<member>`` paths, see layout.shard_member): a process
# reads a shard once and keeps its members, up to this many MB of shards (least recently used go first).
SHARD_CACHE_ENV = "SLSR_SHARD_CACHE_MB"
_shards: OrderedDict[str, dict[str, bytes]] = OrderedDict()
_shard_sizes: dict[str, int] = {}
_shard_lock = threading.Lock()


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


def _shard_members(shard: str) -> dict[str, bytes]:
    """Every member of a tar shard (read once per process, then from the cache)."""
    with _shard_lock:
        members = _shards.get(shard)
        if members is not None:
            _shards.move_to_end(shard)
            return members
    data = storage.read_bytes(shard)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except tarfile.TarError as e:
        raise ImageReadError(f"{shard}: not a readable image shard ({e})") from e
    limit = float(os.environ.get(SHARD_CACHE_ENV) or 512) * 1024 * 1024
    with _shard_lock:
        _shards[shard], _shard_sizes[shard] = members, len(data)
        while sum(_shard_sizes.values()) > limit and len(_shards) > 1:
            old, _ = _shards.popitem(last=False)
            _shard_sizes.pop(old, None)
    return members


def read_image_bytes(uri: str) -> bytes:
    """The bytes of an image file, or of one image inside a generated-image shard (``<shard>.tar#name``)."""
    try:
        member = layout.split_shard_member(uri)
        if member is None:
            return storage.read_bytes(uri)
        shard, name = member
        members = _shard_members(shard)
    except storage.StorageError as e:
        raise ImageReadError(str(e)) from e
    if name not in members:
        raise ImageReadError(f"{uri}: the shard {shard} has no image {name}")
    return members[name]


def read_image(uri: str) -> Image.Image:
    return decode_image(read_image_bytes(uri), uri)


def read_image_array(uri: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """HxWx3 uint8 array; ``size`` is (height, width)."""
    img = read_image(uri)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)
