"""Datasets, the synthetic re-id generator, manifests and image decoding."""

from __future__ import annotations

import os

from . import datasets
from .base import (
    MANIFEST_SCHEMA,
    DatasetError,
    ReidDataset,
    check_images,
    check_unique_paths,
    make_table,
    relabel,
    to_manifest,
)
from .images import ImageReadError, decode_image, read_image, read_image_array, read_image_bytes
from .synthetic import make_synthetic

DATASETS = ("market1501", "dukemtmcreid", "msmt17", "cuhk03", "viper", "folder", "synthetic")


def load_dataset(
    name: str, root: str | os.PathLike, on_bad_images: str | None = None, **kwargs
) -> ReidDataset:
    """Load a re-id dataset as train/query/gallery manifests.

    ``name`` is one of :data:`DATASETS`. Protocol options are keyword arguments: ``split_id`` for
    ``viper`` (0..9) and ``cuhk03`` (0..19 classic), ``cuhk03_labeled`` / ``cuhk03_classic_split`` for
    ``cuhk03``, ``seed`` for ``viper``, ``combine_val`` for ``msmt17``, ``multi_query`` for
    ``market1501`` / ``synthetic`` (loads ``gt_bbox/`` into ``ds.multi_query``);
    :func:`~slsr_ray.data.protocols.load_protocol` picks them from a protocol name. ``synthetic`` reads a tree written by :func:`make_synthetic`
    (and writes one with default settings first when ``root`` is empty).

    ``on_bad_images`` decodes every image once (see :func:`check_images`): ``"raise"`` fails on
    unreadable or corrupt files, ``"skip"`` drops them with a warning; ``None`` (default) trusts the
    file names and leaves decoding errors to the stage that reads the image.
    """
    name = name.lower().replace("-", "").replace("_", "")
    # absolute: manifests are read by Ray workers whose working directory is not the caller's
    root = os.path.abspath(os.fspath(root))
    loader = getattr(datasets, f"load_{name}", None)
    if name not in DATASETS or (loader is None and name != "synthetic"):
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if os.path.isfile(root):
        raise DatasetError(f"dataset root {root} is a file", where="root", expected="a folder")
    if name == "synthetic":
        multi_query = kwargs.pop("multi_query", False)
        if not os.path.isdir(os.path.join(root, "bounding_box_train")):
            make_synthetic(root, **kwargs)
        ds = datasets.load_market1501(root, multi_query=multi_query)
        ds.name = "synthetic"
        return _checked(ds, on_bad_images)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root {root} does not exist")
    return _checked(loader(root, **kwargs), on_bad_images)


def _checked(ds: ReidDataset, on_bad_images: str | None) -> ReidDataset:
    if on_bad_images is None:
        return ds
    for split in ("train", "query", "gallery") + (("multi_query",) if ds.multi_query is not None else ()):
        table, bad = check_images(getattr(ds, split), on_error=on_bad_images)
        if bad and split == "train":
            table, _ = relabel(table)  # a dropped identity must not leave a hole in 0..N-1
        setattr(ds, split, table)
        ds.extra[f"bad_{split}_images"] = bad
    for split in ("train", "query", "gallery"):
        if getattr(ds, split).num_rows == 0:
            raise DatasetError(f"{ds.name}: no readable images left in the {split} split under {ds.root}")
    return ds


__all__ = [
    "DATASETS",
    "MANIFEST_SCHEMA",
    "DatasetError",
    "ImageReadError",
    "ReidDataset",
    "check_images",
    "check_unique_paths",
    "decode_image",
    "load_dataset",
    "make_synthetic",
    "make_table",
    "read_image",
    "read_image_array",
    "read_image_bytes",
    "relabel",
    "to_manifest",
]
