"""Evaluation metrics: hand-computed cases, agreement with torchreid's Python evaluator, protocols,
results I/O, bad input, and the ``slsr evaluate`` CLI."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slsr_ray import storage
from slsr_ray.evaluate import (
    RankResult,
    aggregate_trials,
    compute_distance_matrix,
    evaluate_cuhk03_single_shot,
    evaluate_features,
    evaluate_multi_query,
    evaluate_rank,
    evaluate_split,
    evaluate_viper,
    format_table,
    plot_cmc,
    pool_multi_query,
    random_half_splits,
)


def _torchreid_rank():
    """torchreid 0.2.5's ``metrics/rank.py`` loaded alone (its Cython import fails -> Python evaluator)."""
    spec = importlib.util.find_spec("torchreid")
    root = pathlib.Path(spec.submodule_search_locations[0])
    path = next(p for p in (root / "reid/metrics/rank.py", root / "metrics/rank.py") if p.exists())
    mod_spec = importlib.util.spec_from_file_location("_torchreid_rank", path)
    mod = importlib.util.module_from_spec(mod_spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod_spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tr_rank():
    return _torchreid_rank()


def _brute_force(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Per-query loop with a stable argsort: the documented semantics, written the obvious way."""
    cmcs, aps, inps = [], [], []
    for i in range(len(distmat)):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        match = (g_pids[order] == q_pids[i])[keep]
        if not match.any():
            continue
        hits = np.flatnonzero(match)
        cmc = np.zeros(max_rank)
        cmc[min(hits[0], max_rank):] = 1
        cmcs.append(cmc)
        aps.append(np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))
        inps.append(len(hits) / (hits[-1] + 1))
    return np.mean(cmcs, 0), float(np.mean(aps)), float(np.mean(inps)), len(aps)


# ------------------------------------------------------------------------------------ hand-computed
def test_hand_computed_single_query():
    # Gallery order by distance: g0 (pid 1, cam 0: junk for the query in cam 0), g1 (pid 2), g2 (pid 1,
    # cam 1: match), g3 (pid 3), g4 (pid 1, cam 2: match). Kept ranking: g1, g2, g3, g4.
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    r = evaluate_rank(d, [1], [1, 2, 1, 3, 1], [0], [0, 0, 1, 0, 2], max_rank=4)
    np.testing.assert_allclose(r["cmc"], [0, 1, 1, 1])
    assert r["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert r["mINP"] == pytest.approx(2 / 4)
    assert r["num_valid_queries"] == 1


def test_ties_are_broken_by_gallery_index():
    # All distances equal: the stable order is the gallery order, junk (g1) removed.
    d = np.zeros((1, 4))
    r = evaluate_rank(d, [7], [5, 7, 7, 5], [0], [0, 0, 1, 1], max_rank=3)
    # kept order: g0 (neg), g2 (pos), g3 (neg) -> first hit at rank 2
    np.testing.assert_allclose(r["cmc"], [0, 1, 1])
    assert r["mAP"] == pytest.approx(1 / 2)
    # A positive with a smaller index than a tied negative goes first.
    r = evaluate_rank(np.array([[1.0, 1.0, 0.5]]), [7], [7, 5, 5], [0], [1, 0, 0], max_rank=3)
    np.testing.assert_allclose(r["cmc"], [0, 1, 1])  # g2 (0.5) first, then g0 (pos) before g1 (tie)
    assert r["mAP"] == pytest.approx(1 / 2)


def test_ties_match_brute_force_on_integer_distances():
    rng = np.random.default_rng(3)
    d = rng.integers(0, 4, size=(60, 80)).astype(np.float32)  # heavy ties
    qp, gp = rng.integers(0, 6, 60), rng.integers(0, 6, 80)
    qc, gc = rng.integers(0, 3, 60), rng.integers(0, 3, 80)
    r = evaluate_rank(d, qp, gp, qc, gc, max_rank=20, batch_bytes=4096)
    cmc, m_ap, m_inp, nv = _brute_force(d, qp, gp, qc, gc, 20)
    np.testing.assert_allclose(r["cmc"], cmc, atol=1e-12)
    assert r["mAP"] == pytest.approx(m_ap, abs=1e-12)
    assert r["mINP"] == pytest.approx(m_inp, abs=1e-12)
    assert r["num_valid_queries"] == nv


def test_query_without_valid_match_is_skipped():
    d = np.array([[0.3, 0.1, 0.2], [0.1, 0.2, 0.3]])
    # query 0 (pid 9) has no gallery entry; query 1 (pid 1, cam 0) matches g2 (cam 1) at rank 3
    r = evaluate_rank(d, [9, 1], [2, 3, 1], [0, 0], [0, 0, 1], max_rank=3)
    assert r["num_valid_queries"] == 1 and r["num_queries"] == 2
    np.testing.assert_allclose(r["cmc"], [0, 0, 1])
    assert r["mAP"] == pytest.approx(1 / 3)


def test_all_junk_raises_clear_error():
    # Every same-pid gallery entry is in the query's camera: nothing valid to evaluate.
    d = np.array([[0.1, 0.2]])
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_rank(d, [1], [1, 2], [0], [0, 1])


def test_gallery_smaller_than_max_rank_pads_with_last_value(tr_rank):
    d = np.array([[0.2, 0.1, 0.3], [0.3, 0.2, 0.1]])
    r = evaluate_rank(d, [1, 2], [2, 1, 1], [0, 0], [1, 0, 1], max_rank=10)
    # q0 (pid 1, cam 0): kept g0 (pid 2), g2 (pid 1, cam 1) ordered g0, g2 -> first hit rank 2
    # q1 (pid 2, cam 0): kept g2, g1, g0 -> g0 (pid 2, cam 1) at rank 3
    assert len(r["cmc"]) == 10
    np.testing.assert_allclose(r["cmc"], [0, 0.5] + [1.0] * 8)
    # torchreid truncates the curve to num_gallery when the gallery is smaller than max_rank and
    # cannot stack per-query curves of different lengths once junk is removed.
    with pytest.raises(ValueError):
        tr_rank.eval_market1501(d, np.array([1, 2]), np.array([2, 1, 1]), np.array([0, 0]),
                                np.array([1, 0, 1]), 10)


# -------------------------------------------------------------------------------- vs torchreid
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_torchreid_python_evaluator(tr_rank, seed):
    rng = np.random.default_rng(seed)
    nq, ng = 150, 700
    qp, gp = rng.integers(0, 60, nq), rng.integers(0, 70, ng)
    qc, gc = rng.integers(0, 5, nq), rng.integers(0, 5, ng)
    d = rng.random((nq, ng)).astype(np.float32 if seed % 2 else np.float64)
    cmc, m_ap = tr_rank.eval_market1501(d, qp, gp, qc, gc, 50)
    r = evaluate_rank(d, qp, gp, qc, gc, max_rank=50, batch_bytes=200_000)  # several batches
    np.testing.assert_allclose(r["cmc"], cmc, atol=1e-6)
    assert abs(r["mAP"] - m_ap) <= 1e-6
    cmc_b, m_ap_b, m_inp_b, _ = _brute_force(d, qp, gp, qc, gc, 50)
    assert r["mINP"] == pytest.approx(m_inp_b, abs=1e-12)


def test_features_entry_point_matches_distance_matrix(tr_rank):
    rng = np.random.default_rng(5)
    qf, gf = rng.normal(size=(80, 16)), rng.normal(size=(300, 16))
    qp, gp = rng.integers(0, 30, 80), rng.integers(0, 30, 300)
    qc, gc = rng.integers(0, 4, 80), rng.integers(0, 4, 300)
    for metric in ("euclidean", "cosine"):
        d = compute_distance_matrix(qf, gf, metric)
        cmc, m_ap = tr_rank.eval_market1501(d, qp, gp, qc, gc, 50)
        # one distance block for all queries, and blocks of 13 queries (several GEMMs, gallery norms reused)
        for block_bytes in (1 << 28, 30_000):
            r = evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric, batch_bytes=100_000,
                                  block_bytes=block_bytes)
            np.testing.assert_allclose(r["cmc"], cmc, atol=1e-6)
            assert abs(r["mAP"] - m_ap) <= 1e-6
    ref = np.sqrt(((qf[:, None] - gf[None]) ** 2).sum(-1))
    np.testing.assert_allclose(compute_distance_matrix(qf, gf), ref, atol=1e-4)


# ----------------------------------------------------------------------------------- protocols
def test_multi_query_pooling():
    qf = np.array([[1, 0], [3, 4], [0, 2], [5, 5]], dtype=np.float32)
    feats, pids, cams = pool_multi_query(qf, [1, 1, 1, 2], [0, 0, 1, 0], pool="mean")
    np.testing.assert_allclose(feats, [[2, 2], [0, 2], [5, 5]])
    assert pids.tolist() == [1, 1, 2] and cams.tolist() == [0, 1, 0]
    feats, _, _ = pool_multi_query(qf, [1, 1, 1, 2], [0, 0, 1, 0], pool="max")
    np.testing.assert_allclose(feats, [[3, 4], [0, 2], [5, 5]])
    gf = np.array([[2, 2], [0, 2], [5, 5], [9, 9]], dtype=np.float32)
    r = evaluate_multi_query(qf, gf, [1, 1, 1, 2], [1, 1, 2, 3], [0, 0, 1, 0], [1, 0, 1, 1], pool="mean")
    # pooled (1, cam 0) = [2, 2] -> g0 (cam 1) at distance 0, its g1 is junk; (1, cam 1) = [0, 2] -> g1;
    # (2, cam 0) -> g2: three pooled queries, all matched first.
    assert r["num_valid_queries"] == 3 and r["cmc"][0] == 1.0 and r["mAP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="pool"):
        pool_multi_query(qf, [1, 1, 1, 2], [0, 0, 1, 0], pool="median")


# The multi-query example, 1-d features (euclidean distance = |a - b|), worked out by hand:
#   gallery (camera 1): pid 1 at 3.0, pid 2 at -1.0 and at 6.0
#   query pid 1 (camera 0) at 0.0: distances 3 / 1 / 6 -> pid 2 first, its match second: R1 miss, AP 1/2
#   query pid 2 (camera 0) at 5.5: distances 2.5 / 6.5 / 0.5 -> hit at ranks 1 and 3: AP (1 + 2/3) / 2
#   gt_bbox images of (pid 1, camera 0) at 4.0 and 5.0: pooled query (0 + 4 + 5) / 3 = 3.0, distances
#   0 / 4 / 3 -> hit first: AP 1. An image of (pid 1, camera 2) at -100 has no query group: unused.
MQ_GALLERY = (np.array([[3.0], [-1.0], [6.0]], np.float32), [1, 2, 2], [1, 1, 1])
MQ_QUERY = (np.array([[0.0], [5.5]], np.float32), [1, 2], [0, 0])
MQ_EXTRA = (np.array([[4.0], [5.0], [-100.0]], np.float32), [1, 1, 1], [0, 0, 2])


def test_multi_query_with_gt_bbox_images_changes_rank1_as_computed_by_hand():
    (qf, qp, qc), (gf, gp, gc) = MQ_QUERY, MQ_GALLERY
    res = evaluate_split("multi_query", qf, gf, qp, gp, qc, gc, max_rank=3, multi_query=MQ_EXTRA)
    sq, mq = res["single_query"], res["plain"]
    np.testing.assert_allclose(sq["cmc"], [0.5, 1.0, 1.0])
    assert sq["mAP"] == pytest.approx((1 / 2 + (1 + 2 / 3) / 2) / 2)
    np.testing.assert_allclose(mq["cmc"], [1.0, 1.0, 1.0])
    assert mq["mAP"] == pytest.approx((1 + (1 + 2 / 3) / 2) / 2) and mq["num_valid_queries"] == 2
    pooled, pids, cams = pool_multi_query(qf, qp, qc, "mean", extra=MQ_EXTRA)
    np.testing.assert_allclose(pooled, [[3.0], [5.5]])
    assert pids.tolist() == [1, 2] and cams.tolist() == [0, 0]
    # the Market rules ignore gt_bbox images
    market = evaluate_split("market", qf, gf, qp, gp, qc, gc, max_rank=3, multi_query=MQ_EXTRA)["plain"]
    np.testing.assert_allclose(market["cmc"], sq["cmc"])
    with pytest.raises(ValueError, match="evaluation must be"):
        evaluate_split("cmc", qf, gf, qp, gp, qc, gc)


def test_single_shot_split_by_hand():
    """CUHK03 classic scoring: one random gallery image per identity. Query pid 1 at 0.0; gallery pid 1
    at 2.0, pid 2 at 1.0 and 1.5, pid 3 at 3.0. All images: the match is third (R1 0, R3 1, AP 1/3).
    Single-shot: whichever pid-2 image is drawn lies before the match, pid 3 after: always rank 2."""
    qf, gf = np.array([[0.0]], np.float32), np.array([[2.0], [1.0], [1.5], [3.0]], np.float32)
    ids = ([1], [1, 2, 2, 3], [0], [1, 1, 1, 1])
    market = evaluate_split("market", qf, gf, *ids, max_rank=4)["plain"]
    np.testing.assert_allclose(market["cmc"], [0, 0, 1, 1])
    res = evaluate_split("single_shot", qf, gf, *ids, max_rank=4, rerank={"k1": 2, "k2": 1, "lambda_value": 0.3})
    np.testing.assert_allclose(res["plain"]["cmc"], [0, 1, 1, 1])
    assert res["plain"]["mAP"] == pytest.approx(1 / 3) and res["plain"]["num_repeats"] == 10
    assert set(res) == {"plain", "rerank"} and res["rerank"]["cmc"][-1] == 1.0


def test_cuhk03_single_shot_one_image_per_identity_equals_market(tr_rank):
    rng = np.random.default_rng(7)
    nq, ng = 60, 40
    gp = np.arange(ng)  # one gallery image per identity: sampling is deterministic
    qp, qc, gc = rng.integers(0, ng, nq), np.zeros(nq, int), np.ones(ng, int)
    d = rng.random((nq, ng))
    r = evaluate_cuhk03_single_shot(d, qp, gp, qc, gc, max_rank=20, num_repeats=3)
    cmc, m_ap = tr_rank.eval_cuhk03(d, qp, gp, qc, gc, 20)
    np.testing.assert_allclose(r["cmc"], cmc, atol=1e-6)
    assert abs(r["mAP"] - m_ap) <= 1e-6


def test_cuhk03_single_shot_agrees_in_expectation(tr_rank):
    rng = np.random.default_rng(8)
    nq, ng = 40, 200
    qp, gp = rng.integers(0, 20, nq), rng.integers(0, 20, ng)
    qc, gc = rng.integers(0, 2, nq), rng.integers(0, 2, ng)
    d = rng.random((nq, ng))
    ours = evaluate_cuhk03_single_shot(d, qp, gp, qc, gc, max_rank=10, num_repeats=400, seed=1)
    np.random.seed(0)
    ref = np.mean([tr_rank.eval_cuhk03(d, qp, gp, qc, gc, 10)[0] for _ in range(20)], 0)  # 200 repeats
    np.testing.assert_allclose(ours["cmc"], ref, atol=0.03)
    # Single-shot CMC is at least the all-gallery CMC's complement bound: rank-1 rises when rivals thin out.
    market = evaluate_rank(d, qp, gp, qc, gc, max_rank=10)
    assert ours["cmc"][0] >= market["cmc"][0] - 1e-9
    assert ours["mAP"] == pytest.approx(market["mAP"])


def test_aggregate_trials_and_viper():
    a = {"cmc": np.array([0.5, 1.0]), "mAP": 0.4, "mINP": 0.2, "num_valid_queries": 10}
    b = {"cmc": np.array([0.7, 1.0]), "mAP": 0.6, "mINP": 0.4, "num_valid_queries": 10}
    agg = aggregate_trials([a, b])
    np.testing.assert_allclose(agg["cmc"], [0.6, 1.0])
    assert agg["mAP"] == pytest.approx(0.5) and agg["std"]["mAP"] == pytest.approx(0.1)
    np.testing.assert_allclose(agg["std"]["cmc"], [0.1, 0.0])
    with pytest.raises(ValueError, match="empty"):
        aggregate_trials([])

    # VIPeR-like: 40 pairs, camera B image = camera A image + small noise -> near-perfect matching.
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 8)).astype(np.float32)
    feats = np.concatenate([base, base + 0.01 * rng.normal(size=base.shape).astype(np.float32)])
    pids = np.concatenate([np.arange(40), np.arange(40)])
    cams = np.concatenate([np.zeros(40, int), np.ones(40, int)])
    res = evaluate_viper(feats, pids, cams, trained_on=[], trials=10, seed=0, max_rank=20)
    assert res["num_trials"] == 10 and res["num_valid_queries"] == 20
    assert res["cmc"][0] == pytest.approx(1.0) and res["std"]["mAP"] == pytest.approx(0.0)
    splits = random_half_splits(pids, trials=3, seed=1)
    assert all(len(s) == 20 and len(np.unique(s)) == 20 for s in splits)
    assert not np.array_equal(splits[0], splits[1])
    with pytest.raises(ValueError, match="two cameras"):
        evaluate_viper(feats, pids, np.arange(80) % 3, trained_on=[])


def test_viper_refuses_test_halves_holding_training_ids():
    """A model trained on split 0's training half has seen most of split 1's test half: scoring it on
    the ten halves would leak; on its own split's half it is allowed."""
    from slsr_ray.data.datasets import make_viper_splits

    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 8)).astype(np.float32)
    feats = np.concatenate([base, base + 0.01 * rng.normal(size=base.shape).astype(np.float32)])
    pids, cams = np.tile(np.arange(40), 2), np.repeat([0, 1], 40)
    split0 = make_viper_splits(list(range(40)), seed=4)[0]
    with pytest.raises(ValueError, match=r"trial 1's test half holds \d+ identities the model was trained on"):
        evaluate_viper(feats, pids, cams, trained_on=split0["train"], trials=10, seed=4)
    own = evaluate_viper(feats, pids, cams, trained_on=split0["train"], test_splits=[np.array(split0["test"])])
    assert own["num_trials"] == 1 and own["num_valid_queries"] == 20
    assert random_half_splits(pids, trials=1, seed=4)[0].tolist() == split0["test"]


