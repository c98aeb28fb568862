"""Market-1501 and DukeMTMC-reID: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` (and
Market's ``gt_bbox/`` for multi-query), file names ``0002_c1s1_000451_03.jpg``."""

from __future__ import annotations

import os
import re

from .base import (
    DatasetError,
    ReidDataset,
    check_id,
    make_table,
    relabel,
    require_dir,
)
from .tree import find_top, list_images

_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)")


def parse_market_style(folder: str, *, relabel_ids: bool, drop_distractors: bool, max_cam: int):
    """Parse ``<pid>_c<cam>...`` file names (Market-1501, DukeMTMC-reID and the synthetic set).

    Junk images (pid -1) are dropped; distractors (pid 0) are kept unless ``drop_distractors``.
    """
    require_dir(folder, "a folder of <pid>_c<cam>*.jpg images")
    paths, pids, camids = [], [], []
    for p in list_images(folder):
        m = _MARKET_RE.match(os.path.basename(p))
        if m is None:
            raise DatasetError(
                f"cannot parse file name {p!r}: expected '<pid>_c<camera>...' as in 0002_c1s1_000451_03.jpg"
            )
        pid, cam = check_id(int(m.group(1)), p), int(m.group(2))
        if pid == -1:
            continue  # junk
        if pid == 0 and drop_distractors:
            continue
        if not 1 <= cam <= max_cam:
            raise DatasetError(f"camera {cam} out of range 1..{max_cam} in file name {p!r}")
        paths.append(p)
        pids.append(pid)
        camids.append(cam - 1)
    table = make_table(paths, pids, camids)
    if relabel_ids:
        table, _ = relabel(table)
    return table


def _market_like(name: str, root: str, candidates: tuple[str, ...], max_cam: int,
                 multi_query: bool = False) -> ReidDataset:
    top = find_top(root, candidates, "bounding_box_train")
    train = parse_market_style(
        os.path.join(top, "bounding_box_train"), relabel_ids=True, drop_distractors=True, max_cam=max_cam
    )
    query = parse_market_style(
        os.path.join(top, "query"), relabel_ids=False, drop_distractors=True, max_cam=max_cam
    )
    gallery = parse_market_style(
        os.path.join(top, "bounding_box_test"), relabel_ids=False, drop_distractors=False, max_cam=max_cam
    )
    for split, t in (("train", train), ("query", query), ("gallery", gallery)):
        if t.num_rows == 0:
            raise DatasetError(f"{name}: the {split} split under {top} holds no images")
    ds = ReidDataset(name=name, root=top, train=train, query=query, gallery=gallery)
    if multi_query:
        ds.multi_query = _market_multi_query(top, query, max_cam)
    return ds


def _market_multi_query(top: str, query, max_cam: int):
    """The ``gt_bbox/`` images that share a query's (id, camera), minus the query images themselves
    (Market's queries are hand-drawn boxes from ``gt_bbox/``: same file name), for multi-query pooling."""
    folder = os.path.join(top, "gt_bbox")
    if not os.path.isdir(folder):
        raise DatasetError(
            f"{folder} does not exist: the multi_query protocol pools each query's (id, camera) images from "
            "Market-1501's gt_bbox/ folder; use protocol single_query for a copy without it"
        )
    boxes = parse_market_style(folder, relabel_ids=False, drop_distractors=True, max_cam=max_cam)
    groups = set(zip(query["pid"].to_pylist(), query["camid"].to_pylist(), strict=True))
    query_names = {os.path.basename(p) for p in query["path"].to_pylist()}
    keep = [
        (p, pid, cam)
        for p, pid, cam in zip(boxes["path"].to_pylist(), boxes["pid"].to_pylist(), boxes["camid"].to_pylist(),
                               strict=True)
        if (pid, cam) in groups and os.path.basename(p) not in query_names
    ]
    return make_table([k[0] for k in keep], [k[1] for k in keep], [k[2] for k in keep])


def load_market1501(root: str, multi_query: bool = False, **_) -> ReidDataset:
    """Market-1501: 751 train ids / 12,936 images; 3,368 queries; 15,913 gallery images (torchreid).

    ``multi_query`` also loads ``gt_bbox/`` into ``ds.multi_query``: the extra images of each query's
    (id, camera) that the multi-query protocol pools with the query."""
    return _market_like("market1501", root, ("Market-1501-v15.09.15", "market1501", "Market-1501"), max_cam=6,
                        multi_query=multi_query)


def load_dukemtmcreid(root: str, **_) -> ReidDataset:
    """DukeMTMC-reID: 702 train ids / 16,522 images; 2,228 queries; 17,661 gallery images."""
    return _market_like("dukemtmcreid", root, ("DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID"), max_cam=8)
