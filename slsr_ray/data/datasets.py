"""Parsers for the public re-id datasets, following torchreid's conventions for counts and ids.

Each parser takes the dataset root (the folder that holds the dataset's own top folder, or that top
folder itself) and returns a :class:`~slsr_ray.data.base.ReidDataset`: train ids relabelled 0..N-1,
query/gallery keeping the dataset's ids, junk dropped, distractors kept in the gallery, zero-based
cameras. A query id without a gallery match is kept (the evaluator skips it).

============== ================================================== ====================================
parser         expects                                            protocol options
============== ================================================== ====================================
market1501     bounding_box_train/, query/, bounding_box_test/
dukemtmcreid   the same folders, ``0005_c2_f0046985.jpg`` names
msmt17         MSMT17_V1|V2/ with list_{train,val,query,gallery}  ``combine_val`` (default True)
viper          VIPeR/cam_a/*.bmp, VIPeR/cam_b/*.bmp               ``split_id`` 0..9, ``seed``
cuhk03         cuhk03_release/cuhk-03.mat (+ 767/700 config)      ``split_id``, ``cuhk03_labeled``,
                                                                  ``cuhk03_classic_split``
folder         see :func:`load_folder`
============== ================================================== ====================================
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import warnings

import numpy as np

from .base import (
    DatasetError,
    ReidDataset,
    check_id,
    check_unique_paths,
    make_table,
    relabel,
    require_dir,
    resolve_under,
)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)")


def _find_top(root: str, candidates: tuple[str, ...], marker: str) -> str:
    """The dataset folder: ``root`` itself when it holds ``marker``, else ``root/<candidate>``."""
    if os.path.isdir(os.path.join(root, marker)):
        return root
    for c in candidates:
        if os.path.isdir(os.path.join(root, c, marker)):
            return os.path.join(root, c)
    raise DatasetError(
        f"{root} does not look like this dataset: expected a '{marker}' folder in it "
        f"or in one of {list(candidates)}"
    )


def _list_images(folder: str) -> list[str]:
    """Image files of ``folder`` by extension; a dangling symlink is not an image (warned about)."""
    named = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_EXTS))
    images = [p for p in named if os.path.isfile(p)]
    if len(images) < len(named):
        broken = [p for p in named if not os.path.isfile(p)]
        warnings.warn(f"{folder}: skipping {len(broken)} image name(s) that are not files (dangling symlinks?): "
                      + ", ".join(os.path.basename(p) for p in broken[:5]), stacklevel=2)
    return images


def parse_market_style(folder: str, *, relabel_ids: bool, drop_distractors: bool, max_cam: int):
    """Parse ``<pid>_c<cam>...`` file names (Market-1501, DukeMTMC-reID and the synthetic set).

    Junk images (pid -1) are dropped; distractors (pid 0) are kept unless ``drop_distractors``.
    """
    require_dir(folder, "a folder of <pid>_c<cam>*.jpg images")
    paths, pids, camids = [], [], []
    for p in _list_images(folder):
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
    top = _find_top(root, candidates, "bounding_box_train")
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


def _require_nonempty(name: str, where: str, splits: dict) -> None:
    for split, t in splits.items():
        if t.num_rows == 0:
            raise DatasetError(f"{name}: the {split} split under {where} holds no images")


# ---------------------------------------------------------------------------------------------- MSMT17

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
    _require_nonempty("msmt17", top, {"train": train, "query": query, "gallery": gallery})
    return ReidDataset(name="msmt17", root=top, train=train, query=query, gallery=gallery)


# ----------------------------------------------------------------------------------------------- VIPeR

VIPER_NUM_SPLITS = 10
_VIPER_SPLITS_FORMAT = "slsr-viper-splits-v1"


def _viper_images(folder: str) -> dict[int, str]:
    require_dir(folder, "VIPeR camera folder of <pid>_<angle>.bmp images")
    out: dict[int, str] = {}
    for p in _list_images(folder):
        head = os.path.basename(p).split("_")[0]
        if not head.isdigit():
            raise DatasetError(f"cannot parse file name {p!r}: expected '<pid>_<angle>.bmp' as in 001_45.bmp")
        pid = int(head)
        if pid in out:
            raise DatasetError(f"{folder} holds two images of VIPeR id {pid}: {out[pid]} and {p}")
        out[pid] = p
    if not out:
        raise DatasetError(f"{folder} holds no images; expected <pid>_<angle>.bmp files")
    return out


def make_viper_splits(pids: list[int], seed: int = 0, num_splits: int = VIPER_NUM_SPLITS) -> list[dict]:
    """``num_splits`` random halves of ``pids``: ``{"train": [...], "test": [...]}`` (floor half trains)."""
    rng = np.random.default_rng(seed)
    pids = sorted(pids)
    splits = []
    for _ in range(num_splits):
        order = rng.permutation(len(pids))
        half = len(pids) // 2
        splits.append(
            {"train": sorted(pids[i] for i in order[:half]), "test": sorted(pids[i] for i in order[half:])}
        )
    return splits


def _viper_splits(top: str, pids: list[int], seed: int) -> list[dict]:
    """The splits for ``seed``: read from ``splits.json`` when it was made with this seed and these ids,
    else made afresh and written there when the folder is writable (else kept in memory)."""
    path = os.path.join(top, "splits.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
        if (
            isinstance(saved, dict)
            and saved.get("format") == _VIPER_SPLITS_FORMAT
            and saved.get("seed") == seed
            and sorted(saved.get("pids", [])) == sorted(pids)
        ):
            return saved["splits"]
        # Another seed, another id set or torchreid's own file: leave it alone, use fresh splits.
        return make_viper_splits(pids, seed)
    splits = make_viper_splits(pids, seed)
    payload = {"format": _VIPER_SPLITS_FORMAT, "seed": seed, "pids": sorted(pids), "splits": splits}
    try:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only dataset folder: the splits are deterministic for the seed anyway
    return splits


def load_viper(root: str, split_id: int = 0, seed: int = 0, **_) -> ReidDataset:
    """VIPeR: 632 identities seen once by camera a and once by camera b.

    Ten random half splits (deterministic for ``seed``, saved to ``<VIPeR>/splits.json`` when the
    folder is writable): 316 train ids (both cameras, relabelled), 316 test ids with query = camera a
    and gallery = camera b, keeping the ids from the file names (``001_45.bmp`` is id 1). (torchreid
    also lists each split with the cameras swapped, as 20 split ids; the paper reports 10 trials.)
    """
    top = _find_top(root, ("VIPeR", "viper/VIPeR", "viper"), "cam_a")
    cam_a = _viper_images(os.path.join(top, "cam_a"))
    cam_b = _viper_images(os.path.join(top, "cam_b"))
    if set(cam_a) != set(cam_b):
        only_a, only_b = sorted(set(cam_a) - set(cam_b)), sorted(set(cam_b) - set(cam_a))
        raise DatasetError(
            f"VIPeR at {top}: every id needs one image in cam_a and one in cam_b; "
            f"only in cam_a: {only_a[:5]}, only in cam_b: {only_b[:5]}"
        )
    if len(cam_a) < 2:
        raise DatasetError(
            f"VIPeR at {top} has {len(cam_a)} identity; need at least 2 for a train/test split"
        )
    splits = _viper_splits(top, list(cam_a), seed)
    if not 0 <= split_id < len(splits):
        raise DatasetError(f"VIPeR split_id must be in 0..{len(splits) - 1}, got {split_id}")
    split = splits[split_id]
    train_pids = [p for p in split["train"] for _ in (0, 1)]
    train = make_table(
        [cam_a[p] if i % 2 == 0 else cam_b[p] for i, p in enumerate(train_pids)],
        train_pids,
        [i % 2 for i in range(len(train_pids))],
    )
    train, _ = relabel(train)
    test = split["test"]
    query = make_table([cam_a[p] for p in test], test, [0] * len(test))
    gallery = make_table([cam_b[p] for p in test], test, [1] * len(test))
    _require_nonempty("viper", top, {"train": train, "query": query, "gallery": gallery})
    return ReidDataset(
        name="viper",
        root=top,
        train=train,
        query=query,
        gallery=gallery,
        extra={"split_id": split_id, "seed": seed, "num_splits": len(splits)},
    )


# ---------------------------------------------------------------------------------------------- CUHK03

CUHK03_NUM_CLASSIC_SPLITS = 20
# torchreid's extracted-image names: {camera pair}_{pid in pair:03d}_{view 1|2}_{image 1..10:02d}.png
_CUHK03_NAME_RE = re.compile(r"^(\d)_(\d{3})_([12])_(\d{2})\.png$")
_EXTRACTED_MARKER = ".extracted"


def _cuhk03_parse_name(name: str, where: str) -> tuple[int, int, int]:
    """(camera pair 1..5, pid in the pair 1.., view 1..2) from a torchreid-style image name."""
    m = _CUHK03_NAME_RE.match(os.path.basename(name))
    if m is None:
        raise DatasetError(
            f"{where}: cannot parse CUHK03 image name {name!r}; expected "
            "'<pair>_<pid:03d>_<view>_<image:02d>.png' as in 1_001_1_01.png"
        )
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _cuhk03_extract(mat_path: str, image_type: str, out_dir: str) -> None:
    """Write every non-empty image cell of ``cuhk-03.mat``'s ``image_type`` array as a PNG, once.

    The .mat file is MATLAB v7.3 (HDF5): ``mat[image_type][0]`` holds one reference per camera
    pair, each to a (10, num_ids) array (MATLAB order, so transposed) of references to HxWx3 images
    stored as 3xWxH. Empty cells (people seen in fewer than 10 images) are skipped, as torchreid does.
    """
    import h5py
    from PIL import Image
    from tqdm.auto import tqdm

    if not os.path.isfile(mat_path):
        raise DatasetError(
            f"{mat_path} is missing: expected cuhk03_release/cuhk-03.mat to extract images from"
        )
    try:
        os.makedirs(out_dir, exist_ok=True)
        with h5py.File(mat_path, "r") as mat:
            if image_type not in mat:
                raise DatasetError(
                    f"{mat_path} has no '{image_type}' array; expected 'labeled' and 'detected'"
                )
            for campid, camp_ref in enumerate(mat[image_type][0]):
                camp = mat[camp_ref][:].T  # (num_ids, 10) references
                desc = f"cuhk03 {image_type} pair {campid + 1}"
                for pid in tqdm(range(camp.shape[0]), desc=desc, leave=False):
                    for imgid, ref in enumerate(camp[pid]):
                        ds = mat[ref]
                        if ds.ndim < 3 or ds.size == 0:
                            continue
                        viewid = 1 if imgid < 5 else 2
                        name = f"{campid + 1:01d}_{pid + 1:03d}_{viewid:01d}_{imgid + 1:02d}.png"
                        path = os.path.join(out_dir, name)
                        if os.path.isfile(path):
                            continue
                        tmp = path + ".tmp"
                        Image.fromarray(np.ascontiguousarray(ds[:].T)).save(tmp, format="PNG")
                        os.replace(tmp, path)
        with open(os.path.join(out_dir, _EXTRACTED_MARKER), "w") as f:
            f.write("done\n")
    except OSError as e:
        raise DatasetError(
            f"cannot extract CUHK03 {image_type} images from {mat_path} to {out_dir}: {e}"
        ) from e


def _cuhk03_images(top: str, image_type: str) -> str:
    out_dir = os.path.join(top, f"images_{image_type}")
    if not os.path.isfile(os.path.join(out_dir, _EXTRACTED_MARKER)):
        _cuhk03_extract(os.path.join(top, "cuhk03_release", "cuhk-03.mat"), image_type, out_dir)
    return out_dir


def cuhk03_classic_split_count(root: str) -> int:
    """How many classic (1367/100) splits the ``cuhk-03.mat`` under ``root`` defines (20 in the release)."""
    import h5py

    top = _find_top(root, ("cuhk03", "CUHK03"), "cuhk03_release")
    mat_path = os.path.join(top, "cuhk03_release", "cuhk-03.mat")
    if not os.path.isfile(mat_path):
        raise DatasetError(f"{mat_path} is missing: the classic CUHK03 splits come from its 'testsets'")
    try:
        with h5py.File(mat_path, "r") as mat:
            return len(mat["testsets"][0]) if "testsets" in mat else 0
    except OSError as e:
        raise DatasetError(f"cannot read {mat_path} as a MATLAB v7.3 file: {e}") from e


def _cuhk03_classic(top: str, image_dir: str, split_id: int):
    """The 1367/100 protocol: the split's 100 test ids are query and gallery, the rest train."""
    import h5py

    mat_path = os.path.join(top, "cuhk03_release", "cuhk-03.mat")
    if not os.path.isfile(mat_path):
        raise DatasetError(f"{mat_path} is missing: the classic CUHK03 splits come from its 'testsets'")
    with h5py.File(mat_path, "r") as mat:
        refs = mat["testsets"][0] if "testsets" in mat else []
        if not 0 <= split_id < len(refs):
            raise DatasetError(f"CUHK03 classic split_id must be in 0..{len(refs) - 1}, got {split_id}")
        test_pairs = {(int(c), int(p)) for c, p in mat[refs[split_id]][:].T}
    images = sorted(p for p in os.listdir(image_dir) if p.endswith(".png"))
    parsed = [(os.path.join(image_dir, n), *_cuhk03_parse_name(n, image_dir)) for n in images]
    # One global id per (pair, pid), 1-based in (pair, pid) order, as the 767/700 protocol's labels.
    keys = sorted({(c, p) for _, c, p, _ in parsed})
    global_id = {k: i + 1 for i, k in enumerate(keys)}
    rows = {"train": ([], [], []), "test": ([], [], [])}
    for path, c, p, view in parsed:
        paths, pids, camids = rows["test" if (c, p) in test_pairs else "train"]
        paths.append(path)
        pids.append(global_id[(c, p)])
        camids.append(view - 1)  # torchreid: the camera is the view within the pair
    train, _ = relabel(make_table(*rows["train"]))
    test = make_table(*rows["test"])
    return train, test, test  # torchreid: query and gallery are the same test images