# ------------------------------------------------------------------------------------ results
def test_results_table_json_and_plot(tmp_path, s3_bucket):
    rng = np.random.default_rng(1)
    d = rng.random((30, 100))
    qp, gp = rng.integers(0, 10, 30), rng.integers(0, 10, 100)
    qc, gc = rng.integers(0, 3, 30), rng.integers(0, 3, 100)
    res = RankResult.from_metrics(evaluate_rank(d, qp, gp, qc, gc), "random")
    text = res.table()
    assert "R1" in text and "mINP" in text and f"{100 * res.mAP:.2f}" in text
    uri = str(tmp_path / "eval" / "r.json")
    res.to_json(uri)
    back = RankResult.from_json(uri)
    np.testing.assert_allclose(back.cmc, res.cmc)
    assert back.mAP == pytest.approx(res.mAP) and back.name == "random"
    s3_uri = f"{s3_bucket}/eval/r.json"
    res.to_json(s3_uri)
    assert storage.read_json(s3_uri)["summary_percent"]["R1"] == pytest.approx(100 * res.cmc[0])

    agg = RankResult.from_metrics(aggregate_trials([res, res]), "agg")
    assert "±" in format_table({"a": res, "agg": agg})

    png = str(tmp_path / "cmc.png")
    plot_cmc({"random": res, "dict": evaluate_rank(d, qp, gp, qc, gc)}, png)
    assert pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_cmc({"random": res}, f"{s3_bucket}/cmc.png")
    assert storage.read_bytes(f"{s3_bucket}/cmc.png")[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_is_rejected_naming_the_argument():
    d = np.random.default_rng(0).random((3, 4))
    ids = dict(q_pids=[1, 2, 3], g_pids=[1, 2, 3, 4], q_camids=[0, 0, 0], g_camids=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="distmat must be a 2-D"):
        evaluate_rank(d[0], **ids)
    bad = d.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="distmat has 1 non-finite"):
        evaluate_rank(bad, **ids)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_rank(bad, **ids)
    with pytest.raises(ValueError, match="g_pids has length 3, expected 4"):
        evaluate_rank(d, **{**ids, "g_pids": [1, 2, 3]})
    with pytest.raises(ValueError, match="q_camids has length 2, expected 3"):
        evaluate_rank(d, **{**ids, "q_camids": [0, 0]})
    with pytest.raises(ValueError, match="q_pids must hold integer ids"):
        evaluate_rank(d, **{**ids, "q_pids": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(d, **ids, max_rank=0)
    with pytest.raises(ValueError, match="distmat must be numeric"):
        evaluate_rank(d.astype(str), **ids)
    with pytest.raises(ValueError, match="metric"):
        evaluate_features(d, d, ids["q_pids"], ids["q_pids"], ids["q_camids"], ids["q_camids"], metric="l3")
    with pytest.raises(ValueError, match="qf has feature dim 4 but gf has 2"):
        evaluate_features(d, d[:, :2], ids["q_pids"], ids["q_pids"], ids["q_camids"], ids["q_camids"])


# ------------------------------------------------------------------------------------------ CLI
def _write_features(path, rng, num_ids=12, dim=16, bad_split=False):
    centers = rng.normal(size=(num_ids, dim))
    rows = []
    for pid in range(num_ids):
        for cam in range(3):
            for _ in range(2):
                split = "query" if cam == 0 and _ == 0 else "gallery"
                rows.append((centers[pid] + 0.3 * rng.normal(size=dim), pid, cam, split))
    if bad_split:
        rows[0] = (rows[0][0], rows[0][1], rows[0][2], "train")
    feats = np.stack([r[0] for r in rows]).astype(np.float32)
    table = pa.table({
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), dim),
        "pid": pa.array([r[1] for r in rows], pa.int64()),
        "camid": pa.array([r[2] for r in rows], pa.int64()),
        "split": pa.array([r[3] for r in rows]),
    })
    pq.write_table(table, path)
    return feats


