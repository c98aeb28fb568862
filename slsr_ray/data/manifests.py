"""Manifests on shared storage: the way a cluster job reads a dataset that lives on S3.

    slsr data manifest --dataset market1501 --root /data/Market-1501-v15.09.15 \\
        --output s3://bucket/datasets/market1501/manifests --upload-images s3://bucket/datasets/market1501

writes ``train/query/gallery.parquet`` under ``--output`` (paths rewritten to the uploaded copies), and
a job then runs with ``--set data.manifests=s3://bucket/datasets/market1501/manifests``.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from .. import storage
from ..staging import staged_folder
from .base import DatasetError, ReidDataset, to_manifest

SPLITS = ("train", "query", "gallery")


def upload_dataset(ds: ReidDataset, dest: str) -> ReidDataset:
    """Copy the dataset folder ``ds.root`` to ``dest`` (``s3://`` or a local folder) and point the
    manifests at the copies. Every manifest path must lie under ``ds.root`` (or already be ``s3://``),
    and every rebased path is checked to exist at ``dest`` afterwards: the manifests never list an
    image that was not uploaded."""
    src = os.path.abspath(ds.root)
    outside = [p for s in SPLITS for p in getattr(ds, s)["path"].to_pylist()
               if not p.startswith("s3://") and os.path.commonpath([src, os.path.abspath(p)]) != src]
    if outside:
        raise DatasetError(f"{len(outside)} image(s) lie outside the dataset root, e.g. {outside[0]}",
                           where="--upload-images", expected=f"images under {src} (only that folder is copied)")
    fs, path = storage.filesystem(dest)
    if storage.is_s3(dest):
        storage.check_s3_credentials(dest)
    try:
        pafs.copy_files(src, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as e:
        raise storage.StorageError(f"uploading {src} to {dest} failed: {e}") from e
    dest = storage.absolute(dest).rstrip("/")

    def rebase(t: pa.Table) -> pa.Table:
        new = [dest + p[len(src):] if not p.startswith("s3://") else p for p in t["path"].to_pylist()]
        return t.set_column(t.schema.get_field_index("path"), "path", pa.array(new, pa.string()))

    out = ReidDataset(name=ds.name, root=dest, train=rebase(ds.train), query=rebase(ds.query),
                      gallery=rebase(ds.gallery), extra=ds.extra,
                      multi_query=rebase(ds.multi_query) if ds.multi_query is not None else None)
    splits = SPLITS + (("multi_query",) if out.multi_query is not None else ())
    missing = storage.missing_files([p for s in splits for p in getattr(out, s)["path"].to_pylist()])
    if missing:
        raise storage.StorageError(f"{len(missing)} image(s) are missing after the upload, e.g. {missing[0]}",
                                   where=dest, expected="every manifest image copied (is a source file unreadable?)")
    return out


def write_manifests(ds: ReidDataset, out: str) -> dict[str, str]:
    """Write ``{train,query,gallery}.parquet`` under ``out`` (and ``multi_query.parquet`` when the
    dataset was loaded for the multi-query protocol), staged: all of them or none replace the previous
    ones; other files in ``out`` are kept. Returns their URIs."""
    splits = SPLITS + (("multi_query",) if ds.multi_query is not None else ())
    names = {f"{split}.parquet" for split in splits}
    with staged_folder(out, owned=lambda name: name in names) as tmp:
        for split in splits:
            storage.write_table(storage.join(tmp, f"{split}.parquet"), to_manifest(getattr(ds, split)))
    return {split: storage.join(storage.absolute(out), f"{split}.parquet") for split in splits}
