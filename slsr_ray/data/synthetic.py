"""A procedural, learnable re-id dataset written in the exact Market-1501 layout.

Each identity has its own body shape, clothing colours and textures (shirt pattern, trousers, hair,
an optional bag); each camera changes illumination, colour cast, scale, blur and viewpoint; every
image has a cluttered background, a random pose jitter and, sometimes, an occluder. Identities draw
their colours from a shared palette, so the feature space has natural groups for k-means to find.

Layout (as Market-1501)::

    root/bounding_box_train/0002_c1s1_000451_03.jpg   train ids
    root/bounding_box_test/...                        gallery: test ids, distractors (0000), junk (-1)
    root/query/...                                    one image per test id and camera
    root/gt_bbox/...                                  each query again plus more images of its id and
                                                      camera (Market's multi-query boxes; optional)

Difficulty (seed 0, 100 ids, 6 cameras, 12 images/id, 128x64): a nearest neighbour on raw
pixels (cosine on mean-centred 64x32 pixels, Market rules) gets a rank-1 of 12 % and mAP of 8 %
(rank-1 13 % with seed 1, 8 % with seed 2); on the 24-id test fixture rank-1 is 24 %
(``tests/test_synthetic.py`` checks 0.08..0.6); a small CNN trained for a few epochs reaches far more
(see the README).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageFilter

from ..staging import staged_folder
from .base import DatasetError

SUMMARY_FILE = "synthetic.json"  # written last: its presence marks a complete dataset
OWNED = ("bounding_box_train", "bounding_box_test", "query", "gt_bbox", SUMMARY_FILE)
MIN_SIDE = 16  # the renderer's body parts and clutter need this many pixels

PALETTE = np.array(
    [
        [200, 30, 30], [30, 60, 190], [40, 150, 60], [230, 200, 40], [240, 240, 235], [25, 25, 30],
        [120, 60, 150], [240, 130, 30], [110, 110, 115], [100, 60, 30], [40, 170, 190], [230, 120, 170],
    ],
    dtype=np.float32,
)
SKIN = np.array([[250, 210, 180], [220, 170, 130], [170, 120, 80], [110, 75, 50]], dtype=np.float32)


def _identity(rng: np.random.Generator) -> dict:
    """The fixed appearance of one person."""
    # Upper-body colours come from one of a few "styles", giving the data natural clusters.
    return {
        "top": int(rng.integers(len(PALETTE))),
        "top2": int(rng.integers(len(PALETTE))),
        "bottom": int(rng.integers(len(PALETTE))),
        "shoes": int(rng.integers(len(PALETTE))),
        "hair": int(rng.integers(len(PALETTE))),
        "skin": int(rng.integers(len(SKIN))),
        "pattern": int(rng.integers(4)),  # plain, h-stripes, v-stripes, checks
        "freq": float(rng.uniform(3, 8)),
        "width": float(rng.uniform(0.26, 0.42)),  # shoulder width as a fraction of image width
        "legs": float(rng.uniform(0.40, 0.52)),  # leg length as a fraction of body height
        "shorts": bool(rng.random() < 0.25),
        "bag": int(rng.integers(len(PALETTE))) if rng.random() < 0.4 else -1,
    }


def _camera(rng: np.random.Generator) -> dict:
    """How one camera sees everybody."""
    return {
        "gain": float(rng.uniform(0.65, 1.25)),
        "cast": rng.uniform(0.8, 1.2, size=3).astype(np.float32),
        "scale": float(rng.uniform(0.78, 0.97)),
        "blur": float(rng.uniform(0.0, 1.4)),
        "flip": bool(rng.random() < 0.5),  # viewpoint: walks the other way
        "shear": float(rng.uniform(-0.15, 0.15)),
        "bg": rng.uniform(40, 200, size=3).astype(np.float32),
    }


def _background(rng: np.random.Generator, h: int, w: int, base: np.ndarray) -> np.ndarray:
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = base * (0.7 + 0.5 * yy) + rng.normal(0, 8, size=(h, w, 3)).astype(np.float32)
    for _ in range(int(rng.integers(4, 10))):  # clutter: boxes of random colours
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, x1 = min(h, y0 + int(rng.integers(4, h // 3))), min(w, x0 + int(rng.integers(4, w // 2)))
        img[y0:y1, x0:x1] = rng.uniform(0, 255, size=3)
    return img


def _render(person: dict, cam: dict, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = _background(rng, h, w, cam["bg"] * rng.uniform(0.8, 1.2, size=3).astype(np.float32))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    scale = cam["scale"] * rng.uniform(0.93, 1.05)
    body_h = h * scale
    top_y = (h - body_h) * rng.uniform(0.2, 0.8)
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w
    # viewpoint: shear the person around the centre line
    xs = xx - cx - cam["shear"] * (yy - h / 2)
    v = (yy - top_y) / body_h  # 0 at the top of the head, 1 at the feet
    half = person["width"] * w / 2 * rng.uniform(0.92, 1.08)
    head_r = 0.075
    leg_top = 1 - person["legs"]

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        img[mask] = colour

    # legs / trousers
    legs = (v >= leg_top) & (v <= 0.96) & (np.abs(xs) <= half * 0.8) & (np.abs(xs) >= half * 0.08)
    paint(legs, PALETTE[person["bottom"]])
    if person["shorts"]:
        paint(legs & (v > leg_top + (0.96 - leg_top) * 0.45), SKIN[person["skin"]])
    paint((v > 0.96) & (v <= 1.0) & (np.abs(xs) <= half * 0.85), PALETTE[person["shoes"]])
    # torso with pattern
    torso = (v >= 2 * head_r + 0.02) & (v < leg_top) & (np.abs(xs) <= half)
    pat = person["pattern"]
    f = person["freq"]
    if pat == 0:
        alt = np.zeros_like(v, dtype=bool)
    elif pat == 1:
        alt = np.sin(v * f * 2 * np.pi * 2.2) > 0
    elif pat == 2:
        alt = np.sin(xs / w * f * 2 * np.pi) > 0
    else:
        alt = (np.sin(v * f * 2 * np.pi * 2.2) > 0) ^ (np.sin(xs / w * f * 2 * np.pi) > 0)
    paint(torso & ~alt, PALETTE[person["top"]])
    paint(torso & alt, PALETTE[person["top2"]])
    # arms
    arms = (v >= 2 * head_r + 0.03) & (v < leg_top + 0.05) & (np.abs(xs) > half) & (np.abs(xs) <= half * 1.28)
    paint(arms, PALETTE[person["top"]] * 0.85)
    # head and hair
    hy = top_y + head_r * body_h
    head = ((xs / (head_r * body_h * 0.8)) ** 2 + ((yy - hy) / (head_r * body_h)) ** 2) <= 1
    paint(head, SKIN[person["skin"]])
    paint(head & (yy < hy - 0.2 * head_r * body_h), PALETTE[person["hair"]])
    if person["bag"] >= 0:  # a bag on one side
        bag = (v > 0.32) & (v < 0.55) & (xs > half * 0.7) & (xs < half * 1.45)
        paint(bag, PALETTE[person["bag"]])

    # occlusion by a passer-by or an object
    if rng.random() < 0.2:
        ow = int(rng.integers(w // 5, w // 2))
        x0 = int(rng.integers(0, w - ow))
        y0 = int(rng.integers(h // 3, h - h // 6))
        img[y0:, x0 : x0 + ow] = rng.uniform(0, 255, size=3)

    img = img * cam["gain"] * cam["cast"] * rng.uniform(0.9, 1.1)
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    if cam["flip"]:
        img = img[:, ::-1]
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synthetic(
    root: str | os.PathLike,
    num_ids: int = 100,
    cams: int = 6,
    images_per_id: int = 12,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
    num_distractors: int = 30,
    num_junk: int = 10,
    overwrite: bool = False,
    gt_bbox: bool = True,
    gt_bbox_per_query: int = 3,
) -> dict:
    """Write a synthetic re-id dataset at ``root`` in the Market-1501 layout and return its summary.

    Half of ``num_ids`` (rounded up) are train identities, the rest test identities. Every test
    identity gets one query per camera it was seen in (at least two cameras) and the rest of its images
    go to the gallery, with ``num_distractors`` images of pid 0000 and ``num_junk`` of pid -1 added.
    ``size`` is (height, width). Deterministic for a given ``seed``.

    ``gt_bbox`` also writes Market's ``gt_bbox/`` folder for the multi-query protocol:
    ``gt_bbox_per_query`` images per query (id, camera), the query image itself (same file name, as
    in Market-1501) and new renderings of that person in that camera. They come from their own random
    stream, so every other image is the same with or without them.
    """
    root = os.path.abspath(os.fspath(root))
    _check_params(root, num_ids, cams, images_per_id, seed, size, num_distractors, num_junk, overwrite)
    if gt_bbox and gt_bbox_per_query < 1:
        raise DatasetError("invalid synthetic dataset setting", where="gt_bbox_per_query",
                           expected=f"expected >= 1 (it counts the query itself), got {gt_bbox_per_query}")
    # Written into a staging folder and swapped in when complete: a failure (or --overwrite) never
    # leaves a half-written dataset or costs the previous one.
    with staged_folder(root, marker=SUMMARY_FILE, owned=lambda name: name in OWNED) as stage:
        summary = _write(stage, num_ids, cams, images_per_id, seed, size, num_distractors, num_junk,
                         gt_bbox, gt_bbox_per_query)
    return summary


def _check_params(root, num_ids, cams, images_per_id, seed, size, num_distractors, num_junk, overwrite) -> None:
    checks = [
        (num_ids >= 2, "num_ids", ">= 2: train and test need one identity each", num_ids),
        (2 <= cams <= 9, "cams", "2..9: Market file names hold one camera digit", cams),
        (images_per_id >= 2, "images_per_id", ">= 2: a query needs a gallery match", images_per_id),
        (seed >= 0, "seed", ">= 0", seed),
        (min(size) >= MIN_SIDE, "size", f"(height, width) of at least {MIN_SIDE} pixels each", tuple(size)),
        (num_distractors >= 0 and num_junk >= 0, "num_distractors/num_junk", ">= 0", (num_distractors, num_junk)),
    ]
    for ok, name, expected, got in checks:
        if not ok:
            raise DatasetError("invalid synthetic dataset setting", where=name, expected=f"expected {expected}, got {got!r}")
    if os.path.isfile(root):
        raise DatasetError(f"{root} is a file", where="root", expected="a folder for the dataset")
    if os.path.isdir(os.path.join(root, "bounding_box_train")) and not overwrite:
        raise DatasetError(f"{root} already holds a dataset", where="root",
                           expected="a new or empty folder; pass --overwrite (overwrite=True) to replace it")


def _write(root: str, num_ids, cams, images_per_id, seed, size, num_distractors, num_junk,
           gt_bbox: bool, gt_bbox_per_query: int) -> dict:
    # Long because the dataset's folder layout written in one place (train, query, gallery, gt_bbox, junk, distractors).
    h, w = size
    rng = np.random.default_rng(seed)
    cameras = [_camera(rng) for _ in range(cams)]
    people = [_identity(rng) for _ in range(num_ids)]
    num_train = (num_ids + 1) // 2
    dirs = {s: os.path.join(root, s) for s in ("bounding_box_train", "bounding_box_test", "query")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    counter = 0

    def save(folder: str, pid: int, cam: int, arr: np.ndarray) -> str:
        nonlocal counter
        counter += 1
        pid_s = "-1" if pid == -1 else f"{pid:04d}"
        name = f"{pid_s}_c{cam + 1}s1_{counter:06d}_00.jpg"
        img = Image.fromarray(arr)
        if cameras[cam]["blur"] > 0.2:
            img = img.filter(ImageFilter.GaussianBlur(cameras[cam]["blur"]))
        img.save(os.path.join(folder, name), quality=90)
        return name

    queries = []  # (pid, camera, file name, person) of each query image, for gt_bbox/

    for i, person in enumerate(people):
        pid = i + 1  # Market ids start at 1; 0 is the distractor id
        is_train = i < num_train
        # each person is seen by a random subset of >= 2 cameras
        seen = rng.choice(cams, size=int(rng.integers(2, cams + 1)), replace=False)
        cam_of = [int(seen[j % len(seen)]) for j in range(images_per_id)]
        rng.shuffle(cam_of)
        queried: set[int] = set()
        for cam in cam_of:
            arr = _render(person, cameras[cam], rng, h, w)
            if is_train:
                folder = dirs["bounding_box_train"]
            elif cam not in queried and len(queried) < len(seen) - 1:
                folder = dirs["query"]  # keep >= 1 camera for the gallery so every query has a match
                queried.add(cam)
            else:
                folder = dirs["bounding_box_test"]
            name = save(folder, pid, cam, arr)
            if folder == dirs["query"]:
                queries.append((pid, cam, name, person))
    for _ in range(num_distractors):  # pid 0: people who are nobody's match
        cam = int(rng.integers(cams))
        save(dirs["bounding_box_test"], 0, cam, _render(_identity(rng), cameras[cam], rng, h, w))
    for _ in range(num_junk):  # pid -1: background-only crops
        cam = int(rng.integers(cams))
        arr = np.clip(_background(rng, h, w, cameras[cam]["bg"]), 0, 255).astype(np.uint8)
        save(dirs["bounding_box_test"], -1, cam, arr)
    if gt_bbox:
        dirs["gt_bbox"] = _write_gt_bbox(root, queries, cameras, gt_bbox_per_query, seed, size, save)
    summary = {
        "num_ids": num_ids,
        "num_train_ids": num_train,
        "num_test_ids": num_ids - num_train,
        "cams": cams,
        "images_per_id": images_per_id,
        "seed": seed,
        "size": [h, w],
        "num_distractors": num_distractors,
        "num_junk": num_junk,
        "images": {k: len(os.listdir(v)) for k, v in dirs.items()},
    }
    with open(os.path.join(root, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _write_gt_bbox(root: str, queries: list, cameras: list, per_query: int, seed: int, size: tuple[int, int],
                   save) -> str:
    """Market's ``gt_bbox/``: each query image under its own name plus ``per_query - 1`` new images of
    the same person in the same camera, from a random stream of their own."""
    import shutil

    folder = os.path.join(root, "gt_bbox")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    for pid, cam, name, person in queries:
        shutil.copyfile(os.path.join(root, "query", name), os.path.join(folder, name))
        for _ in range(per_query - 1):
            save(folder, pid, cam, _render(person, cameras[cam], rng, *size))
    return folder