def test_cli_evaluate(tmp_path):
    from typer.testing import CliRunner

    from slsr_ray.cli import app

    rng = np.random.default_rng(0)
    parquet = str(tmp_path / "features.parquet")
    _write_features(parquet, rng)
    out, png = tmp_path / "eval.json", tmp_path / "cmc.png"
    result = CliRunner().invoke(app, ["evaluate", "--features", parquet, "--rerank", "--metric", "cosine",
                                      "--max-rank", "10", "--multi-query", "max", "--out", str(out),
                                      "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "single-query" in result.output and "re-ranked" in result.output and "R10" in result.output
    data = json.loads(out.read_text())
    sq = data["results"]["single-query"]
    assert len(sq["cmc"]) == 10 and sq["num_valid_queries"] == 12
    assert sq["cmc"][0] > 0.8  # well-separated identities
    assert set(data["results"]) == {"single-query", "multi-query (max)", "re-ranked"}
    assert png.read_bytes()[:4] == b"\x89PNG"

    bad = str(tmp_path / "bad.parquet")
    _write_features(bad, rng, bad_split=True)
    result = CliRunner().invoke(app, ["evaluate", "--features", bad])
    assert result.exit_code == 2 and "split" in result.output
    result = CliRunner().invoke(app, ["evaluate", "--features", parquet, "--metric", "manhattan"])
    assert result.exit_code == 2 and "--metric" in result.output


def _write_rows(path, groups):
    """A features parquet from {split: (features, pids, camids)}."""
    feats = np.concatenate([g[0] for g in groups.values()]).astype(np.float32)
    pq.write_table(pa.table({
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1]),
        "pid": pa.array(np.concatenate([g[1] for g in groups.values()]), pa.int64()),
        "camid": pa.array(np.concatenate([g[2] for g in groups.values()]), pa.int64()),
        "split": pa.array([s for s, g in groups.items() for _ in range(len(g[0]))]),
    }), path)