def _cuhk03_new_from_mat(mat_path: str, image_dir: str):
    from scipy.io import loadmat

    try:
        cfg = loadmat(mat_path)
    except Exception as e:  # scipy raises several types for a bad file
        raise DatasetError(f"cannot read CUHK03 protocol file {mat_path}: {e}") from e
    missing = [k for k in ("train_idx", "query_idx", "gallery_idx", "labels", "filelist") if k not in cfg]
    if missing:
        raise DatasetError(f"{mat_path} lacks fields {missing}; expected the 767/700 protocol config")
    labels = cfg["labels"].flatten()
    filelist = cfg["filelist"].flatten()

    def subset(key: str) -> tuple[list[str], list[int], list[int]]:
        idx = cfg[key].flatten().astype(np.int64) - 1  # MATLAB indices are 1-based
        names = [str(np.asarray(filelist[i]).flatten()[0]) for i in idx]
        cams = [_cuhk03_parse_name(n, mat_path)[2] - 1 for n in names]
        return [os.path.join(image_dir, n) for n in names], [int(labels[i]) for i in idx], cams

    return subset("train_idx"), subset("query_idx"), subset("gallery_idx")


def _cuhk03_new_from_json(json_path: str, image_dir: str):
    try:
        with open(json_path) as f:
            split = json.load(f)[0]
        out = []
        for key in ("train", "query", "gallery"):
            items = split[key]
            out.append(
                (
                    [os.path.join(image_dir, os.path.basename(p)) for p, _, _ in items],
                    [int(pid) for _, pid, _ in items],
                    [int(cam) for _, _, cam in items],
                )
            )
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise DatasetError(
            f"cannot read {json_path}: expected torchreid's [{{'train': [[path, pid, camid], ...], "
            f"'query': ..., 'gallery': ...}}] ({e})"
        ) from e
    return tuple(out)


