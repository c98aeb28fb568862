"""VIPeR: ``cam_a/`` and ``cam_b/``, one image per person and camera; 10 seeded random halves."""

from __future__ import annotations

import json
import os

import numpy as np

from .base import (
    DatasetError,
    ReidDataset,
    make_table,
    relabel,
    require_dir,
)
from .tree import find_top, list_images, require_nonempty

VIPER_NUM_SPLITS = 10
_VIPER_SPLITS_FORMAT = "slsr-viper-splits-v1"


def _viper_images(folder: str) -> dict[int, str]:
    require_dir(folder, "VIPeR camera folder of <pid>_<angle>.bmp images")
    out: dict[int, str] = {}
    for p in list_images(folder):
        head = os.path.basename(p).split("_")[0]
        if not head.isdigit():
            raise DatasetError(f"cannot parse file name {p!r}: expected '<pid>_<angle>.bmp' as in 001_45.bmp")
        pid = int(head)
        if pid in out:
            raise DatasetError(f"{folder} holds two images of VIPeR id {pid}: {out[pid]} and {p}")
        out[pid] = p
    if not out:
        raise DatasetError(f"{folder} holds no images; expected <pid>_<angle>.bmp files")
    return out


def make_viper_splits(pids: list[int], seed: int = 0, num_splits: int = VIPER_NUM_SPLITS) -> list[dict]:
    """``num_splits`` random halves of ``pids``: ``{"train": [...], "test": [...]}`` (floor half trains)."""
    rng = np.random.default_rng(seed)
    pids = sorted(pids)
    splits = []
    for _ in range(num_splits):
        order = rng.permutation(len(pids))
        half = len(pids) // 2
        splits.append(
            {"train": sorted(pids[i] for i in order[:half]), "test": sorted(pids[i] for i in order[half:])}
        )
    return splits


def _viper_splits(top: str, pids: list[int], seed: int) -> list[dict]:
    """The splits for ``seed``: read from ``splits.json`` when it was made with this seed and these ids,
    else made afresh and written there when the folder is writable (else kept in memory)."""
    path = os.path.join(top, "splits.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
        if (
            isinstance(saved, dict)
            and saved.get("format") == _VIPER_SPLITS_FORMAT
            and saved.get("seed") == seed
            and sorted(saved.get("pids", [])) == sorted(pids)
        ):
            return saved["splits"]
        # Another seed, another id set or torchreid's own file: leave it alone, use fresh splits.
        return make_viper_splits(pids, seed)
    splits = make_viper_splits(pids, seed)
    payload = {"format": _VIPER_SPLITS_FORMAT, "seed": seed, "pids": sorted(pids), "splits": splits}
    try:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only dataset folder: the splits are deterministic for the seed anyway
    return splits


def load_viper(root: str, split_id: int = 0, seed: int = 0, **_) -> ReidDataset:
    """VIPeR: 632 identities seen once by camera a and once by camera b.

    Ten random half splits (deterministic for ``seed``, saved to ``<VIPeR>/splits.json`` when the
    folder is writable): 316 train ids (both cameras, relabelled), 316 test ids with query = camera a
    and gallery = camera b, keeping the ids from the file names (``001_45.bmp`` is id 1). (torchreid
    also lists each split with the cameras swapped, as 20 split ids; the paper reports 10 trials.)
    """
    top = find_top(root, ("VIPeR", "viper/VIPeR", "viper"), "cam_a")
    cam_a = _viper_images(os.path.join(top, "cam_a"))
    cam_b = _viper_images(os.path.join(top, "cam_b"))
    if set(cam_a) != set(cam_b):
        only_a, only_b = sorted(set(cam_a) - set(cam_b)), sorted(set(cam_b) - set(cam_a))
        raise DatasetError(
            f"VIPeR at {top}: every id needs one image in cam_a and one in cam_b; "
            f"only in cam_a: {only_a[:5]}, only in cam_b: {only_b[:5]}"
        )
    if len(cam_a) < 2:
        raise DatasetError(
            f"VIPeR at {top} has {len(cam_a)} identity; need at least 2 for a train/test split"
        )
    splits = _viper_splits(top, list(cam_a), seed)
    if not 0 <= split_id < len(splits):
        raise DatasetError(f"VIPeR split_id must be in 0..{len(splits) - 1}, got {split_id}")
    split = splits[split_id]
    train_pids = [p for p in split["train"] for _ in (0, 1)]
    train = make_table(
        [cam_a[p] if i % 2 == 0 else cam_b[p] for i, p in enumerate(train_pids)],
        train_pids,
        [i % 2 for i in range(len(train_pids))],
    )
    train, _ = relabel(train)
    test = split["test"]
    query = make_table([cam_a[p] for p in test], test, [0] * len(test))
    gallery = make_table([cam_b[p] for p in test], test, [1] * len(test))
    require_nonempty("viper", top, {"train": train, "query": query, "gallery": gallery})
    return ReidDataset(
        name="viper",
        root=top,
        train=train,
        query=query,
        gallery=gallery,
        extra={"split_id": split_id, "seed": seed, "num_splits": len(splits)},
    )
