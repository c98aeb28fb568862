"""What every figure shares: the :class:`Figure` record, reading the run, thumbnails and montages."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np

from .. import storage
from ..layout import RunLayout
from ..stages import read_record

log = logging.getLogger("slsr_ray.figures")

GREEN = (40, 170, 60)
RED = (210, 40, 40)
GREY = (150, 150, 150)
THUMB = (64, 32)  # (height, width) of the image thumbnails in montages


class FigureInputMissing(FileNotFoundError):
    """The run has no artifact this figure is drawn from (the stage did not run, or not yet)."""


@dataclass
class Figure:
    """A rendered figure: ``name`` (file stem in ``report/``), ``title``, a one-line ``caption``, the
    ``png`` bytes and ``data``, the plotted values (JSON-friendly lists and numbers)."""

    name: str
    title: str
    caption: str
    png: bytes
    data: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, read from the PNG header."""
        return int.from_bytes(self.png[16:20], "big"), int.from_bytes(self.png[20:24], "big")

    def _repr_png_(self) -> bytes:  # Jupyter shows the picture
        return self.png

    def save(self, uri: str) -> str:
        storage.write_bytes(uri, self.png)
        return uri


# ------------------------------------------------------------------------------------------ helpers


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _require(uri: str, figure: str, stage: str) -> str:
    if not storage.exists(uri):
        raise FigureInputMissing(f"figure {figure!r} needs {uri} (written by the {stage} stage); it is not in the run")
    return uri


def run_config(run_root: str) -> dict:
    """The run's saved ``config.json`` (empty when the run has none)."""
    uri = RunLayout(run_root).config
    return storage.read_json(uri) if storage.exists(uri) else {}


def run_strategies(run_root: str) -> list[str]:
    """The run's label strategies, main one first (from its config; else the evaluate/train folders)."""
    cfg = run_config(run_root)
    if cfg.get("train"):
        out = [cfg["train"].get("strategy", "slsr")]
        return out + [s for s in cfg.get("baselines", []) if s not in out]
    found = {s for stage in ("evaluate", "train") for s in storage.listdir(RunLayout(run_root).stage(stage))}
    return sorted(s for s in found if not s.startswith(("_", ".")))


def chosen_k(run_root: str) -> int:
    """K the run's later stages used: the cluster stage's record, else silhouette.json's ``best_k``."""
    rec = read_record(run_root, "cluster")
    if rec is not None:
        return int(rec.outputs["k"])
    uri = _require(RunLayout(run_root).silhouette, "clusters", "cluster")
    return int(storage.read_json(uri)["best_k"])


def _thumb(uri: str, size: tuple[int, int] = THUMB) -> np.ndarray:
    from ..data import read_image_array

    return read_image_array(uri, size)


def _framed(img: np.ndarray, color: tuple[int, int, int] | None, width: int = 3) -> np.ndarray:
    """The image with a coloured border of ``width`` pixels drawn inside it."""
    if color is None:
        return img
    out = img.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = color, color, color, color
    return out


def _strip(images: list[np.ndarray | None], size: tuple[int, int] = THUMB, pad: int = 2) -> np.ndarray:
    """Images side by side (``None`` leaves a blank cell), white padding between them."""
    h, w = size
    n = max(len(images), 1)
    out = np.full((h, n * w + (n - 1) * pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        if img is not None:
            out[:, i * (w + pad) : i * (w + pad) + w] = img
    return out


def _sample(n_total: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))
