"""Dataset evaluation protocols on top of :func:`evaluate_rank`.

* Market-1501, DukeMTMC-reID, MSMT17, CUHK03 new protocol (767/700): single-query evaluation with the
  Market rules -- :func:`evaluate_rank` / :func:`evaluate_features` directly.
* Market-1501 multi-query: the query images of one identity in one camera are merged into one query by
  max- or average-pooling their features (Zheng et al., ICCV 2015) -- :func:`evaluate_multi_query`.
* CUHK03 old protocol (1367/100 split, 20 trials): single-shot CMC, one random gallery image per
  identity per query, repeated (torchreid's ``eval_cuhk03``) -- :func:`evaluate_cuhk03_single_shot`,
  with :func:`aggregate_trials` over the 20 splits.
* VIPeR: 10 random halves of the identities, camera A images as queries, camera B as gallery, mean and
  std -- :func:`random_half_splits`, :func:`evaluate_viper`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .metrics import (
    DEFAULT_BATCH_BYTES,
    _as_1d_int,
    _batch_size,
    _check_max_rank,
    check_distmat,
    check_features,
    evaluate_features,
    evaluate_rank,
)
from .results import RankResult

POOLING = ("max", "mean")


# ------------------------------------------------------------------------------------- multi-query
def pool_multi_query(qf, q_pids, q_camids, pool: str = "mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge query features of the same (pid, camera) into one by ``max`` or ``mean`` pooling.

    Returns ``(pooled_features, pids, camids)``, one row per distinct (pid, camera), sorted by pid then
    camera. To use Market-1501's extra multi-query images (``gt_bbox``), pass them stacked with the queries.
    """
    if pool not in POOLING:
        raise ValueError(f"pool must be one of {POOLING}, got {pool!r}")
    qf = check_features(qf, "qf")
    q_pids = _as_1d_int("q_pids", q_pids, len(qf))
    q_camids = _as_1d_int("q_camids", q_camids, len(qf))
    keys, group = np.unique(np.stack([q_pids, q_camids], 1), axis=0, return_inverse=True)
    group = torch.from_numpy(group.reshape(-1))
    src = torch.from_numpy(qf)
    index = group[:, None].expand_as(src)
    if pool == "mean":
        out = torch.zeros((len(keys), qf.shape[1]), dtype=torch.float32).index_add_(0, group, src)
        out /= torch.bincount(group, minlength=len(keys)).to(torch.float32)[:, None]
    else:
        out = torch.full((len(keys), qf.shape[1]), -torch.inf).scatter_reduce_(0, index, src, "amax")
    return out.numpy(), keys[:, 0].copy(), keys[:, 1].copy()


def evaluate_multi_query(qf, gf, q_pids, g_pids, q_camids, g_camids, pool: str = "mean",
                         metric: str = "euclidean", max_rank: int = 50) -> dict:
    """Market-1501 multi-query: pool queries per (pid, camera), then evaluate like single-query."""
    pooled, pids, cams = pool_multi_query(qf, q_pids, q_camids, pool)
    return evaluate_features(pooled, gf, pids, g_pids, cams, g_camids, metric=metric, max_rank=max_rank)


