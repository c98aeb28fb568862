"""k-reciprocal re-ranking: exact agreement with torchreid's copy of the original code, the feature
entry point's agreement on mAP, and bad input."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from slsr_ray.evaluate import (
    compute_distance_matrix,
    evaluate_rank,
    neighbours,
    re_ranking,
    re_ranking_features,
)


@pytest.fixture(scope="module")
def reference():
    """torchreid 0.2.5's ``utils/rerank.py`` (the original authors' code) loaded on its own."""
    root = pathlib.Path(importlib.util.find_spec("torchreid").submodule_search_locations[0])
    path = next(p for p in (root / "reid/utils/rerank.py", root / "utils/rerank.py") if p.exists())
    spec = importlib.util.spec_from_file_location("_torchreid_rerank", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.re_ranking


def _clustered(seed, nq, ng, dim=16, num_ids=20, noise=0.8):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_ids, nq + ng)
    feats = (rng.normal(size=(num_ids, dim))[ids] + noise * rng.normal(size=(nq + ng, dim))).astype(np.float32)
    cams = rng.integers(0, 3, nq + ng)
    return feats[:nq], feats[nq:], ids[:nq], ids[nq:], cams[:nq], cams[nq:]


@pytest.mark.parametrize(
    "seed,nq,ng,k1,k2,lam",
    [(0, 30, 120, 20, 6, 0.3), (1, 40, 150, 5, 1, 0.3), (2, 25, 90, 7, 3, 0.0), (3, 8, 12, 20, 6, 0.5)],
)
def test_matches_reference_on_random_inputs(reference, seed, nq, ng, k1, k2, lam):
    qf, gf, *_ = _clustered(seed, nq, ng)
    qg, qq, gg = (compute_distance_matrix(a, b).astype(np.float64) for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    ref = reference(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    ours = re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam, chunk_bytes=50_000)  # many chunks
    assert ours.shape == (nq, ng) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_matches_reference_on_unstructured_float32_distances(reference):
    # Random (non-metric, asymmetric) distances exercise the column-max normalisation and transposition.
    rng = np.random.default_rng(4)
    qg, qq, gg = (rng.random(s).astype(np.float32) * 3 for s in ((20, 70), (20, 20), (70, 70)))
    np.testing.assert_allclose(re_ranking(qg, qq, gg), reference(qg, qq, gg), atol=1e-5)


def test_features_entry_point_matches_reference_and_improves_map(reference):
    qf, gf, qp, gp, qc, gc = _clustered(5, 60, 300, dim=32, num_ids=40, noise=1.2)
    qg, qq, gg = (compute_distance_matrix(a, b).astype(np.float64) for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    ref = reference(qg, qq, gg)
    fast = re_ranking_features(qf, gf, chunk_bytes=100_000)
    # On well-separated random data the neighbour sets are identical, so the values agree closely.
    np.testing.assert_allclose(fast, ref, atol=1e-4)
    m_ref = evaluate_rank(ref, qp, gp, qc, gc)["mAP"]
    m_fast = evaluate_rank(fast, qp, gp, qc, gc)["mAP"]
    m_plain = evaluate_rank(qg, qp, gp, qc, gc)["mAP"]
    assert abs(m_fast - m_ref) < 1e-3
    assert m_fast > m_plain  # re-ranking helps on clustered data

    cos_ref = reference(*(compute_distance_matrix(a, b, "cosine") for a, b in ((qf, gf), (qf, qf), (gf, gf))))
    np.testing.assert_allclose(re_ranking_features(qf, gf, metric="cosine"), cos_ref, atol=1e-4)


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
# 32: the default; inf: every block side offers its entries below the thresholds, however many; 0: every
# off-diagonal block side offers its dense top k
@pytest.mark.parametrize("dense_above", [32, np.inf, 0])
def test_blocked_neighbour_pass_is_exact(monkeypatch, metric, dense_above):
    monkeypatch.setattr(neighbours, "_DENSE_ABOVE_PER_ROW", dense_above)
    qf, gf, *_ = _clustered(6, 37, 150, dim=24, num_ids=15)
    gf = gf[np.argsort(gf[:, 0])]  # sorted rows: neighbours bunch in a few blocks, thresholds start loose
    x = np.concatenate([qf, gf]).astype(np.float64)
    if metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        full = 1.0 - x @ x.T
    else:
        full = ((x[:, None] - x[None]) ** 2).sum(-1)
    qg = np.full((37, 150), np.nan, np.float32)
    nb, _ = neighbours.all_knn([qf, gf], 21, metric, block_rows=16, num_q=37, qg_out=qg)  # 3 + 10 blocks
    idx = nb.index.numpy()
    assert idx.shape == (187, 21) and (idx >= 0).all()
    assert all(len(set(row)) == 21 for row in idx)  # no neighbour twice
    # the k nearest (up to float32 rounding of near-ties), nearest first, with their distances
    got = np.take_along_axis(full, idx, 1)
    np.testing.assert_allclose(got, np.sort(full, 1)[:, :21], atol=1e-4)
    np.testing.assert_allclose(nb.dist.numpy(), got, atol=1e-4)
    np.testing.assert_allclose(nb.row_max.numpy(), full.max(1), rtol=1e-5)
    np.testing.assert_allclose(qg, full[:37, 37:], atol=1e-4)  # every query x gallery cell written


def test_neighbour_pass_merges_early_when_candidates_pile_up(monkeypatch):
    # An outlier query (its own block bounds its k-th neighbour loosely, so it offers most of every other
    # block) and a tiny pending limit: candidates are merged many times on the way, each merge tightening
    # the thresholds. The result is still exact.
    monkeypatch.setattr(neighbours, "_DENSE_ABOVE_PER_ROW", np.inf)
    monkeypatch.setattr(neighbours, "_PENDING_LIMIT", 500)
    flushes = []
    flush = neighbours._TopK.flush
    monkeypatch.setattr(neighbours._TopK, "flush", lambda self: (flushes.append(self._pending), flush(self)))
    qf, gf, *_ = _clustered(7, 37, 300, dim=24, num_ids=15)
    qf[3] += 6.0
    gf = gf[np.argsort(gf[:, 0])]
    nb, _ = neighbours.all_knn([qf, gf], 21, "sqeuclidean", block_rows=64, num_q=37)
    assert len(flushes) > 3
    x = np.concatenate([qf, gf]).astype(np.float64)
    full = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.testing.assert_allclose(np.take_along_axis(full, nb.index.numpy(), 1), np.sort(full, 1)[:, :21], atol=1e-4)
    np.testing.assert_allclose(nb.row_max.numpy(), full.max(1), rtol=1e-5)


def test_features_entry_point_is_the_dense_one_on_computed_distances():
    # re_ranking_features makes its distances exactly as compute_distance_matrix does (no centring, same
    # addmm and norms), so on features far from the origin -- where the float32 |x|^2 + |y|^2 - 2xy
    # rounding decides near-ties -- it ranks every neighbour list as the dense path given those
    # matrices, and the results agree to float32 rounding, not just in mAP.
    qf, gf, qp, gp, qc, gc = _clustered(9, 150, 900, dim=64, num_ids=60, noise=1.5)
    qf, gf = qf + 30.0, gf + 30.0  # far from the origin (like pooled ReLU features): |x|^2 >> distances
    qg, qq, gg = (compute_distance_matrix(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    dense = re_ranking(qg, qq, gg)
    fast = re_ranking_features(qf, gf, chunk_bytes=1_000_000)  # several blocks of each kind
    np.testing.assert_allclose(fast, dense, atol=1e-5)  # the centred distances of before: 0.055 apart
    assert evaluate_rank(fast, qp, gp, qc, gc)["mAP"] == evaluate_rank(dense, qp, gp, qc, gc)["mAP"]


def test_bad_input(reference):
    rng = np.random.default_rng(0)
    qg, qq, gg = rng.random((3, 5)), rng.random((3, 3)), rng.random((5, 5))
    with pytest.raises(ValueError, match="q_q_dist must have shape \\(3, 3\\)"):
        re_ranking(qg, qq[:2], gg)
    with pytest.raises(ValueError, match="g_g_dist must have shape \\(5, 5\\)"):
        re_ranking(qg, qq, gg[:, :4])
    bad = qg.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="q_g_dist has 1 non-finite"):
        re_ranking(bad, qq, gg)
    with pytest.raises(ValueError, match="q_g_dist must be a 2-D"):
        re_ranking(qg[0], qq, gg)
    with pytest.raises(ValueError, match="k1"):
        re_ranking(qg, qq, gg, k1=0)
    with pytest.raises(ValueError, match="lambda_value"):
        re_ranking(qg, qq, gg, lambda_value=1.5)
    with pytest.raises(ValueError, match="qf has feature dim 4 but gf has 3"):
        re_ranking_features(rng.random((3, 4)), rng.random((5, 3)))
    with pytest.raises(ValueError, match="gf has non-finite"):
        re_ranking_features(rng.random((3, 4)), np.full((5, 4), np.inf))
    with pytest.raises(ValueError, match="metric"):
        re_ranking_features(rng.random((3, 4)), rng.random((5, 4)), metric="hamming")
