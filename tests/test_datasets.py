"""Dataset parsers on small fake trees in each dataset's real naming format.

Most trees hold zero-byte files: the parsers only read names, list files and .mat metadata. The
CUHK03 test writes a real MATLAB v7.3 (HDF5) ``cuhk-03.mat`` with h5py, and the corrupt-image tests
use real tiny JPEGs.
"""

from __future__ import annotations

import json
import os
import warnings

import h5py
import numpy as np
import pytest
from PIL import Image

from slsr_ray.data import DatasetError, check_images, load_dataset, make_table
from slsr_ray.data.datasets import load_cuhk03, load_viper
from slsr_ray.data.protocols import count_splits, get_protocol, load_protocol


def touch(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        open(os.path.join(folder, n), "wb").close()


def write_jpeg(path, seed=0, size=(8, 4)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def col(table, name):
    return table[name].to_pylist()


# ------------------------------------------------------------------------------------- Market / Duke


def make_market(root):
    top = os.path.join(root, "Market-1501-v15.09.15")
    touch(
        os.path.join(top, "bounding_box_train"),
        "0002_c1s1_000451_03.jpg",
        "0002_c3s1_000551_01.jpg",
        "0007_c2s3_070952_01.jpg",
        "0007_c6s1_001234_02.jpg",
        "1500_c5s3_000111_01.jpg",
        "Thumbs.db",  # not an image: ignored
    )
    touch(
        os.path.join(top, "query"),
        "0001_c1s1_001051_00.jpg",
        "0003_c2s1_000301_00.jpg",
        "0004_c6s2_000301_00.jpg",  # no gallery image of id 4: kept, the evaluator skips it
    )
    touch(
        os.path.join(top, "bounding_box_test"),
        "0001_c2s1_000076_01.jpg",
        "0003_c4s2_000301_02.jpg",
        "0000_c3s1_000010_01.jpg",  # distractors: kept in the gallery
        "0000_c6s2_000020_01.jpg",
        "-1_c1s1_000401_03.jpg",  # junk: dropped
        "-1_c5s1_000401_04.jpg",
    )
    return top


def test_market1501_counts_relabel_junk_distractors(tmp_path):
    top = make_market(tmp_path)
    ds = load_dataset("market1501", tmp_path)
    assert ds.root == top
    assert ds.train.num_rows == 5
    assert sorted(set(col(ds.train, "pid"))) == [0, 1, 2]  # 2, 7, 1500 relabelled in sorted order
    assert col(ds.train, "pid") == [0, 0, 1, 1, 2]
    assert col(ds.train, "camid") == [0, 2, 1, 5, 4]
    assert col(ds.query, "pid") == [1, 3, 4]  # dataset ids kept
    assert sorted(col(ds.gallery, "pid")) == [0, 0, 1, 3]  # distractors kept, junk dropped
    assert all(0 <= c <= 5 for t in (ds.train, ds.query, ds.gallery) for c in col(t, "camid"))
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in col(ds.gallery, "path"))
    assert col(ds.train, "source") == ["real"] * 5 and col(ds.train, "cluster") == [-1] * 5
    assert ds.split_stats()[0] == {"split": "train", "ids": 3, "images": 5, "cameras": 5}


def test_query_pid_absent_from_gallery_is_kept(tmp_path):
    make_market(tmp_path)
    ds = load_dataset("market1501", tmp_path)
    gallery_pids = set(col(ds.gallery, "pid"))
    orphans = [p for p in col(ds.query, "pid") if p not in gallery_pids]
    assert orphans == [4]

    from slsr_ray import evaluate

    distmat = np.random.default_rng(0).random((ds.query.num_rows, ds.gallery.num_rows)).astype(np.float32)
    result = evaluate.evaluate_rank(
        distmat,
        ds.query["pid"].to_numpy(),
        ds.gallery["pid"].to_numpy(),
        ds.query["camid"].to_numpy(),
        ds.gallery["camid"].to_numpy(),
        max_rank=4,
    )
    assert result["num_valid_queries"] == 2  # the query of id 4 is skipped, not an error


def test_market_multi_query_loads_gt_bbox_of_each_query_group(tmp_path):
    top = make_market(tmp_path)
    touch(
        os.path.join(top, "gt_bbox"),
        "0001_c1s1_001051_00.jpg",  # the query itself (Market's queries are gt_bbox boxes): not twice
        "0001_c1s1_001101_00.jpg",  # same id and camera as query 0001_c1: pooled with it
        "0001_c1s2_002000_00.jpg",
        "0001_c2s1_000090_00.jpg",  # id 1 has no query in camera 2: unused
        "0003_c2s1_000350_00.jpg",  # query 0003_c2
        "0002_c1s1_000451_00.jpg",  # a training id
    )
    ds = load_protocol("market1501", tmp_path, "multi_query")
    assert ds.extra["protocol"] == "multi_query"
    names = sorted(os.path.basename(p) for p in col(ds.multi_query, "path"))
    assert names == ["0001_c1s1_001101_00.jpg", "0001_c1s2_002000_00.jpg", "0003_c2s1_000350_00.jpg"]
    groups = zip(col(ds.multi_query, "pid"), col(ds.multi_query, "camid"), strict=True)
    assert sorted(groups) == [(1, 0), (1, 0), (3, 1)]
    assert load_protocol("market1501", tmp_path, "single_query").multi_query is None

    os.rename(os.path.join(top, "gt_bbox"), os.path.join(top, "gt_bbox_moved"))
    with pytest.raises(DatasetError, match="gt_bbox.*does not exist.*single_query"):
        load_protocol("market1501", tmp_path, "multi_query")
    with pytest.raises(DatasetError, match="protocol 'classic' is not defined for dataset 'market1501'"):
        load_protocol("market1501", tmp_path, "classic")


def test_market_root_can_be_the_dataset_folder_itself(tmp_path):
    top = make_market(tmp_path)
    assert load_dataset("market1501", top).train.num_rows == 5


def test_dukemtmcreid(tmp_path):
    top = os.path.join(tmp_path, "DukeMTMC-reID")
    touch(
        os.path.join(top, "bounding_box_train"),
        "0005_c2_f0046985.jpg",
        "0005_c5_f0051341.jpg",
        "0008_c8_f0000110.jpg",
        "0008_c1_f0045601.jpg",
    )
    touch(os.path.join(top, "query"), "0006_c1_f0046983.jpg", "0011_c7_f0005467.jpg")
    touch(
        os.path.join(top, "bounding_box_test"),
        "0006_c2_f0046997.jpg",
        "0011_c3_f0005419.jpg",
        "0093_c7_f0007810.jpg",  # gallery-only identity: a distractor in Duke
    )
    ds = load_dataset("dukemtmcreid", tmp_path)
    assert col(ds.train, "pid") == [0, 0, 1, 1]
    assert col(ds.train, "camid") == [1, 4, 0, 7]  # files in sorted name order
    assert col(ds.query, "pid") == [6, 11]
    assert sorted(col(ds.gallery, "pid")) == [6, 11, 93]
    assert max(col(ds.train, "camid")) == 7


def test_market_camera_out_of_range(tmp_path):
    top = make_market(tmp_path)
    touch(os.path.join(top, "query"), "0009_c7s1_000001_00.jpg")
    with pytest.raises(DatasetError, match=r"camera 7 out of range 1\.\.6.*0009_c7s1"):
        load_dataset("market1501", tmp_path)


# ---------------------------------------------------------------------------------------------- MSMT17


def make_msmt(root, version="MSMT17_V1", train_dir="train", test_dir="test"):
    top = os.path.join(root, version)
    train = [
        ("0000/0000_000_01_0303morning_0015_0.jpg", 0),
        ("0000/0000_001_05_0303morning_0016_0.jpg", 0),
        ("0001/0001_000_15_0303noon_0001_1.jpg", 1),
        ("0002/0002_000_03_0303noon_0002_0.jpg", 2),
    ]
    val = [("0001/0001_003_07_0303noon_0010_1.jpg", 1), ("0003/0003_000_02_0303afternoon_0001_0.jpg", 3)]
    query = [("0000/0000_000_01_0303morning_0200_0.jpg", 0), ("0002/0002_001_11_0303noon_0300_0.jpg", 2)]
    gallery = [
        ("0000/0000_003_04_0303morning_0210_0.jpg", 0),
        ("0001/0001_000_09_0303noon_0220_0.jpg", 1),
        ("0002/0002_005_12_0303noon_0310_0.jpg", 2),
    ]
    for name, items, folder in (
        ("train", train, train_dir),
        ("val", val, train_dir),
        ("query", query, test_dir),
        ("gallery", gallery, test_dir),
    ):
        for rel, _ in items:
            touch(os.path.join(top, folder, os.path.dirname(rel)), os.path.basename(rel))
        with open(os.path.join(top, f"list_{name}.txt"), "w") as f:
            f.writelines(f"{rel} {pid}\n" for rel, pid in items)
    return top


def test_msmt17_v1(tmp_path):
    top = make_msmt(tmp_path)
    ds = load_dataset("msmt17", tmp_path)
    assert ds.root == top
    assert ds.train.num_rows == 6  # train + val, as the published 32,621-image training set
    assert sorted(set(col(ds.train, "pid"))) == [0, 1, 2, 3]
    assert col(ds.train, "camid") == [0, 4, 14, 2, 6, 1]
    assert col(ds.query, "pid") == [0, 2] and col(ds.query, "camid") == [0, 10]
    assert col(ds.gallery, "pid") == [0, 1, 2]  # id 1 is in the gallery only
    assert col(ds.gallery, "path")[0] == os.path.join(
        top, "test", "0000", "0000_003_04_0303morning_0210_0.jpg"
    )
    only_train = load_dataset("msmt17", tmp_path, combine_val=False)
    assert only_train.train.num_rows == 4 and only_train.num_train_pids == 3


def test_msmt17_v2_folder_names(tmp_path):
    make_msmt(tmp_path / "msmt17", "MSMT17_V2", "mask_train_v2", "mask_test_v2")
    ds = load_dataset("msmt17", tmp_path)
    assert (ds.train.num_rows, ds.query.num_rows, ds.gallery.num_rows) == (6, 2, 3)
    assert "mask_test_v2" in col(ds.query, "path")[0]


def test_msmt17_bad_list_line_and_file_name(tmp_path):
    top = make_msmt(tmp_path)
    with open(os.path.join(top, "list_query.txt"), "a") as f:
        f.write("0005/0005_000_01_x.jpg five\n")
    with pytest.raises(DatasetError, match=r"list_query\.txt:3: expected '<relative path> <pid>'"):
        load_dataset("msmt17", tmp_path)
    top = make_msmt(tmp_path / "b")
    with open(os.path.join(top, "list_gallery.txt"), "a") as f:
        f.write("0005/badname.jpg 5\n")
    with pytest.raises(DatasetError, match=r"list_gallery\.txt:4: cannot parse a camera.*badname"):
        load_dataset("msmt17", tmp_path / "b")


def test_msmt17_list_not_matching_images(tmp_path):
    top = make_msmt(tmp_path)
    os.remove(os.path.join(top, "test", "0000", "0000_000_01_0303morning_0200_0.jpg"))
    with pytest.raises(DatasetError, match="which does not exist"):
        load_dataset("msmt17", tmp_path)


# ----------------------------------------------------------------------------------------------- VIPeR

VIPER_IDS = [0, 1, 2, 5, 7, 9, 12, 13]


def make_viper(root):
    top = os.path.join(root, "VIPeR")
    touch(os.path.join(top, "cam_a"), *[f"{i:03d}_{[0, 45, 90][i % 3]}.bmp" for i in VIPER_IDS])
    touch(os.path.join(top, "cam_b"), *[f"{i:03d}_{[90, 180, 0][i % 3]}.bmp" for i in VIPER_IDS])
    return top


def test_viper_half_splits(tmp_path):
    top = make_viper(tmp_path)
    ds = load_dataset("viper", tmp_path, split_id=0, seed=3)
    assert ds.train.num_rows == 8 and ds.num_train_pids == 4
    assert sorted(col(ds.train, "camid")) == [0] * 4 + [1] * 4
    q, g = col(ds.query, "pid"), col(ds.gallery, "pid")
    assert q == g and len(q) == 4 and set(q) <= set(VIPER_IDS)  # dataset ids kept
    assert set(col(ds.query, "camid")) == {0} and set(col(ds.gallery, "camid")) == {1}
    train_files = {os.path.basename(p)[:3] for p in col(ds.train, "path")}
    assert not train_files & {f"{p:03d}" for p in q}  # train and test ids are disjoint
    # each train id has exactly one image per camera
    pairs = {}
    for pid, cam in zip(col(ds.train, "pid"), col(ds.train, "camid"), strict=True):
        pairs.setdefault(pid, []).append(cam)
    assert all(sorted(c) == [0, 1] for c in pairs.values())

    with open(os.path.join(top, "splits.json")) as f:
        saved = json.load(f)
    assert saved["seed"] == 3 and len(saved["splits"]) == 10
    assert sorted(saved["splits"][0]["test"]) == sorted(q)
    tests = {tuple(load_viper(str(tmp_path), split_id=i, seed=3).query["pid"].to_pylist()) for i in range(10)}
    assert len(tests) > 1  # ten different random halves


def test_viper_trials_test_on_exactly_the_ids_their_split_did_not_train_on(tmp_path):
    """Each of the ten trials trains on one half and tests on the other; the evaluation halves of
    evaluate.random_half_splits for the same seed are exactly those non-training ids."""
    from slsr_ray.evaluate import random_half_splits

    make_viper(tmp_path)
    protocol = get_protocol("viper", "ten_trials")
    assert count_splits("viper", str(tmp_path), protocol) == protocol.trials == 10
    halves = random_half_splits(VIPER_IDS, trials=10, seed=5)
    tests = []
    for i in range(10):
        ds = load_protocol("viper", tmp_path, "ten_trials", split_id=i, split_seed=5)
        train_ids = {int(os.path.basename(p)[:3]) for p in col(ds.train, "path")}
        test_ids = set(col(ds.query, "pid"))
        assert not train_ids & test_ids and train_ids | test_ids == set(VIPER_IDS)
        assert len(train_ids) == len(test_ids) == 4
        assert sorted(test_ids) == halves[i].tolist()
        tests.append(tuple(sorted(test_ids)))
    assert len(set(tests)) > 1
    with pytest.raises(DatasetError, match=r"split_id 10 is out of range .* use 0\.\.9"):
        load_protocol("viper", tmp_path, "ten_trials", split_id=10)


def test_viper_deterministic_for_seed_without_saved_file(tmp_path):
    make_viper(tmp_path / "a")
    make_viper(tmp_path / "b")
    # a folder where splits.json cannot be written keeps the splits in memory
    os.makedirs(tmp_path / "b" / "VIPeR" / "splits.json")
    a = load_viper(str(tmp_path / "a"), split_id=4, seed=11)
    b = load_viper(str(tmp_path / "b"), split_id=4, seed=11)
    assert col(a.query, "pid") == col(b.query, "pid")
    assert sorted(col(a.train, "path"))[0].endswith(sorted(col(b.train, "path"))[0].split("VIPeR")[-1])
    other = [col(load_viper(str(tmp_path / "b"), split_id=i, seed=12).query, "pid") for i in range(10)]
    mine = [col(load_viper(str(tmp_path / "b"), split_id=i, seed=11).query, "pid") for i in range(10)]
    assert other != mine


def test_viper_errors(tmp_path):
    top = make_viper(tmp_path)
    with pytest.raises(DatasetError, match=r"split_id must be in 0\.\.9"):
        load_dataset("viper", tmp_path, split_id=10)
    os.remove(os.path.join(top, "cam_b", "012_90.bmp"))
    with pytest.raises(DatasetError, match=r"only in cam_a: \[12\]"):
        load_dataset("viper", tmp_path)
    touch(os.path.join(top, "cam_b"), "012_90.bmp", "img_0.bmp")
    with pytest.raises(DatasetError, match="cannot parse file name.*img_0.bmp"):
        load_dataset("viper", tmp_path)


# ---------------------------------------------------------------------------------------------- CUHK03

# ids per camera pair and the cells (image index 0..9) that hold an image; the rest are empty cells
CUHK_PAIRS = [3, 2, 2, 2, 2]


def _cuhk_cells(pair, pid):
    # views 1 (cells 0-4) and 2 (cells 5-9); vary the count like the real data (some have 3 per view)
    n = 2 + (pair + pid) % 2
    return list(range(n)) + list(range(5, 5 + n))


def make_cuhk03_mat(root, testsets):
    """A cuhk-03.mat with the real MATLAB v7.3 structure: cell arrays of object references."""
    top = os.path.join(root, "cuhk03")
    os.makedirs(os.path.join(top, "cuhk03_release"), exist_ok=True)
    path = os.path.join(top, "cuhk03_release", "cuhk-03.mat")
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        counter = 0

        def store(arr, empty=False):
            nonlocal counter
            counter += 1
            ds = refs.create_dataset(f"r{counter}", data=arr)
            if empty:
                ds.attrs["MATLAB_empty"] = np.uint8(1)
            return ds.ref

        for kind, size in (("labeled", (12, 6)), ("detected", (10, 6))):
            pair_refs = np.empty((1, len(CUHK_PAIRS)), dtype=object)
            for c, n_ids in enumerate(CUHK_PAIRS):
                cells = np.empty((10, n_ids), dtype=object)  # MATLAB (n_ids, 10), stored transposed
                for pid in range(n_ids):
                    for img in range(10):
                        if img in _cuhk_cells(c, pid):
                            hwc = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
                            cells[img, pid] = store(hwc.T)  # MATLAB HxWx3 is stored as 3xWxH
                        else:
                            cells[img, pid] = store(np.zeros(2, dtype=np.uint64), empty=True)
                pair_refs[0, c] = refs.create_dataset(f"{kind}{c}", data=cells, dtype=h5py.ref_dtype).ref
            f.create_dataset(kind, data=pair_refs, dtype=h5py.ref_dtype)
        test_refs = np.empty((1, len(testsets)), dtype=object)
        for i, pairs in enumerate(testsets):
            test_refs[0, i] = store(np.asarray(pairs, dtype=np.float64).T)  # MATLAB (n, 2): [pair, pid]
        f.create_dataset("testsets", data=test_refs, dtype=h5py.ref_dtype)
    return top


def _cuhk_names():
    names = []
    for c, n_ids in enumerate(CUHK_PAIRS):
        for pid in range(n_ids):
            for img in _cuhk_cells(c, pid):
                names.append(f"{c + 1}_{pid + 1:03d}_{1 if img < 5 else 2}_{img + 1:02d}.png")
    return sorted(names)


def test_cuhk03_classic_split_extracts_images_once(tmp_path):
    testsets = [[[1, 2], [3, 1]], [[2, 2], [5, 1]]]
    top = make_cuhk03_mat(tmp_path, testsets)
    ds = load_dataset("cuhk03", tmp_path, cuhk03_labeled=True, cuhk03_classic_split=True, split_id=1)
    image_dir = os.path.join(top, "images_labeled")
    assert sorted(n for n in os.listdir(image_dir) if n.endswith(".png")) == _cuhk_names()
    img = Image.open(os.path.join(image_dir, "1_001_2_06.png"))
    assert img.size == (6, 12)  # width, height: the transposed storage was undone
    assert not os.path.exists(os.path.join(top, "images_detected"))  # only the asked-for type

    total_ids = sum(CUHK_PAIRS)
    assert ds.num_train_pids == total_ids - 2
    assert sorted(set(col(ds.train, "pid"))) == list(range(total_ids - 2))
    assert col(ds.query, "path") == col(ds.gallery, "path")  # torchreid: query = gallery = test images
    # pair 2 pid 2 is global id 3 + 2 = 5; pair 5 pid 1 is 3 + 2 + 2 + 2 + 1 = 10
    assert sorted(set(col(ds.query, "pid"))) == [5, 10]
    assert set(col(ds.query, "camid")) == {0, 1}
    test_images = [n for n in _cuhk_names() if n.startswith(("2_002_", "5_001_"))]
    assert sorted(os.path.basename(p) for p in col(ds.query, "path")) == test_images
    assert ds.train.num_rows + ds.query.num_rows == len(_cuhk_names())

    # a second load reuses the extracted PNGs
    before = os.path.getmtime(os.path.join(image_dir, "1_001_1_01.png"))
    again = load_cuhk03(str(tmp_path), split_id=0, cuhk03_labeled=True, cuhk03_classic_split=True)
    assert os.path.getmtime(os.path.join(image_dir, "1_001_1_01.png")) == before
    assert sorted(set(col(again.query, "pid"))) == [2, 6]

    with pytest.raises(DatasetError, match=r"classic split_id must be in 0\.\.1"):
        load_cuhk03(str(tmp_path), split_id=2, cuhk03_labeled=True, cuhk03_classic_split=True)


def test_cuhk03_classic_protocol_trials_split_sizes_and_disjoint_ids(tmp_path):
    """The classic protocol: as many trials as the mat's testsets (20 in the release), each training on
    every id but its split's test ids, with query = gallery = the test ids' images (single-shot)."""
    testsets = [[[1, 2], [3, 1]], [[2, 2], [5, 1]], [[1, 1], [1, 3], [4, 2]]]
    make_cuhk03_mat(tmp_path, testsets)
    protocol = get_protocol("cuhk03", "classic")
    assert get_protocol("cuhk03") == protocol and (protocol.trials, protocol.evaluation) == (20, "single_shot")
    assert count_splits("cuhk03", str(tmp_path), protocol) == 3
    total_ids = sum(CUHK_PAIRS)
    offset = [0, 3, 5, 7, 9]  # global id = ids of earlier pairs + pid in the pair
    for i, pairs in enumerate(testsets):
        ds = load_protocol("cuhk03", tmp_path, "classic", split_id=i)
        assert ds.extra["classic_split"] and not ds.extra["labeled"] and ds.extra["protocol"] == "classic"
        assert ds.num_train_pids == total_ids - len(pairs)
        assert sorted(set(col(ds.query, "pid"))) == sorted(offset[c - 1] + p for c, p in pairs)
        assert col(ds.query, "path") == col(ds.gallery, "path")
        train_pairs = {os.path.basename(p)[:5] for p in col(ds.train, "path")}
        test_pairs = {f"{c}_{p:03d}" for c, p in pairs}
        assert not train_pairs & test_pairs and len(train_pairs) == total_ids - len(pairs)
    with pytest.raises(DatasetError, match=r"classic split_id must be in 0\.\.2"):
        load_protocol("cuhk03", tmp_path, "classic", split_id=3)
    with pytest.raises(DatasetError, match="split_id 20 is out of range for cuhk03 protocol classic"):
        load_protocol("cuhk03", tmp_path, "classic", split_id=20)
    assert count_splits("cuhk03", str(tmp_path), get_protocol("cuhk03", "new_767_700")) == 1


def test_cuhk03_new_protocol_from_mat_and_json(tmp_path):
    from scipy.io import savemat

    top = make_cuhk03_mat(tmp_path, [[[1, 1]]])
    names = _cuhk_names()
    keys = sorted({tuple(n.split("_")[:2]) for n in names})
    label = {k: i + 1 for i, k in enumerate(keys)}
    labels = np.array([label[tuple(n.split("_")[:2])] for n in names], dtype=np.float64)
    train_ids = set(range(1, 8))  # 7 train ids, 4 test ids
    train_idx = [i + 1 for i, lab in enumerate(labels) if lab in train_ids]
    test = [i + 1 for i, lab in enumerate(labels) if lab not in train_ids]
    query_idx = [i for i in test if names[i - 1].split("_")[2] == "1"][::2]
    gallery_idx = [i for i in test if i not in query_idx]
    filelist = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        filelist[i, 0] = n
    cfg = {
        "train_idx": np.array(train_idx, dtype=np.int32)[:, None],
        "query_idx": np.array(query_idx, dtype=np.int32)[:, None],
        "gallery_idx": np.array(gallery_idx, dtype=np.int32)[:, None],
        "labels": labels[:, None],
        "filelist": filelist,
        "camId": np.array([int(n.split("_")[2]) for n in names], dtype=np.float64)[:, None],
    }
    savemat(os.path.join(top, "cuhk03_new_protocol_config_detected.mat"), cfg)
    ds = load_dataset("cuhk03", tmp_path)  # detected, 767/700 protocol by default
    assert ds.train.num_rows == len(train_idx) and ds.num_train_pids == 7
    assert sorted(set(col(ds.train, "pid"))) == list(range(7))
    assert ds.query.num_rows == len(query_idx) and ds.gallery.num_rows == len(gallery_idx)
    assert set(col(ds.query, "pid")) <= {8, 9, 10, 11} and set(col(ds.query, "camid")) == {0}
    assert all(os.path.isfile(p) and "images_detected" in p for p in col(ds.gallery, "path"))

    # torchreid's splits_new_labeled.json (absolute paths from another machine) works the same way
    split = {
        key: [
            [
                f"/elsewhere/cuhk03/images_labeled/{names[i - 1]}",
                int(labels[i - 1]),
                int(names[i - 1].split("_")[2]) - 1,
            ]
            for i in idx
        ]
        for key, idx in (("train", train_idx), ("query", query_idx), ("gallery", gallery_idx))
    }
    with open(os.path.join(top, "splits_new_labeled.json"), "w") as f:
        json.dump([split], f)
    lab = load_dataset("cuhk03", tmp_path, cuhk03_labeled=True)
    assert (lab.train.num_rows, lab.query.num_rows, lab.gallery.num_rows) == (
        len(train_idx),
        len(query_idx),
        len(gallery_idx),
    )
    assert col(lab.query, "pid") == col(ds.query, "pid")
    assert all(os.path.isfile(p) and "images_labeled" in p for p in col(lab.query, "path"))


def test_cuhk03_missing_protocol_files(tmp_path):
    make_cuhk03_mat(tmp_path, [[[1, 1]]])
    with pytest.raises(
        DatasetError, match=r"cuhk03_new_protocol_config_detected\.mat or .*splits_new_detected"
    ):
        load_dataset("cuhk03", tmp_path)


# ---------------------------------------------------------------------------------------------- folder


def test_folder_tree_layout(tmp_path):
    touch(tmp_path / "train" / "17", "c1_a.jpg", "c2_b.jpg")
    touch(tmp_path / "train" / "42", "c3_x.png")
    touch(tmp_path / "train" / "-1", "c1_junk.jpg")
    touch(tmp_path / "query" / "5", "c1_q.jpg")
    touch(tmp_path / "query" / "6", "c2_q.jpg")  # not in the gallery: kept
    touch(tmp_path / "gallery" / "5", "c3_g.jpg", "c2_g.jpg")
    touch(tmp_path / "gallery" / "99", "c1_other.jpg")
    ds = load_dataset("folder", tmp_path)
    assert col(ds.train, "pid") == [0, 0, 1]
    assert col(ds.train, "camid") == [0, 1, 2]  # c1..c3 -> 0..2
    assert col(ds.query, "pid") == [5, 6]
    assert sorted(col(ds.gallery, "pid")) == [5, 5, 99]
    assert ds.extra["camera_labels"] == [1, 2, 3]


def test_folder_csv_layout_and_plain_camera_numbers(tmp_path):
    touch(tmp_path / "imgs", "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    abs_d = os.path.join(tmp_path, "imgs", "d.jpg")
    (tmp_path / "train.csv").write_text("path,pid,camid\nimgs/a.jpg,3,0\nimgs/b.jpg,8,2\nimgs/c.jpg,-1,0\n")
    (tmp_path / "query.csv").write_text("path,pid,camid\nimgs/c.jpg,1,0\n")
    (tmp_path / "gallery.csv").write_text(f"path,pid,camid\n{abs_d},1,2\n")
    ds = load_dataset("folder", tmp_path)
    assert col(ds.train, "pid") == [0, 1] and col(ds.train, "camid") == [0, 1]
    assert col(ds.train, "path")[0] == os.path.join(tmp_path, "imgs", "a.jpg")
    assert col(ds.gallery, "path") == [abs_d] and col(ds.gallery, "camid") == [1]


def test_folder_errors(tmp_path):
    touch(tmp_path / "train" / "1", "c1_a.jpg")
    touch(tmp_path / "query" / "1", "c1_a.jpg")
    with pytest.raises(DatasetError, match=r"no gallery/ folder and no gallery\.csv"):
        load_dataset("folder", tmp_path)
    touch(tmp_path / "gallery" / "1", "front.jpg")
    with pytest.raises(DatasetError, match="cannot parse file name.*front.jpg"):
        load_dataset("folder", tmp_path)
    os.remove(tmp_path / "gallery" / "1" / "front.jpg")
    with pytest.raises(DatasetError, match="gallery split .* holds no images"):
        load_dataset("folder", tmp_path)
    touch(tmp_path / "gallery" / "bob", "c1_a.jpg")
    with pytest.raises(DatasetError, match="integer pid"):
        load_dataset("folder", tmp_path)
    (tmp_path / "train.csv").write_text("file,id,cam\nx.jpg,1,1\n")
    with pytest.raises(DatasetError, match=r"missing columns \['camid', 'path', 'pid'\]"):
        load_dataset("folder", tmp_path)


# ------------------------------------------------------------------------------------- shared bad input

ALL_REAL = ["market1501", "dukemtmcreid", "msmt17", "viper", "cuhk03", "folder"]


@pytest.mark.parametrize("name", ALL_REAL)
def test_missing_root(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=f"{missing}.* does not exist"):
        load_dataset(name, missing)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("market1501", "bounding_box_train"),
        ("dukemtmcreid", "bounding_box_train"),
        ("msmt17", "MSMT17_V1/ or MSMT17_V2/"),
        ("viper", "cam_a"),
        ("cuhk03", "cuhk03_release/cuhk-03.mat"),
        ("folder", "train"),
    ],
)
def test_wrong_layout(tmp_path, name, expected):
    touch(tmp_path / "images", "0001_c1s1_000151_01.jpg")  # images, but not where the dataset keeps them
    with pytest.raises(DatasetError, match=str(tmp_path)) as err:
        load_dataset(name, tmp_path)
    assert expected in str(err.value)