# ------------------------------------------------------------------------------- CUHK03 single-shot
def evaluate_cuhk03_single_shot(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                                num_repeats: int = 10, seed: int = 0,
                                batch_bytes: int = DEFAULT_BATCH_BYTES) -> dict:
    """CUHK03 old-protocol CMC: for each query and repeat, keep one random gallery image per identity.

    Same semantics as torchreid's ``eval_cuhk03`` (same-pid same-camera entries dropped first, a fresh
    sample per query and repeat, CMC averaged over repeats; mAP/mINP from the full ranking), vectorised
    over queries; the random draws differ from torchreid's, so curves agree in expectation. Unlike
    torchreid, the curve always has ``max_rank`` entries (padded with its last value).
    """
    if not isinstance(num_repeats, int) or num_repeats < 1:
        raise ValueError(f"num_repeats must be a positive integer, got {num_repeats!r}")
    full = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, batch_bytes)
    distmat = check_distmat(distmat)
    num_q, num_g = distmat.shape
    q_pids = torch.from_numpy(_as_1d_int("q_pids", q_pids, num_q))
    g_pids_np = _as_1d_int("g_pids", g_pids, num_g)
    q_cams = torch.from_numpy(_as_1d_int("q_camids", q_camids, num_q))
    g_cams = torch.from_numpy(_as_1d_int("g_camids", g_camids, num_g))
    max_rank = _check_max_rank(max_rank)
    uniq, pid_index = np.unique(g_pids_np, return_inverse=True)
    pid_index = torch.from_numpy(pid_index.reshape(-1))
    g_pids = torch.from_numpy(g_pids_np)
    gen = torch.Generator().manual_seed(seed)
    hits = np.zeros(max_rank + 1, dtype=np.int64)
    num_valid = 0
    g_idx = torch.arange(num_g)
    step = _batch_size(num_g, batch_bytes)
    for start in range(0, num_q, step):
        dist = torch.from_numpy(np.ascontiguousarray(distmat[start : start + step]))
        b = dist.shape[0]
        same_pid = q_pids[start : start + b, None] == g_pids[None, :]
        kept = ~(same_pid & (q_cams[start : start + b, None] == g_cams[None, :]))
        valid = (kept & same_pid).any(1)
        num_valid += int(valid.sum())
        index = pid_index[None, :].expand(b, num_g)
        for _ in range(num_repeats):
            # One random kept image per (query, identity): the one with the smallest random key.
            keys = torch.rand((b, num_g), generator=gen, dtype=torch.float64).masked_fill_(~kept, 2.0)
            min_key = torch.full((b, len(uniq)), 3.0, dtype=torch.float64).scatter_reduce_(1, index, keys, "amin")
            chosen = kept & (keys == torch.gather(min_key, 1, index))
            chosen_pos = chosen & same_pid  # exactly one per valid query
            pos_col = chosen_pos.to(torch.int8).argmax(1)
            pos_d = torch.gather(dist, 1, pos_col[:, None])
            before = chosen & ~same_pid & ((dist < pos_d) | ((dist == pos_d) & (g_idx[None, :] < pos_col[:, None])))
            first = before.sum(1)[valid].clamp_max(max_rank).numpy()
            hits += np.bincount(first, minlength=max_rank + 1)
    cmc = np.cumsum(hits[:max_rank]) / (num_valid * num_repeats)
    return {**full, "cmc": cmc, "num_repeats": num_repeats}


# --------------------------------------------------------------------------------- trials / VIPeR
def aggregate_trials(results: Sequence[dict | RankResult]) -> dict:
    """Mean over trials of CMC, mAP and mINP, with their (population) std in ``std``."""
    if not results:
        raise ValueError("results is empty; pass one evaluate_rank dict or RankResult per trial")
    rs = [r if isinstance(r, RankResult) else RankResult.from_metrics(r) for r in results]
    lengths = {len(r.cmc) for r in rs}
    if len(lengths) != 1:
        raise ValueError(f"results have CMC curves of different lengths {sorted(lengths)}; use one max_rank")
    cmc = np.stack([r.cmc for r in rs])
    m_ap = np.array([r.mAP for r in rs])
    m_inp = np.array([r.mINP for r in rs])
    return {
        "cmc": cmc.mean(0),
        "mAP": float(m_ap.mean()),
        "mINP": float(m_inp.mean()),
        "num_valid_queries": int(np.mean([r.num_valid_queries for r in rs])),
        "num_trials": len(rs),
        "std": {"cmc": cmc.std(0), "mAP": float(m_ap.std()), "mINP": float(m_inp.std())},
        "trials": [{"R1": float(r.cmc[0]), "mAP": r.mAP, "mINP": r.mINP} for r in rs],
    }


def random_half_splits(pids, trials: int = 10, seed: int = 0) -> list[np.ndarray]:
    """``trials`` random halves of the distinct identities in ``pids`` (the test ids of each VIPeR trial)."""
    uniq = np.unique(_as_1d_int("pids", pids))
    if len(uniq) < 2:
        raise ValueError(f"pids needs at least 2 distinct identities to split in halves, got {len(uniq)}")
    rng = np.random.default_rng(seed)
    return [np.sort(rng.permutation(uniq)[: len(uniq) // 2]) for _ in range(trials)]


def evaluate_viper(features, pids, camids, trials: int = 10, seed: int = 0, metric: str = "euclidean",
                   max_rank: int = 50, test_splits: Sequence[np.ndarray] | None = None) -> dict:
    """VIPeR protocol: per trial, the test half's camera-A images query its camera-B images.

    ``camids`` must hold two cameras (the smaller id is camera A). ``test_splits`` overrides the random
    halves (e.g. the ids a trained model did not see). Returns :func:`aggregate_trials` of the trials.
    """
    features = check_features(features, "features")
    pids = _as_1d_int("pids", pids, len(features))
    camids = _as_1d_int("camids", camids, len(features))
    cams = np.unique(camids)
    if len(cams) != 2:
        raise ValueError(f"camids must hold exactly two cameras for VIPeR, got {cams.tolist()}")
    splits = test_splits if test_splits is not None else random_half_splits(pids, trials, seed)
    results = []
    for test_ids in splits:
        in_test = np.isin(pids, test_ids)
        q = in_test & (camids == cams[0])
        g = in_test & (camids == cams[1])
        results.append(evaluate_features(features[q], features[g], pids[q], pids[g], camids[q], camids[g],
                                         metric=metric, max_rank=max_rank))
    return aggregate_trials(results)
