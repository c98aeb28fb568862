"""The dataset contract every parser returns, and the manifest schema stages exchange.

A manifest is a parquet table, one row per image:

========== ======== ==============================================================================
column     type     meaning
========== ======== ==============================================================================
path       string   absolute local path or ``s3://`` URI of the image
pid        int64    identity; train splits are relabelled 0..N-1, query/gallery keep dataset ids
camid      int64    zero-based camera index
source     string   ``real`` or ``generated`` (generated rows come from the GAN stage)
cluster    int64    k-means cluster of a generated image (``-1`` for real images)
========== ======== ==============================================================================

Parsers return ``path``, ``pid`` and ``camid``; :func:`to_manifest` adds the defaults for the rest.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import SlsrError

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("pid", pa.int64()),
        ("camid", pa.int64()),
        ("source", pa.string()),
        ("cluster", pa.int64()),
    ]
)


class DatasetError(SlsrError, ValueError):
    """A dataset root is missing, has the wrong layout, or holds files that do not parse."""


INT64_MAX = 2**63 - 1


def check_id(value: int, where: str, what: str = "pid") -> int:
    """A pid (>= 0, or -1 for junk) or camera id (>= 0) that fits the manifest's int64 column."""
    low = -1 if what == "pid" else 0
    if not low <= value <= INT64_MAX:
        expected = "an identity >= 0 (or -1 for junk images)" if what == "pid" else "a camera number >= 0"
        shown = str(value) if len(str(value)) <= 30 else str(value)[:27] + "..."
        raise DatasetError(f"{what} {shown} out of range", where=where, expected=f"{expected} that fits in 64 bits")
    return value


def make_table(paths: list[str], pids: list[int], camids: list[int]) -> pa.Table:
    n = len(paths)
    for name, values in (("pid", pids), ("camid", camids)):
        bad = next((v for v in values if not -1 <= v <= INT64_MAX), None) if values else None
        if bad is not None:  # the parsers check with the file name; this is the backstop
            raise DatasetError(f"{name} {bad} out of range", expected="an id that fits in 64 bits (>= -1)")
    return pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "pid": pa.array(pids, pa.int64()),
            "camid": pa.array(camids, pa.int64()),
            "source": pa.array(["real"] * n, pa.string()),
            "cluster": pa.array(np.full(n, -1, dtype=np.int64)),
        },
        schema=MANIFEST_SCHEMA,
    )


def to_manifest(table: pa.Table) -> pa.Table:
    """Conform a table with at least path/pid/camid to :data:`MANIFEST_SCHEMA` (extra columns kept)."""
    missing = [c for c in ("path", "pid", "camid") if c not in table.column_names]
    if missing:
        raise DatasetError(f"manifest is missing required columns {missing}; has {table.column_names}")
    n = table.num_rows
    if "source" not in table.column_names:
        table = table.append_column("source", pa.array(["real"] * n, pa.string()))
    if "cluster" not in table.column_names:
        table = table.append_column("cluster", pa.array(np.full(n, -1, dtype=np.int64)))
    for name in ("pid", "camid", "cluster"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pc.cast(table[name], pa.int64()))
    return table


def check_unique_paths(table: pa.Table, where: str, max_listed: int = 5) -> None:
    """Raise :class:`DatasetError` when a split lists an image more than once.

    A duplicated row would silently count the image twice in training, k-means and evaluation, and
    break "one feature per image"; it is almost always a manifest-building mistake, so it is an error
    (naming a few duplicated paths) rather than a silent dedup.
    """
    counts = pc.value_counts(table["path"])
    dup = [(c["values"].as_py(), c["counts"].as_py()) for c in counts if c["counts"].as_py() > 1]
    if dup:
        listed = ", ".join(f"{p!r} x{n}" for p, n in dup[:max_listed])
        more = f" and {len(dup) - max_listed} more" if len(dup) > max_listed else ""
        raise DatasetError(f"{where}: {len(dup)} image path(s) listed more than once: {listed}{more}; "
                           "each image must appear once per split")


