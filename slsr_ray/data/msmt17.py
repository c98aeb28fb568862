"""MSMT17 (V1 or V2): ``list_{train,val,query,gallery}.txt`` over ``train/`` and ``test/``."""

from __future__ import annotations

import os

from .base import (
    DatasetError,
    ReidDataset,
    check_id,
    make_table,
    relabel,
    resolve_under,
)
from .tree import require_nonempty

# torchreid's folder names per release (some V2 copies use train/test, so both are tried).
_MSMT_DIRS = {
    "MSMT17_V1": (("train",), ("test",)),
    "MSMT17_V2": (("mask_train_v2", "train"), ("mask_test_v2", "test")),
}
_MSMT_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")


def _find_msmt_top(root: str) -> tuple[str, str, str]:
    """(version folder, train folder, test folder) of an MSMT17 tree."""
    candidates = [root]
    for version in _MSMT_DIRS:
        candidates += [os.path.join(root, version), os.path.join(root, "msmt17", version)]
    for top in candidates:
        if not os.path.isfile(os.path.join(top, "list_train.txt")):
            continue
        for train_names, test_names in _MSMT_DIRS.values():
            train = next(
                (os.path.join(top, n) for n in train_names if os.path.isdir(os.path.join(top, n))), None
            )
            test = next(
                (os.path.join(top, n) for n in test_names if os.path.isdir(os.path.join(top, n))), None
            )
            if train and test:
                return top, train, test
        raise DatasetError(
            f"{top} has list_train.txt but no image folders: expected train/ and test/ "
            "(MSMT17_V1) or mask_train_v2/ and mask_test_v2/ (MSMT17_V2)"
        )
    raise DatasetError(
        f"{root} does not look like MSMT17: expected MSMT17_V1/ or MSMT17_V2/ (in it or in msmt17/) "
        f"holding {', '.join(_MSMT_LISTS)} and the train/test image folders"
    )


def _msmt_camid(rel_path: str, list_path: str, line_no: int) -> int:
    # 0000/0000_000_01_0303morning_0015_0.jpg: the third '_' field is the 1-based camera
    parts = os.path.basename(rel_path).split("_")
    try:
        return int(parts[2]) - 1
    except (IndexError, ValueError):
        raise DatasetError(
            f"{list_path}:{line_no}: cannot parse a camera from file name {rel_path!r}; expected "
            "'<pid>_<idx>_<camera>_...' as in 0000_000_01_0303morning_0015_0.jpg"
        ) from None


def _read_msmt_list(list_path: str, image_dir: str):
    if not os.path.isfile(list_path):
        raise DatasetError(f"MSMT17 list file {list_path} is missing; expected lines '<relative path> <pid>'")
    paths, pids, camids = [], [], []
    with open(list_path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise DatasetError(f"{list_path}:{line_no}: expected '<relative path> <pid>', got {line!r}")
            paths.append(resolve_under(image_dir, fields[0], f"{list_path}:{line_no}"))
            pids.append(check_id(int(fields[1]), f"{list_path}:{line_no}"))
            camids.append(_msmt_camid(fields[0], list_path, line_no))
    if paths and not os.path.exists(paths[0]):
        raise DatasetError(
            f"{list_path} lists {paths[0]}, which does not exist: the list does not match {image_dir}"
        )
    return paths, pids, camids


def load_msmt17(root: str, combine_val: bool = True, **_) -> ReidDataset:
    """MSMT17 (V1 or V2) from its list files.

    ``train`` is list_train + list_val (``combine_val``), as the published 1,041-id / 32,621-image
    training set; query 3,060 ids / 11,659 images; gallery 82,161 images; 15 cameras.
    """
    top, train_dir, test_dir = _find_msmt_top(root)
    lists = {n: os.path.join(top, n) for n in _MSMT_LISTS}
    tp, ti, tc = _read_msmt_list(lists["list_train.txt"], train_dir)
    if combine_val:
        vp, vi, vc = _read_msmt_list(lists["list_val.txt"], train_dir)
        tp, ti, tc = tp + vp, ti + vi, tc + vc
    train, _ = relabel(make_table(tp, ti, tc))
    query = make_table(*_read_msmt_list(lists["list_query.txt"], test_dir))
    gallery = make_table(*_read_msmt_list(lists["list_gallery.txt"], test_dir))
    require_nonempty("msmt17", top, {"train": train, "query": query, "gallery": gallery})
    return ReidDataset(name="msmt17", root=top, train=train, query=query, gallery=gallery)
