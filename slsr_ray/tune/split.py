"""The sweep's data: the validation split carved from the training ids, and each trial's prefix of the
generated images."""

from __future__ import annotations

import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import SweepError

log = logging.getLogger("slsr_ray.tune")


def carve_validation_split(train: pa.Table, val_fraction: float, seed: int = 0) -> dict[str, pa.Table]:
    """Hold out ``val_fraction`` of the training identities for validation.

    Returns ``train`` (the remaining ids, relabelled 0..N-1), ``query`` (one image per camera of each
    held-out id) and ``gallery`` (the held-out ids' other images). Only ids seen by at least two cameras
    are held out, so every query has a cross-camera match."""
    from ..data import to_manifest

    train = to_manifest(train)
    real = train.filter(pc.not_equal(train["source"], "generated"))
    pids = real["pid"].to_numpy()
    cams = real["camid"].to_numpy()
    uniq = np.unique(pids)
    multi_cam = np.array([p for p in uniq if len(np.unique(cams[pids == p])) >= 2])
    n_val = max(1, int(round(val_fraction * len(uniq))))
    if len(multi_cam) < n_val or len(uniq) - n_val < 1:
        raise SweepError(
            f"cannot hold out {n_val} of {len(uniq)} training identities for validation "
            f"({len(multi_cam)} are seen by >= 2 cameras); lower val_fraction or use more identities"
        )
    rng = np.random.default_rng(seed)
    val_ids = np.sort(rng.choice(multi_cam, size=n_val, replace=False))
    is_val = np.isin(pids, val_ids)
    order = rng.permutation(len(pids))  # which image of an (id, camera) becomes the query
    query_rows: set[int] = set()
    seen: set[tuple[int, int]] = set()
    for i in order:
        if is_val[i] and (int(pids[i]), int(cams[i])) not in seen:
            seen.add((int(pids[i]), int(cams[i])))
            query_rows.add(int(i))
    q_mask = np.zeros(len(pids), bool)
    q_mask[list(query_rows)] = True
    from ..data.base import relabel

    new_train, _ = relabel(real.filter(pa.array(~is_val)))
    return {
        "train": new_train,
        "query": real.filter(pa.array(q_mask)),
        "gallery": real.filter(pa.array(is_val & ~q_mask)),
    }


# ----------------------------------------------------------------------------- generated prefixes


_INDEX_RE = re.compile(r"(\d+)\.[A-Za-z]+$")


def image_index(path: str) -> int:
    """Index i of a generated image (``images/c{c}/<shard>.tar#{i:06d}.jpg``; an older run's ``images/c{c}/{i:06d}.jpg`` reads the same)."""
    m = _INDEX_RE.search(path)
    if not m:
        raise ValueError(f"generated image {path!r} is not named <index>.<ext>")
    return int(m.group(1))


def generated_prefix(manifest: pa.Table, count: int, sizes: dict[int, int], split: str = "proportional") -> pa.Table:
    """The rows of a larger generated set that make up a set of ``count`` images: per cluster c the
    images with index < ``split_count(count, sizes, split)[c]`` (what ``generate_images`` would have
    written for ``count``). Raises when the manifest holds fewer than that in some cluster."""
    from ..generate import split_count

    if count <= 0:
        return manifest.slice(0, 0)
    want = split_count(count, sizes, split)
    clusters = manifest["cluster"].to_numpy()
    index = np.fromiter((image_index(p) for p in manifest["path"].to_pylist()), np.int64, manifest.num_rows)
    have = {int(c): int(np.sum(clusters == c)) for c in np.unique(clusters)}
    short = {c: (n, have.get(c, 0)) for c, n in want.items() if n > have.get(c, 0)}
    if short:
        raise SweepError(
            f"the shared generated set has too few images for count {count}: cluster -> (needed, have) {short}"
        )
    limit = np.array([want.get(int(c), 0) for c in clusters], np.int64)
    return manifest.filter(pa.array(index < limit))
