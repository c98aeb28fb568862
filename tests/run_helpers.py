"""Checks shared by the tests that compare whole runs."""

from __future__ import annotations

import hashlib
import io

from slsr_ray import storage
from slsr_ray.data.images import read_image_bytes


def weights_digest(path: str) -> str:
    """Digest of the weights in a checkpoint (not its timings, which differ between equal runs)."""
    import torch

    blob = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    state = blob["state_dict"] if "state_dict" in blob else {k: blob[k] for k in ("G", "D")}
    h = hashlib.sha256()
    for name, t in sorted(_flat(state)):
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def assert_same_run(first: str, again: str) -> None:
    """Two runs of one config and seed (CPU): identical synthetic data, clusters, generated images,
    weights and metrics."""

    def read(root: str, rel: str):
        return storage.read_json(storage.join(root, rel))

    for split in ("train", "query", "gallery"):
        a, b = (storage.read_table(storage.join(r, "prepare", f"{split}.parquet")) for r in (first, again))
        assert a["pid"].equals(b["pid"]) and a["camid"].equals(b["camid"]), split
    a0, b0 = (storage.read_table(storage.join(r, "prepare", "train.parquet"))["path"][0].as_py() for r in (first, again))
    assert storage.read_bytes(a0) == storage.read_bytes(b0)  # the synthetic images themselves
    assert read(first, "cluster/silhouette.json") == read(again, "cluster/silhouette.json")
    a, b = (storage.read_table(storage.join(r, "cluster/k2/assignments.parquet")) for r in (first, again))
    assert a["cluster"].to_pylist() == b["cluster"].to_pylist()
    assert read(first, "cluster/k2/membership.json") == read(again, "cluster/k2/membership.json")
    ga, gb = (storage.read_table(storage.join(r, "generate/manifest.parquet")) for r in (first, again))
    assert ga.num_rows == gb.num_rows == 24 and ga["cluster"].to_pylist() == gb["cluster"].to_pylist()
    digest = [[hashlib.sha256(read_image_bytes(p)).hexdigest() for p in g["path"].to_pylist()] for g in (ga, gb)]
    assert digest[0] == digest[1]
    for stage in ("pretrain", "train/slsr", "train/none"):
        a, b = (weights_digest(storage.join(r, stage, "model.pt")) for r in (first, again))
        assert a == b, f"{stage} weights differ"
    for strategy in ("slsr", "none"):
        for kind in ("plain", "rerank"):
            rel = f"evaluate/{strategy}/{kind}.json"
            assert read(first, rel) == read(again, rel), rel