def resolve_under(root: str, rel_path: str, where: str) -> str:
    """``root/rel_path``, refusing a relative path that climbs out of ``root`` (``../../etc/passwd``).

    Symlinks are not resolved (datasets often link image folders from elsewhere); ``..`` components
    that leave ``root`` are an error naming ``where`` (the manifest file and line)."""
    root_abs = os.path.abspath(root)
    full = os.path.normpath(os.path.join(root_abs, rel_path))
    if os.path.commonpath([root_abs, full]) != root_abs:
        raise DatasetError(f"{where}: path {rel_path!r} points outside the dataset root {root_abs}")
    return os.path.normpath(os.path.join(root, rel_path))


def relabel(table: pa.Table) -> tuple[pa.Table, dict[int, int]]:
    """Map a split's pids to 0..N-1 in sorted order of the original ids (as torchreid does)."""
    pids = table["pid"].to_numpy()
    uniq = np.unique(pids)
    mapping = {int(p): i for i, p in enumerate(uniq)}
    new = np.searchsorted(uniq, pids).astype(np.int64)
    i = table.schema.get_field_index("pid")
    return table.set_column(i, "pid", pa.array(new, pa.int64())), mapping


@dataclass
class ReidDataset:
    """Train/query/gallery manifests of one re-id dataset (one split/trial where the protocol has many)."""

    name: str
    root: str
    train: pa.Table
    query: pa.Table
    gallery: pa.Table
    extra: dict = field(default_factory=dict)
    # Market-1501 multi-query: extra images of each query's (id, camera) from gt_bbox/ (None when not loaded)
    multi_query: pa.Table | None = None

    @property
    def num_train_pids(self) -> int:
        return len(np.unique(self.train["pid"].to_numpy())) if self.train.num_rows else 0

    def split_stats(self) -> list[dict]:
        rows = []
        splits = ("train", "query", "gallery") + (("multi_query",) if self.multi_query is not None else ())
        for split in splits:
            t = getattr(self, split)
            rows.append(
                {
                    "split": split,
                    "ids": int(len(np.unique(t["pid"].to_numpy()))) if t.num_rows else 0,
                    "images": int(t.num_rows),
                    "cameras": int(len(np.unique(t["camid"].to_numpy()))) if t.num_rows else 0,
                }
            )
        return rows

    def summary(self) -> str:
        lines = [f"dataset {self.name} at {self.root}", f"{'split':<8} {'ids':>7} {'images':>8} {'cameras':>8}"]
        for r in self.split_stats():
            lines.append(f"{r['split']:<8} {r['ids']:>7} {r['images']:>8} {r['cameras']:>8}")
        return "\n".join(lines)


def require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DatasetError(f"{path} does not exist or is not a folder; expected {what}")


def check_images(
    table: pa.Table, on_error: str = "raise", num_threads: int = 8, max_listed: int = 5
) -> tuple[pa.Table, int]:
    """Decode every image of a manifest (local or ``s3://``) and deal with the ones that fail.

    ``on_error="raise"`` raises a :class:`DatasetError` listing the first ``max_listed`` bad paths and
    the count of the rest; ``on_error="skip"`` drops the bad rows with a warning. Returns the
    (possibly filtered) table and the number of bad images. Decoding runs in a thread pool: PIL and
    the S3 client release the GIL, so threads overlap the I/O and most of the decoding.
    """
    from tqdm.auto import tqdm

    from .images import ImageReadError, read_image

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    paths = table["path"].to_pylist()

    def problem(path: str) -> str | None:
        try:
            read_image(path)
        except ImageReadError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = list(tqdm(pool.map(problem, paths), total=len(paths), desc="checking images", leave=False))
    bad = [i for i, r in enumerate(results) if r is not None]
    if not bad:
        return table, 0
    listed = "; ".join(results[i] for i in bad[:max_listed])
    more = f" and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
    if on_error == "raise":
        raise DatasetError(f"{len(bad)} of {len(paths)} images cannot be read: {listed}{more}")
    warnings.warn(f"skipping {len(bad)} of {len(paths)} unreadable images: {listed}{more}", stacklevel=2)
    keep = np.ones(len(paths), dtype=bool)
    keep[bad] = False
    return table.filter(pa.array(keep)), len(bad)
