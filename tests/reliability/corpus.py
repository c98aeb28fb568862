"""The bad-input corpus, built on the fly (no binary files in the repository).

Each builder returns the bytes of one file; :func:`market_tree` writes a small valid Market-1501 tree
with extra files dropped into its train folder, and :func:`folder_csv_dataset` a ``folder`` dataset
described by CSV manifests.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (64, 32), fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A valid image of ``size`` (height, width) in PIL ``mode`` (RGB, L, P, RGBA, LA, CMYK, 1)."""
    h, w = size
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "RGB" else rgb
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def gradient_16bit_png(size: tuple[int, int] = (64, 32)) -> bytes:
    """A 16-bit greyscale PNG whose values ramp over the full 0..65535 range (mean ~32767)."""
    h, w = size
    ramp = np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    return buf.getvalue()


def float_tiff(size: tuple[int, int] = (64, 32)) -> bytes:
    """A 32-bit float greyscale TIFF with values in [0, 1] (mode ``F``)."""
    h, w = size
    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)).save(buf, format="TIFF")
    return buf.getvalue()


def truncated_jpeg(keep: float = 0.5) -> bytes:
    """The first ``keep`` share of a valid JPEG's bytes (a download cut short)."""
    data = image_bytes(size=(128, 64))
    return data[: int(len(data) * keep)]


def huge_jpeg(size: tuple[int, int] = (4000, 6000)) -> bytes:
    """A large but legitimate photo-sized JPEG (24 Mpixel); flat colour, so it encodes fast and small."""
    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), (90, 140, 60)).save(buf, format="JPEG", quality=50)
    return buf.getvalue()


def decompression_bomb_png(width: int = 20000, height: int = 10000) -> bytes:
    """A PNG header claiming width x height pixels (200 Mpixel by default) with a tiny body.

    PIL refuses images over twice ``Image.MAX_IMAGE_PIXELS`` as a decompression-bomb attack; the file is
    crafted by hand so building it allocates nothing."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write(path: str | os.PathLike, data: bytes) -> str:
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def market_tree(root: str | os.PathLike, extra_train: dict[str, bytes] | None = None) -> str:
    """A valid 3-id Market-1501 tree (2 train ids, 1 test id, 2 cameras) plus ``extra_train`` files
    (name -> bytes) in ``bounding_box_train``. Returns the root."""
    root = os.fspath(root)
    files = {
        "bounding_box_train": ["0001_c1s1_000001_00.jpg", "0001_c2s1_000002_00.jpg",
                               "0002_c1s1_000003_00.jpg", "0002_c2s1_000004_00.jpg"],
        "query": ["0003_c1s1_000005_00.jpg"],
        "bounding_box_test": ["0003_c2s1_000006_00.jpg", "0000_c1s1_000007_00.jpg"],
    }
    for i, (folder, names) in enumerate(files.items()):
        for j, name in enumerate(names):
            write(os.path.join(root, folder, name), image_bytes(seed=10 * i + j))
    for name, data in (extra_train or {}).items():
        write(os.path.join(root, "bounding_box_train", name), data)
    return root


def folder_csv_dataset(root: str | os.PathLike, train_rows: list[str], query_rows: list[str] | None = None,
                       gallery_rows: list[str] | None = None) -> str:
    """A ``folder`` dataset: images ``imgs/{a,b,c,d}.jpg`` and CSV manifests with the given
    ``path,pid,camid`` rows (defaults: one valid query and gallery row)."""
    root = os.fspath(root)
    for i, name in enumerate("abcd"):
        write(os.path.join(root, "imgs", f"{name}.jpg"), image_bytes(seed=i))
    splits = {
        "train": train_rows,
        "query": query_rows or ["imgs/c.jpg,7,0"],
        "gallery": gallery_rows or ["imgs/d.jpg,7,1"],
    }
    for split, rows in splits.items():
        with open(os.path.join(root, f"{split}.csv"), "w") as f:
            f.write("path,pid,camid\n" + "".join(r + "\n" for r in rows))
    return root


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    """``n`` random bytes (``head -c 4096 /dev/urandom``, reproducibly)."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def torch_file(obj) -> bytes:
    """``obj`` as ``torch.save`` writes it."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def resnet18_state_dict(break_key: str | None = None) -> dict:
    """A torchvision resnet18 state dict (random weights); ``break_key``'s tensor gets a wrong shape."""
    import torch
    from torchvision import models

    state = models.resnet18(weights=None).state_dict()
    if break_key is not None:
        state[break_key] = torch.zeros(3, 3)
    return state


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` share of ``data`` (a write cut short)."""
    return data[: int(len(data) * keep)]


def market_file_tree(root: str | os.PathLike, names: list[str]) -> str:
    """A Market-1501 tree holding exactly ``names`` in ``bounding_box_train`` (plus one query and two
    gallery images), for file-name trials."""
    root = os.fspath(root)
    for i, name in enumerate(names):
        write(os.path.join(root, "bounding_box_train", name), image_bytes(seed=i))
    write(os.path.join(root, "query", "0003_c1s1_000005_00.jpg"), image_bytes(seed=50))
    write(os.path.join(root, "bounding_box_test", "0003_c2s1_000006_00.jpg"), image_bytes(seed=51))
    return root