def test_unknown_dataset(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


def test_unparsable_market_name(tmp_path):
    top = make_market(tmp_path)
    touch(os.path.join(top, "bounding_box_test"), "person_12.jpg")
    with pytest.raises(DatasetError, match=r"cannot parse file name .*person_12\.jpg.*0002_c1s1_000451_03"):
        load_dataset("market1501", tmp_path)


def test_empty_splits(tmp_path):
    top = make_market(tmp_path)
    for n in os.listdir(os.path.join(top, "query")):
        os.remove(os.path.join(top, "query", n))
    with pytest.raises(DatasetError, match=f"query split under {top} holds no images"):
        load_dataset("market1501", tmp_path)
    # a split of junk only is empty too
    top = make_market(tmp_path / "junk")
    for n in os.listdir(os.path.join(top, "bounding_box_test")):
        os.remove(os.path.join(top, "bounding_box_test", n))
    touch(os.path.join(top, "bounding_box_test"), "-1_c1s1_000401_03.jpg")
    with pytest.raises(DatasetError, match="gallery split .* holds no images"):
        load_dataset("market1501", tmp_path / "junk")
    top = make_msmt(tmp_path / "msmt")
    open(os.path.join(top, "list_gallery.txt"), "w").close()
    with pytest.raises(DatasetError, match="msmt17: the gallery split .* holds no images"):
        load_dataset("msmt17", tmp_path / "msmt")


# --------------------------------------------------------------------------------- corrupt images


def make_images_with_bad_ones(folder):
    good = [os.path.join(folder, f"good{i}.jpg") for i in range(6)]
    for i, p in enumerate(good):
        write_jpeg(p, seed=i)
    empty = os.path.join(folder, "empty.jpg")
    open(empty, "wb").close()
    garbage = os.path.join(folder, "garbage.jpg")
    with open(garbage, "wb") as f:
        f.write(b"this is not a jpeg" * 10)
    truncated = os.path.join(folder, "truncated.jpg")
    with open(good[0], "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 3])
    missing = os.path.join(folder, "missing.jpg")
    return good, [empty, garbage, truncated, missing]


def test_check_images_skip_and_raise(tmp_path):
    good, bad = make_images_with_bad_ones(str(tmp_path))
    paths = good[:3] + bad + good[3:]
    table = make_table(paths, list(range(len(paths))), [0] * len(paths))
    with pytest.warns(UserWarning, match="skipping 4 of 10 unreadable images"):
        kept, num_bad = check_images(table, on_error="skip", num_threads=4)
    assert num_bad == 4
    assert col(kept, "path") == good
    assert col(kept, "pid") == [0, 1, 2, 7, 8, 9]

    with pytest.raises(DatasetError, match="4 of 10 images cannot be read") as err:
        check_images(table, on_error="raise", max_listed=2)
    msg = str(err.value)
    assert "empty.jpg" in msg and "garbage.jpg" in msg and "and 2 more" in msg and "missing.jpg" not in msg

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same, zero = check_images(make_table(good, [1] * 6, [0] * 6), on_error="skip")
    assert zero == 0 and same.num_rows == 6
    with pytest.raises(ValueError, match="on_error must be"):
        check_images(table, on_error="ignore")


def test_load_dataset_on_bad_images(tmp_path):
    top = os.path.join(tmp_path, "Market-1501")
    for i, name in enumerate(
        ["0002_c1s1_000451_03.jpg", "0002_c2s1_000452_03.jpg", "0005_c1s1_000453_03.jpg"]
    ):
        write_jpeg(os.path.join(top, "bounding_box_train", name), seed=i)
    write_jpeg(os.path.join(top, "query", "0001_c1s1_000001_00.jpg"), seed=5)
    write_jpeg(os.path.join(top, "bounding_box_test", "0001_c2s1_000002_00.jpg"), seed=6)
    write_jpeg(os.path.join(top, "bounding_box_test", "0003_c2s1_000003_00.jpg"), seed=7)
    # identity 2 becomes unreadable: the train split must be relabelled without a hole
    for name in ["0002_c1s1_000451_03.jpg", "0002_c2s1_000452_03.jpg"]:
        open(os.path.join(top, "bounding_box_train", name), "wb").close()
    assert load_dataset("market1501", tmp_path).train.num_rows == 3  # names only by default
    with pytest.raises(DatasetError, match="2 of 3 images cannot be read"):
        load_dataset("market1501", tmp_path, on_bad_images="raise")
    with pytest.warns(UserWarning, match="skipping 2 of 3"):
        ds = load_dataset("market1501", tmp_path, on_bad_images="skip")
    assert col(ds.train, "pid") == [0] and ds.extra["bad_train_images"] == 2
    assert ds.gallery.num_rows == 2
