"""A changed config never reuses a stale model, and unaffected stages are not redone (issue 14.1).

One tiny run root, changed one setting at a time the way a user would (`slsr run --set ...`): the
weights that depend on the setting must change, and the stages that do not depend on it keep their
markers (same finish time) and their files (same bytes)."""

from __future__ import annotations

import os
import shutil

import pytest
from run_helpers import weights_digest

from slsr_ray import storage
from slsr_ray.pipeline import load_config, run_pipeline
from slsr_ray.stages import read_record


def _state(root: str) -> dict:
    files = {
        "pretrain": "pretrain/model.pt",
        "gan": "gan/c0/ckpt.pt",
        "train/slsr": "train/slsr/model.pt",
        "train/none": "train/none/model.pt",
    }
    out = {k: weights_digest(os.path.join(root, f)) for k, f in files.items()}
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

    def run(*changes: str, until: str = "train") -> dict:
        cfg = load_config("synthetic", [*base, *changes], run_root=root)
        run_pipeline(cfg, until=until, echo=lambda *_: None)
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
    run("train.lam=0.5", "train.lr=0.02", "gan.lr=0.001", "gan.seed=3", until="generate")
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
    weights = weights_digest(os.path.join(root, "train/none/model.pt"))
    run_pipeline(cfg, from_stage="train", until="train", echo=lambda *_: None)
    again = read_record(root, "train/none")
    assert again.finished != first.finished  # really ran again
    assert weights_digest(os.path.join(root, "train/none/model.pt")) == weights  # same seed, same weights


def test_sweep_scorer_ranks_like_the_evaluate_stage(tiny_run_root):
    """The sweep's in-process validation scorer gives the evaluate stage's numbers (same features, same
    Euclidean distance). (Two runs of one config giving the same run: test_console.py.)"""
    from slsr_ray.train import evaluate_checkpoint

    root = tiny_run_root[0].run_root
    q = storage.read_table(os.path.join(root, "prepare/query.parquet"))
    g = storage.read_table(os.path.join(root, "prepare/gallery.parquet"))
    val = evaluate_checkpoint(os.path.join(root, "train/none/model.pt"), q, g, metric="euclidean")
    plain = storage.read_json(os.path.join(root, "evaluate/none/plain.json"))
    assert val["rank1"] == pytest.approx(plain["rank1"]) and val["mAP"] == pytest.approx(plain["mAP"], abs=1e-6)
