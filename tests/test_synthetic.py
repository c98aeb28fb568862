"""The synthetic re-id generator: layout, naming, determinism, difficulty, and round trips through
``load_dataset`` and S3."""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from slsr_ray import storage
from slsr_ray.data import (
    DatasetError,
    load_dataset,
    make_synthetic,
    read_image,
    read_image_array,
    to_manifest,
)

MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s\d_\d{6}_\d{2}\.jpg$")
SPLIT_DIRS = ("bounding_box_train", "bounding_box_test", "query")


def tree_digest(root):
    h = hashlib.sha256()
    for split in SPLIT_DIRS:
        for name in sorted(os.listdir(os.path.join(root, split))):
            h.update(name.encode())
            with open(os.path.join(root, split, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


SMALL = dict(num_ids=6, cams=3, images_per_id=4, size=(32, 16), num_distractors=2, num_junk=2)


def test_deterministic_for_a_seed(tmp_path):
    make_synthetic(tmp_path / "a", seed=7, **SMALL)
    make_synthetic(tmp_path / "b", seed=7, **SMALL)
    make_synthetic(tmp_path / "c", seed=8, **SMALL)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_layout_and_naming(synthetic_root):
    with open(os.path.join(synthetic_root, "synthetic.json")) as f:
        summary = json.load(f)
    assert summary["num_ids"] == 24 and summary["cams"] == 4
    pids_by_split = {}
    for split in SPLIT_DIRS:
        names = os.listdir(os.path.join(synthetic_root, split))
        assert len(names) == summary["images"][split]
        for n in names:
            m = MARKET_NAME.match(n)
            assert m, f"{split}/{n} does not follow the Market-1501 naming"
            assert 1 <= int(m.group(2)) <= 4
        pids_by_split[split] = {int(MARKET_NAME.match(n).group(1)) for n in names}
    train, test = pids_by_split["bounding_box_train"], pids_by_split["bounding_box_test"]
    assert train == set(range(1, 13))  # first half of the ids train
    assert {0, -1} <= test  # distractors and junk in the gallery folder
    assert not train & (test | pids_by_split["query"])
    assert pids_by_split["query"] <= test  # every query id has gallery images
    img = read_image(
        os.path.join(synthetic_root, "query", sorted(os.listdir(os.path.join(synthetic_root, "query")))[0])
    )
    assert img.size == (64, 128) and img.mode == "RGB"


def test_roundtrip_through_load_dataset(synthetic_root, synthetic_dataset):
    ds = synthetic_dataset
    assert ds.num_train_pids == 12 and ds.train.num_rows == 12 * 8
    assert sorted(set(ds.train["pid"].to_pylist())) == list(range(12))
    assert -1 not in ds.gallery["pid"].to_pylist()  # junk dropped
    assert ds.gallery["pid"].to_pylist().count(0) == 6  # distractors kept
    assert set(ds.query["pid"].to_pylist()) == set(range(13, 25))
    assert set(ds.train["camid"].to_pylist()) <= {0, 1, 2, 3}
    # every query has a gallery image of its id in another camera (a valid match under Market rules)
    g = list(zip(ds.gallery["pid"].to_pylist(), ds.gallery["camid"].to_pylist(), strict=True))
    for pid, cam in zip(ds.query["pid"].to_pylist(), ds.query["camid"].to_pylist(), strict=True):
        assert any(gp == pid and gc != cam for gp, gc in g)
    same = load_dataset("synthetic", synthetic_root)
    assert same.name == "synthetic" and same.train.equals(ds.train)


def test_load_dataset_synthetic_builds_when_empty(tmp_path):
    ds = load_dataset("synthetic", tmp_path / "new", seed=3, **SMALL)
    assert ds.num_train_pids == 3 and ds.query.num_rows > 0


def test_gt_bbox_holds_each_query_and_more_of_its_id_and_camera(tmp_path):
    """gt_bbox/ (Market's multi-query boxes): per query, the query image itself under its own name and
    two new images of the same id in the same camera; nothing else in the tree changes."""
    summary = make_synthetic(tmp_path / "with", seed=7, **SMALL)
    make_synthetic(tmp_path / "without", seed=7, gt_bbox=False, **SMALL)
    assert tree_digest(tmp_path / "with") == tree_digest(tmp_path / "without")
    assert not os.path.exists(tmp_path / "without" / "gt_bbox")
    queries = sorted(os.listdir(tmp_path / "with" / "query"))
    boxes = sorted(os.listdir(tmp_path / "with" / "gt_bbox"))
    assert summary["images"]["gt_bbox"] == len(boxes) == 3 * len(queries)
    assert set(queries) <= set(boxes)
    for q in queries:
        with open(tmp_path / "with" / "query" / q, "rb") as a, open(tmp_path / "with" / "gt_bbox" / q, "rb") as b:
            assert a.read() == b.read()
    groups = {}
    for name in boxes:
        m = MARKET_NAME.match(name)
        groups.setdefault((m.group(1), m.group(2)), []).append(name)
    assert sorted(groups) == sorted((MARKET_NAME.match(q).group(1), MARKET_NAME.match(q).group(2)) for q in queries)
    assert all(len(v) == 3 for v in groups.values())
    ds = load_dataset("synthetic", tmp_path / "with", multi_query=True)
    assert ds.multi_query.num_rows == 2 * len(queries)  # the query images themselves are not repeated


def test_bad_arguments(tmp_path, synthetic_root):
    with pytest.raises(ValueError, match=r"\(cams\): expected 2\.\.9.*got 12"):
        make_synthetic(tmp_path, cams=12)
    with pytest.raises(DatasetError, match="overwrite=True"):
        make_synthetic(synthetic_root, num_ids=4)


def raw_pixel_rank1(ds) -> float:
    """Rank-1 of a nearest neighbour on mean-centred 64x32 pixels (cosine), Market-1501 rules."""

    def pixels(table):
        return np.stack(
            [read_image_array(p, size=(64, 32)).astype(np.float32).ravel() for p in table["path"].to_pylist()]
        )

    q, g = pixels(ds.query), pixels(ds.gallery)
    mean = np.concatenate([q, g]).mean(axis=0)
    q, g = q - mean, g - mean
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    q_pid, q_cam = ds.query["pid"].to_numpy(), ds.query["camid"].to_numpy()
    g_pid, g_cam = ds.gallery["pid"].to_numpy(), ds.gallery["camid"].to_numpy()
    hits = []
    for i in range(len(q_pid)):
        allowed = ~((g_pid == q_pid[i]) & (g_cam == q_cam[i]))  # same id, same camera: ignored
        if not np.any(allowed & (g_pid == q_pid[i])):
            continue
        hits.append(g_pid[np.argmax(np.where(allowed, sim[i], -np.inf))] == q_pid[i])
    return float(np.mean(hits))


def test_learnable_but_not_trivial(synthetic_dataset):
    # Measured: 0.24 on this 24-id fixture; 0.12 (seed 0), 0.13 (seed 1), 0.08 (seed 2) on the default
    # 100-id dataset. Chance is about 1/len(gallery ids) (< 0.05 here).
    rank1 = raw_pixel_rank1(synthetic_dataset)
    assert 0.08 <= rank1 <= 0.6, rank1


def test_roundtrip_through_s3(synthetic_root, synthetic_dataset, s3_bucket):
    fs, _ = storage.filesystem(s3_bucket)
    dest = f"{s3_bucket[len('s3://') :]}/datasets/synth"
    pafs.copy_files(synthetic_root, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    remote_root = f"{s3_bucket}/datasets/synth"
    assert storage.listdir(remote_root) == sorted([*SPLIT_DIRS, "gt_bbox", "synthetic.json"])

    # manifests point at the S3 copies and survive a parquet round trip on S3
    manifests = {}
    for split in ("train", "query", "gallery"):
        table = getattr(synthetic_dataset, split)
        remote_paths = [p.replace(synthetic_root, remote_root) for p in table["path"].to_pylist()]
        table = to_manifest(table.set_column(0, "path", pa.array(remote_paths)))
        storage.write_table(f"{s3_bucket}/run/manifest/{split}.parquet", table)
        manifests[split] = storage.read_table(f"{s3_bucket}/run/manifest/{split}.parquet")
        assert manifests[split].equals(table)
    assert manifests["train"]["pid"].to_pylist() == synthetic_dataset.train["pid"].to_pylist()

    # images read back from S3 decode to the same pixels as the local files
    for local, remote in list(
        zip(synthetic_dataset.query["path"].to_pylist(), manifests["query"]["path"].to_pylist(), strict=True)
    )[:5]:
        assert remote.startswith("s3://")
        np.testing.assert_array_equal(np.asarray(read_image(remote)), np.asarray(read_image(local)))
