"""Your own dataset: ``train/``, ``query/``, ``gallery/`` folders (``<pid>/<cam>_*.jpg``) or CSV lists."""

from __future__ import annotations

import io
import os
import re

from .base import (
    DatasetError,
    ReidDataset,
    check_id,
    check_unique_paths,
    make_table,
    relabel,
    resolve_under,
)
from .tree import list_images, require_nonempty

FOLDER_SPLITS = ("train", "query", "gallery")
_FOLDER_CAM_RE = re.compile(r"^[cC]?(\d+)_")


def _folder_from_tree(split_dir: str) -> tuple[list[str], list[int], list[int]]:
    paths, pids, cams = [], [], []
    for entry in sorted(os.listdir(split_dir)):
        pid_dir = os.path.join(split_dir, entry)
        if not os.path.isdir(pid_dir):
            continue
        if not entry.lstrip("-").isdigit():
            raise DatasetError(f"{pid_dir}: identity folders must be named by an integer pid (e.g. 0042)")
        pid = check_id(int(entry), pid_dir)
        for p in list_images(pid_dir):
            m = _FOLDER_CAM_RE.match(os.path.basename(p))
            if m is None:
                raise DatasetError(
                    f"cannot parse file name {p!r}: expected '<camera>_<anything>' with an integer camera, "
                    "as in c3_0001.jpg or 3_0001.jpg"
                )
            paths.append(p)
            pids.append(pid)
            cams.append(check_id(int(m.group(1)), p, "camera"))
    return paths, pids, cams


def _folder_from_csv(csv_path: str, root: str) -> tuple[list[str], list[int], list[int]]:
    """Rows of a ``path,pid,camid`` CSV: every row has exactly the header's fields, integer ids in
    range, and (for local paths) an image file that exists."""
    import csv

    expected = "a UTF-8 CSV file with a header path,pid,camid"
    try:
        with open(csv_path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{csv_path} is not UTF-8 text (byte {e.start}: {e.reason})", expected=expected) from None
    if "\0" in text:
        raise DatasetError(f"{csv_path} holds NUL bytes (a binary file?)", expected=expected)
    rows = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(rows, [])]
    missing = {"path", "pid", "camid"} - set(header)
    if missing:
        raise DatasetError(f"{csv_path}: missing columns {sorted(missing)}; expected a header path,pid,camid")
    col = {name: header.index(name) for name in ("path", "pid", "camid")}
    paths, pids, cams, lines = [], [], [], []
    for line_no, row in enumerate(rows, 2):
        if not row:
            continue
        where = f"{csv_path}:{line_no}"
        if len(row) != len(header):
            raise DatasetError(f"{len(row)} fields in a row", where=where,
                               expected=f"{len(header)} fields as in the header {','.join(header)}, got {row}")
        try:
            pid, cam = int(row[col["pid"]]), int(row[col["camid"]].strip().lstrip("cC"))
        except ValueError:
            raise DatasetError(f"{where}: pid and camid must be integers, got {row}") from None
        path = row[col["path"]].strip()
        if not path:
            raise DatasetError("empty path", where=where, expected="an image path")
        if not (os.path.isabs(path) or path.startswith("s3://")):
            path = resolve_under(root, path, where)
        paths.append(path)
        pids.append(check_id(pid, where))
        cams.append(check_id(cam, where, "camera"))
        lines.append(line_no)
    _check_listed_files(csv_path, paths, lines)
    return paths, pids, cams


def _check_listed_files(csv_path: str, paths: list[str], lines: list[int], show: int = 3) -> None:
    from .. import storage

    local = [p for p in paths if not p.startswith("s3://")]
    missing = set(storage.missing_files(local))
    if missing:
        listed = [f"line {n}: {p}" for p, n in zip(paths, lines, strict=True) if p in missing][:show]
        more = f" and {len(missing) - show} more" if len(missing) > show else ""
        raise DatasetError(f"{len(missing)} listed image(s) do not exist ({'; '.join(listed)}{more})",
                           where=csv_path, expected="every listed path to be an image file")


def load_folder(root: str, **_) -> ReidDataset:
    """A user's own dataset in one of two simple layouts.

    Folders (image names start with the camera, ``c3_`` or ``3_``, then anything)::

        <root>/train/<pid>/<cam>_<anything>.jpg
        <root>/query/<pid>/<cam>_<anything>.jpg
        <root>/gallery/<pid>/<cam>_<anything>.jpg

    or CSV files ``<root>/train.csv``, ``<root>/query.csv``, ``<root>/gallery.csv`` with a header
    ``path,pid,camid`` (paths relative to ``root``, absolute, or ``s3://`` URIs). A split's CSV wins
    over its folder.

    pids are integers; ``-1`` marks junk images, which are dropped. Train ids are relabelled 0..N-1;
    query and gallery keep their ids (gallery ids absent from the query act as distractors). Camera
    labels may be 0- or 1-based or have gaps: all labels seen in the three splits are mapped to
    0..C-1 in sorted order.
    """
    raw = {}
    for split in FOLDER_SPLITS:
        csv_path, split_dir = os.path.join(root, f"{split}.csv"), os.path.join(root, split)
        if os.path.isfile(csv_path):
            raw[split] = _folder_from_csv(csv_path, root)
        elif os.path.isdir(split_dir):
            raw[split] = _folder_from_tree(split_dir)
        else:
            raise DatasetError(
                f"{root}: no {split}/ folder and no {split}.csv; expected <root>/{split}/<pid>/<cam>_<name>.jpg "
                f"or a CSV with columns path,pid,camid"
            )
    cam_labels = sorted({c for _, _, cams in raw.values() for c in cams})
    cam_index = {c: i for i, c in enumerate(cam_labels)}
    tables = {}
    for split, (paths, pids, cams) in raw.items():
        keep = [i for i, p in enumerate(pids) if p != -1]  # junk
        tables[split] = make_table(
            [paths[i] for i in keep], [pids[i] for i in keep], [cam_index[cams[i]] for i in keep]
        )
    tables["train"], _ = relabel(tables["train"])
    require_nonempty("folder", root, tables)
    for split, table in tables.items():
        check_unique_paths(table, f"folder dataset {root}, {split} split")
    return ReidDataset(
        name="folder", root=os.path.abspath(root), extra={"camera_labels": cam_labels}, **tables
    )
