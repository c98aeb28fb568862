"""CUHK03: ``cuhk-03.mat`` (classic 1,367/100 splits, 20 trials) and the 767/700 protocol."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from .base import (
    DatasetError,
    ReidDataset,
    make_table,
    relabel,
)
from .tree import find_top, require_nonempty

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

    top = find_top(root, ("cuhk03", "CUHK03"), "cuhk03_release")
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
        top = find_top(root, ("cuhk03", "CUHK03"), "cuhk03_release")
    except DatasetError:
        try:  # images extracted earlier (e.g. by torchreid) are enough for the 767/700 protocol
            top = find_top(root, ("cuhk03", "CUHK03"), f"images_{image_type}")
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
    require_nonempty("cuhk03", top, {"train": train, "query": query, "gallery": gallery})
    return ReidDataset(
        name="cuhk03",
        root=top,
        train=train,
        query=query,
        gallery=gallery,
        extra={"split_id": split_id, "labeled": cuhk03_labeled, "classic_split": cuhk03_classic_split},
    )
