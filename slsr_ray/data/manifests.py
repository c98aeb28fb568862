"""Manifests on shared storage: the way a cluster job reads a dataset that lives on S3.

    slsr data manifest --dataset market1501 --root /data/Market-1501-v15.09.15 \\
        --output s3://bucket/datasets/market1501/manifests --upload-images s3://bucket/datasets/market1501

writes ``train/query/gallery.parquet`` under ``--output`` (paths rewritten to the uploaded copies), and
a job then runs with ``--set data.manifests=s3://bucket/datasets/market1501/manifests``.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from .. import storage
from .base import ReidDataset, to_manifest

SPLITS = ("train", "query", "gallery")


def upload_dataset(ds: ReidDataset, dest: str) -> ReidDataset:
    """Copy the dataset folder ``ds.root`` to ``dest`` (``s3://`` or a local folder) and point the
    manifests at the copies."""
    src = os.path.abspath(ds.root)
    fs, path = storage.filesystem(dest)
    if storage.is_s3(dest):
        storage.check_s3_credentials(dest)
    try:
        pafs.copy_files(src, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as e:
        raise storage.StorageError(f"uploading {src} to {dest} failed: {e}") from e
    dest = storage.absolute(dest).rstrip("/")

    def rebase(t: pa.Table) -> pa.Table:
        new = pc.replace_substring(t["path"], src, dest)
        return t.set_column(t.schema.get_field_index("path"), "path", new)

    return ReidDataset(name=ds.name, root=dest, train=rebase(ds.train), query=rebase(ds.query),
                       gallery=rebase(ds.gallery), extra=ds.extra)


def write_manifests(ds: ReidDataset, out: str) -> dict[str, str]:
    """Write ``{train,query,gallery}.parquet`` under ``out``; returns their URIs."""
    uris = {}
    for split in SPLITS:
        uri = storage.join(out, f"{split}.parquet")
        storage.write_table(uri, to_manifest(getattr(ds, split)))
        uris[split] = uri
    return uris