def test_cli_evaluate_protocol_over_trials(tmp_path):
    """Two trials of the hand-computed multi-query example: with its gt_bbox rows (MQ R1 1.0) and
    without (MQ R1 = SQ R1 = 0.5): mean 0.75, population std 0.25."""
    from typer.testing import CliRunner

    from slsr_ray.cli import app

    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    _write_rows(a, {"query": MQ_QUERY, "gallery": MQ_GALLERY, "multi_query": MQ_EXTRA})
    _write_rows(b, {"query": MQ_QUERY, "gallery": MQ_GALLERY})
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["evaluate", "-f", a, "-f", b, "--protocol", "multi_query", "--max-rank", "3",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 trial(s)" in res.output and "75.00±25.00" in res.output
    data = json.loads(out.read_text())
    assert data["protocol"] == "multi_query" and data["num_trials"] == 2
    mq, sq = data["results"]["multi-query (mean)"], data["results"]["single-query"]
    assert mq["num_trials"] == 2 and mq["cmc"][0] == pytest.approx(0.75) and mq["std"]["cmc"][0] == pytest.approx(0.25)
    assert sq["cmc"][0] == pytest.approx(0.5) and sq["std"]["cmc"][0] == pytest.approx(0.0)
    assert mq["mAP"] == pytest.approx(((1 + 5 / 6) / 2 + (1 / 2 + 5 / 6) / 2) / 2)

    res = CliRunner().invoke(app, ["evaluate", "-f", a, "--protocol", "classic", "--max-rank", "3"])
    assert res.exit_code == 0 and "single-shot" in res.output, res.output
    res = CliRunner().invoke(app, ["evaluate", "-f", a, "--protocol", "triple_query"])
    assert res.exit_code == 2 and "unknown protocol 'triple_query'" in res.output