def load_cuhk03(
    root: str, split_id: int = 0, cuhk03_labeled: bool = False, cuhk03_classic_split: bool = False, **_
) -> ReidDataset:
    """CUHK03 from ``cuhk03_release/cuhk-03.mat``, labeled or detected boxes, two protocols.

    The images are extracted once to ``images_labeled/`` / ``images_detected/`` with torchreid's names
    (``1_001_1_01.png``: camera pair, pid in the pair, view, image). ``cuhk03_classic_split`` selects the
    1367/100 protocol (20 splits from the mat's ``testsets``; query = gallery = the 100 test ids' images,
    camera = view); otherwise the 767/700 protocol is read from
    ``cuhk03_new_protocol_config_{labeled,detected}.mat`` or torchreid's ``splits_new_{...}.json``
    (767 train ids / 7,368 labeled images; 1,400 queries; 5,328 gallery images).
    """
    image_type = "labeled" if cuhk03_labeled else "detected"
    try:
        top = _find_top(root, ("cuhk03", "CUHK03"), "cuhk03_release")
    except DatasetError:
        try:  # images extracted earlier (e.g. by torchreid) are enough for the 767/700 protocol
            top = _find_top(root, ("cuhk03", "CUHK03"), f"images_{image_type}")
        except DatasetError:
            raise DatasetError(
                f"{root} does not look like CUHK03: expected cuhk03_release/cuhk-03.mat (or extracted "
                f"images_{image_type}/) in it or in cuhk03/"
            ) from None
    if cuhk03_classic_split:
        image_dir = _cuhk03_images(top, image_type)
        train, query, gallery = _cuhk03_classic(top, image_dir, split_id)
    else:
        if split_id != 0:
            raise DatasetError(f"the CUHK03 767/700 protocol has one split (split_id 0), got {split_id}")
        mat_path = os.path.join(top, f"cuhk03_new_protocol_config_{image_type}.mat")
        json_path = os.path.join(top, f"splits_new_{image_type}.json")
        if os.path.isfile(mat_path):
            reader, source = _cuhk03_new_from_mat, mat_path
        elif os.path.isfile(json_path):
            reader, source = _cuhk03_new_from_json, json_path
        else:
            raise DatasetError(
                f"CUHK03 767/700 protocol needs {mat_path} or {json_path}; "
                "or pass cuhk03_classic_split=True for the 1367/100 protocol"
            )
        image_dir = os.path.join(top, f"images_{image_type}")
        if not os.path.isfile(os.path.join(image_dir, _EXTRACTED_MARKER)) and os.path.isfile(
            os.path.join(top, "cuhk03_release", "cuhk-03.mat")
        ):
            image_dir = _cuhk03_images(top, image_type)
        tr, qu, ga = reader(source, image_dir)
        if tr[0] and not os.path.exists(tr[0][0]):
            raise DatasetError(f"{source} lists {tr[0][0]}, which does not exist: extract the images first")
        train, _ = relabel(make_table(*tr))
        query, gallery = make_table(*qu), make_table(*ga)
    _require_nonempty("cuhk03", top, {"train": train, "query": query, "gallery": gallery})
    return ReidDataset(
        name="cuhk03",
        root=top,
        train=train,
        query=query,
        gallery=gallery,
        extra={"split_id": split_id, "labeled": cuhk03_labeled, "classic_split": cuhk03_classic_split},
    )


# ---------------------------------------------------------------------------------------------- folder

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
        for p in _list_images(pid_dir):
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
    _require_nonempty("folder", root, tables)
    for split, table in tables.items():
        check_unique_paths(table, f"folder dataset {root}, {split} split")
    return ReidDataset(
        name="folder", root=os.path.abspath(root), extra={"camera_labels": cam_labels}, **tables
    )
