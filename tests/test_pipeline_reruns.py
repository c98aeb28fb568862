"""A changed config never reuses a stale model, and unaffected stages are not redone (issue 14.1).

One tiny run root, changed one setting at a time the way a user would (`slsr run --set ...`): the
weights that depend on the setting must change, and the stages that do not depend on it keep their
markers (same finish time) and their files (same bytes)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil

import pytest
import torch

from slsr_ray import storage
from slsr_ray.data.images import read_image_bytes
from slsr_ray.pipeline import load_config, run_pipeline
from slsr_ray.stages import read_record


def _sha(path: str) -> str:
    """Digest of the weights in a checkpoint (not its timings, which differ between equal runs)."""
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


def _state(root: str) -> dict:
    files = {
        "pretrain": "pretrain/model.pt",
        "gan": "gan/c0/ckpt.pt",
        "train/slsr": "train/slsr/model.pt",
        "train/none": "train/none/model.pt",
    }
    out = {k: _sha(os.path.join(root, f)) for k, f in files.items()}
    for key in ("prepare", "pretrain", "extract", "cluster", "gan", "generate", "train/slsr", "train/none"):
        out[f"{key}@"] = read_record(root, key).finished
    return out


@pytest.mark.slow
def test_changed_settings_retrain_what_depends_on_them(ray_session, tiny_run_root, tmp_path):
    from conftest import TINY_RUN

    # starts from a copy of the session's finished run of the same config (its first run() redoes nothing)
    root = str(tmp_path / "run")
    shutil.copytree(tiny_run_root[0].run_root, root)
    base = TINY_RUN

    def run(*changes: str) -> dict:
        cfg = load_config("synthetic", [*base, *changes], run_root=root)
        run_pipeline(cfg, until="train", echo=lambda *_: None)
        return _state(root)

    def same(a: dict, b: dict, keys: list[str]) -> None:
        for k in keys:
            assert a[k] == b[k], f"{k} changed"

    def differ(a: dict, b: dict, keys: list[str]) -> None:
        for k in keys:
            assert a[k] != b[k], f"{k} did not change: a stale artifact was reused"

    upstream = ["prepare@", "pretrain@", "extract@", "cluster@", "pretrain"]
    s0 = run()
    # lambda only touches the SLSR training (the real-only baseline has no generated images)
    s1 = run("train.lam=0.5")
    differ(s0, s1, ["train/slsr", "train/slsr@"])
    same(s0, s1, [*upstream, "gan", "gan@", "generate@", "train/none", "train/none@"])
    # the learning rate, a GAN setting and K at once: new clusters (the features are not extracted
    # again), three new GANs and their images, both strategies retrained. (That each such setting alone
    # reaches exactly the stages it should is test_pipeline.py::test_hashes_chain_downstream_only and
    # ::test_train_settings_reach_both_trainings_only, in microseconds; here the real reruns.)
    s5 = run("train.lam=0.5", "train.lr=0.02", "gan.lr=0.001", "gan.seed=3", "cluster.k=3")
    differ(s1, s5, ["cluster@", "gan", "generate@", "train/slsr", "train/none"])
    same(s1, s5, ["prepare@", "pretrain@", "extract@", "pretrain"])
    assert sorted(d for d in os.listdir(os.path.join(root, "gan")) if d.startswith("c")) == ["c0", "c1", "c2"]
    # the same config again: nothing reruns
    assert run("train.lam=0.5", "train.lr=0.02", "gan.lr=0.001", "gan.seed=3", "cluster.k=3") == s5
    # and back to K=2: cluster 2's GAN from the K=3 run must not be used for generation
    run("train.lam=0.5", "train.lr=0.02", "gan.lr=0.001", "gan.seed=3")
    assert sorted(d for d in os.listdir(os.path.join(root, "gan")) if d.startswith("c")) == ["c0", "c1"]
    gen = storage.read_table(os.path.join(root, "generate", "manifest.parquet"))
    assert set(gen["cluster"].to_pylist()) == {0, 1}


@pytest.mark.slow
def test_forced_rerun_of_same_config_trains_again(ray_session, tiny_run_root, tmp_path):
    """`--from train` with an unchanged config reruns training from scratch (not a restored Ray Train
    run); with the same seed it gives the same weights, since training is deterministic on CPU."""
    from conftest import TINY_RUN

    root = str(tmp_path / "run")  # a copy of the session's finished run: train/none is already there
    shutil.copytree(tiny_run_root[0].run_root, root)
    cfg = load_config("synthetic", [*TINY_RUN, "baselines=[]", "train.strategy=none"], run_root=root)
    run_pipeline(cfg, until="train", echo=lambda *_: None)
    first = read_record(root, "train/none")
    assert first.finished == read_record(tiny_run_root[0].run_root, "train/none").finished  # reused
    weights = _sha(os.path.join(root, "train/none/model.pt"))
    run_pipeline(cfg, from_stage="train", until="train", echo=lambda *_: None)
    again = read_record(root, "train/none")
    assert again.finished != first.finished  # really ran again
    assert _sha(os.path.join(root, "train/none/model.pt")) == weights  # same seed, same weights


@pytest.mark.slow
def test_same_seed_same_numbers(tiny_run_root, tiny_job_run):
    """Two runs of the same config and seed give identical clusters, generated images, weights and
    metrics (CPU): the session's local tiny run, and the same config run as a Ray job on another Ray
    cluster with an s3:// run root, stopped halfway and resumed. The sweep's validation scorer ranks
    with the pipeline's own distance."""
    from slsr_ray.train import evaluate_checkpoint

    roots = [tiny_run_root[0].run_root, tiny_job_run[0]]

    def read(root: str, rel: str):
        return storage.read_json(storage.join(root, rel))

    for strategy in ("slsr", "none"):
        for kind in ("plain", "rerank"):
            rel = f"evaluate/{strategy}/{kind}.json"
            assert read(roots[0], rel) == read(roots[1], rel), rel
    a, b = (storage.read_table(storage.join(r, "cluster/k2/assignments.parquet")) for r in roots)
    assert a["cluster"].to_pylist() == b["cluster"].to_pylist()
    assert read(roots[0], "cluster/k2/membership.json") == read(roots[1], "cluster/k2/membership.json")
    ga, gb = (storage.read_table(storage.join(r, "generate/manifest.parquet")) for r in roots)
    assert ga["cluster"].to_pylist() == gb["cluster"].to_pylist()
    digest = [[hashlib.sha256(read_image_bytes(p)).hexdigest() for p in g["path"].to_pylist()] for g in (ga, gb)]
    assert digest[0] == digest[1]
    assert _sha(storage.join(roots[0], "train/slsr/model.pt")) == _sha(storage.join(roots[1], "train/slsr/model.pt"))

    # the same numbers from the sweep's in-process scorer (same features, same Euclidean distance)
    q = storage.read_table(os.path.join(roots[0], "prepare/query.parquet"))
    g = storage.read_table(os.path.join(roots[0], "prepare/gallery.parquet"))
    val = evaluate_checkpoint(os.path.join(roots[0], "train/none/model.pt"), q, g, metric="euclidean")
    plain = read(roots[0], "evaluate/none/plain.json")
    assert val["rank1"] == pytest.approx(plain["rank1"]) and val["mAP"] == pytest.approx(plain["mAP"], abs=1e-6)
