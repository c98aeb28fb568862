"""Helpers every dataset parser uses to find its folders and list its images."""

from __future__ import annotations

import glob
import os
import warnings

from .base import DatasetError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def find_top(root: str, candidates: tuple[str, ...], marker: str) -> str:
    """The dataset folder: ``root`` itself when it holds ``marker``, else ``root/<candidate>``."""
    if os.path.isdir(os.path.join(root, marker)):
        return root
    for c in candidates:
        if os.path.isdir(os.path.join(root, c, marker)):
            return os.path.join(root, c)
    raise DatasetError(
        f"{root} does not look like this dataset: expected a '{marker}' folder in it "
        f"or in one of {list(candidates)}"
    )


def list_images(folder: str) -> list[str]:
    """Image files of ``folder`` by extension; a dangling symlink is not an image (warned about)."""
    named = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_EXTS))
    images = [p for p in named if os.path.isfile(p)]
    if len(images) < len(named):
        broken = [p for p in named if not os.path.isfile(p)]
        warnings.warn(f"{folder}: skipping {len(broken)} image name(s) that are not files (dangling symlinks?): "
                      + ", ".join(os.path.basename(p) for p in broken[:5]), stacklevel=2)
    return images



def require_nonempty(name: str, where: str, splits: dict) -> None:
    for split, t in splits.items():
        if t.num_rows == 0:
            raise DatasetError(f"{name}: the {split} split under {where} holds no images")

