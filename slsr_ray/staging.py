"""Folders that are the result of one command (an extraction, a clustering, a dataset, manifests) are
written with :func:`staged_folder`: into a hidden staging folder next to the destination, swapped in
only when complete, so a failure half-way never costs the previous result.

Local folders swap by renames (a destination that does not exist yet is one atomic rename); on S3,
which has no rename, the finished objects are copied in after the previous ones are deleted, the
completeness marker last. Staging folders are named ``.<name>.staging-<id>`` (``.<name>.old-<id>`` for
the previous content during a swap); a killed writer's leftovers are deleted by the next writer of the
same destination, so two writers must not target one destination at the same time.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterator

import pyarrow.fs as pafs

from . import storage


def _sibling(dest: str, name: str) -> str:
    parent = posixpath.dirname(dest) if storage.is_s3(dest) else os.path.dirname(dest)
    return storage.join(parent, name) if storage.is_s3(dest) else os.path.join(parent, name)


def _staging_names(dest: str) -> tuple[str, str]:
    base = posixpath.basename(dest) if storage.is_s3(dest) else os.path.basename(dest)
    return f".{base}.staging-", f".{base}.old-"


def remove_stale_staging(dest: str) -> None:
    """Delete staging / trash folders a killed writer of ``dest`` left next to it."""
    prefixes = _staging_names(dest)
    parent = posixpath.dirname(dest) if storage.is_s3(dest) else os.path.dirname(dest)
    for name in storage.listdir(parent):
        if name.startswith(prefixes):
            storage.remove(storage.join(parent, name))


@contextlib.contextmanager
def staged_folder(dest: str | os.PathLike, marker: str | None = None,
                  owned: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Write a folder's new content into a staging folder (yielded) next to ``dest`` and swap it in
    only when the ``with`` block completes; on an error the staging folder is deleted and ``dest`` is
    untouched. See :func:`swap_in` for what the swap replaces."""
    dest = storage.absolute(dest).rstrip("/")
    if not storage.is_s3(dest) and os.path.isfile(dest):
        raise storage.StorageError(f"{dest} is a file", where="output", expected="a folder (or a path that does not exist)")
    remove_stale_staging(dest)
    tmp = _sibling(dest, f"{_staging_names(dest)[0]}{uuid.uuid4().hex[:8]}")
    storage.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(storage.StorageError, OSError):
            storage.remove(tmp)
        raise
    swap_in(tmp, dest, marker=marker, owned=owned)


def swap_in(tmp: str, dest: str, marker: str | None = None, owned: Callable[[str], bool] | None = None) -> None:
    """Move every entry of the finished folder ``tmp`` into ``dest``, replacing same-named entries and
    dropping ``dest``'s other entries for which ``owned(name)`` is true (the previous result's files);
    other entries of ``dest`` are kept. ``marker`` (a completeness marker) leaves ``dest`` first and
    arrives last. A local ``dest`` that does not exist yet is one atomic rename."""
    owned = owned or (lambda name: False)
    new = storage.listdir(tmp)
    if not storage.is_s3(dest) and not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.rename(tmp, dest)
        return
    old = storage.listdir(dest)
    if marker and marker in old:
        storage.remove(storage.join(dest, marker))
    stale = [n for n in old if n != marker and (n in new or owned(n))]
    order = [n for n in new if n != marker] + ([marker] if marker in new else [])
    if storage.is_s3(dest):
        for name in stale:
            storage.remove(storage.join(dest, name))
        fs = storage.s3_filesystem()
        for name in order:
            src, dst = storage.filesystem(storage.join(tmp, name))[1], storage.filesystem(storage.join(dest, name))[1]
            try:
                pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
            except OSError as e:
                raise storage.StorageError(f"copying {name} into {dest} failed: {e}") from e
        storage.remove(tmp)
        return
    trash = _sibling(dest, f"{_staging_names(dest)[1]}{uuid.uuid4().hex[:8]}")
    os.makedirs(trash)
    for name in stale:
        os.rename(os.path.join(dest, name), os.path.join(trash, name))
    for name in order:
        os.rename(os.path.join(tmp, name), os.path.join(dest, name))
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
