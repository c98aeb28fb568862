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

:func:`evaluate_split` scores one trial the way a protocol of :mod:`slsr_ray.data.protocols` asks
(``market``, ``multi_query`` or ``single_shot``), with and without re-ranking; the pipeline and
``slsr evaluate`` both use it, and :func:`aggregate_trials` averages the trials.
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
    compute_distance_matrix,
    evaluate_features,
    evaluate_rank,
)
from .results import RankResult

POOLING = ("max", "mean")


# ------------------------------------------------------------------------------------- multi-query
def pool_multi_query(qf, q_pids, q_camids, pool: str = "mean", extra=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge query features of the same (pid, camera) into one by ``max`` or ``mean`` pooling.

    ``extra`` = ``(features, pids, camids)`` adds more images per query group: Market-1501's
    ``gt_bbox/`` images (``ReidDataset.multi_query``); rows whose (pid, camera) has no query are
    ignored. Returns ``(pooled_features, pids, camids)``, one row per distinct query (pid, camera),
    sorted by pid then camera.
    """
    if pool not in POOLING:
        raise ValueError(f"pool must be one of {POOLING}, got {pool!r}")
    qf = check_features(qf, "qf")
    q_pids = _as_1d_int("q_pids", q_pids, len(qf))
    q_camids = _as_1d_int("q_camids", q_camids, len(qf))
    if extra is not None:
        qf, q_pids, q_camids = _with_extra(qf, q_pids, q_camids, *extra)
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


def _with_extra(qf, q_pids, q_camids, ef, e_pids, e_camids):
    ef = check_features(ef, "extra features") if len(ef) else np.zeros((0, qf.shape[1]), np.float32)
    if ef.shape[1] != qf.shape[1]:
        raise ValueError(f"extra features have dimension {ef.shape[1]}, queries {qf.shape[1]}")
    e_pids = _as_1d_int("extra pids", e_pids, len(ef))
    e_camids = _as_1d_int("extra camids", e_camids, len(ef))
    groups = {(int(p), int(c)) for p, c in zip(q_pids, q_camids, strict=True)}
    keep = np.array([(int(p), int(c)) in groups for p, c in zip(e_pids, e_camids, strict=True)], dtype=bool)
    return (np.concatenate([qf, ef[keep]]), np.concatenate([q_pids, e_pids[keep]]),
            np.concatenate([q_camids, e_camids[keep]]))


def evaluate_multi_query(qf, gf, q_pids, g_pids, q_camids, g_camids, pool: str = "mean",
                         metric: str = "euclidean", max_rank: int = 50, extra=None) -> dict:
    """Market-1501 multi-query: pool queries (and ``extra`` gt_bbox images) per (pid, camera), then
    evaluate like single-query."""
    pooled, pids, cams = pool_multi_query(qf, q_pids, q_camids, pool, extra=extra)
    return evaluate_features(pooled, gf, pids, g_pids, cams, g_camids, metric=metric, max_rank=max_rank)


# ------------------------------------------------------------------------------ one trial of a protocol
SINGLE_SHOT_REPEATS = 10  # torchreid's eval_cuhk03 default


def evaluate_split(evaluation: str, qf, gf, q_pids, g_pids, q_camids, g_camids, *, metric: str = "euclidean",
                   max_rank: int = 50, multi_query=None, rerank: dict | None = None, seed: int = 0) -> dict:
    """Score one train/test split: ``{"plain": metrics, "rerank": metrics}`` (``rerank`` only when
    ``rerank`` holds the k1/k2/lambda_value of :func:`re_ranking_features`).

    ``evaluation``: ``market`` (every gallery image, Market rules), ``single_shot`` (CUHK03 classic: one
    random gallery image per identity, :data:`SINGLE_SHOT_REPEATS` draws seeded by ``seed``) or
    ``multi_query`` (queries mean-pooled per (id, camera) with the ``multi_query`` = ``(features, pids,
    camids)`` gt_bbox images; also returns the single-query scores as ``single_query`` /
    ``single_query_rerank``).
    """
    from .rerank import re_ranking_features

    if evaluation not in ("market", "multi_query", "single_shot"):
        raise ValueError(f"evaluation must be 'market', 'multi_query' or 'single_shot', got {evaluation!r}")
    ids = (np.asarray(q_pids), np.asarray(g_pids), np.asarray(q_camids), np.asarray(g_camids))

    def score(q, q_ids, suffix: str) -> dict:
        out = {}
        args = (q_ids[0], ids[1], q_ids[1], ids[3])
        if evaluation == "single_shot":
            dist = compute_distance_matrix(q, gf, metric)
            out[f"plain{suffix}"] = evaluate_cuhk03_single_shot(
                dist, *args, max_rank=max_rank, num_repeats=SINGLE_SHOT_REPEATS, seed=seed)
        else:
            out[f"plain{suffix}"] = evaluate_features(q, gf, *args, metric=metric, max_rank=max_rank)
        if rerank is not None:
            dist = re_ranking_features(q, gf, metric=metric, **rerank)
            if evaluation == "single_shot":
                out[f"rerank{suffix}"] = evaluate_cuhk03_single_shot(
                    dist, *args, max_rank=max_rank, num_repeats=SINGLE_SHOT_REPEATS, seed=seed)
            else:
                out[f"rerank{suffix}"] = evaluate_rank(dist, *args, max_rank=max_rank)
        return out

    if evaluation != "multi_query":
        return score(qf, (ids[0], ids[2]), "")
    if multi_query is None:
        raise ValueError("the multi_query evaluation needs multi_query=(features, pids, camids) of the gt_bbox images")
    pooled, p_pids, p_cams = pool_multi_query(qf, ids[0], ids[2], "mean", extra=multi_query)
    results = score(pooled, (p_pids, p_cams), "")
    single = score(qf, (ids[0], ids[2]), "")
    results.update({("single_query" if k == "plain" else "single_query_rerank"): v for k, v in single.items()})
    return results


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
    """The test halves of ``trials`` VIPeR splits of the distinct identities in ``pids``: exactly the
    ids that :func:`slsr_ray.data.load_viper` with the same ``seed`` leaves out of split *i*'s training
    half (the complement of its floor(n/2) training ids)."""
    from ..data.datasets import make_viper_splits

    uniq = np.unique(_as_1d_int("pids", pids))
    if len(uniq) < 2:
        raise ValueError(f"pids needs at least 2 distinct identities to split in halves, got {len(uniq)}")
    return [np.asarray(s["test"], dtype=np.int64) for s in make_viper_splits(uniq.tolist(), seed, trials)]


def evaluate_viper(features, pids, camids, *, trained_on: Sequence[int], trials: int = 10, seed: int = 0,
                   metric: str = "euclidean", max_rank: int = 50,
                   test_splits: Sequence[np.ndarray] | None = None) -> dict:
    """VIPeR protocol: per trial, the test half's camera-A images query its camera-B images.

    ``camids`` must hold two cameras (the smaller id is camera A). The halves are
    :func:`random_half_splits` (those of ``load_viper`` for ``seed``) unless ``test_splits`` is given.
    ``trained_on`` lists the ids the model saw in training (empty for a model trained on other data):
    a test half holding any of them is refused, since one model trained on split *i* has seen most of
    split *j*'s test ids -- train one model per trial (``slsr run`` with ``evaluate.trials``) and pass
    each its own split's half. Returns :func:`aggregate_trials` of the trials.
    """
    features = check_features(features, "features")
    pids = _as_1d_int("pids", pids, len(features))
    camids = _as_1d_int("camids", camids, len(features))
    cams = np.unique(camids)
    if len(cams) != 2:
        raise ValueError(f"camids must hold exactly two cameras for VIPeR, got {cams.tolist()}")
    splits = test_splits if test_splits is not None else random_half_splits(pids, trials, seed)
    seen = set(_as_1d_int("trained_on", trained_on).tolist()) if len(trained_on) else set()
    for i, test_ids in enumerate(splits):
        leaked = sorted(seen.intersection(np.asarray(test_ids).tolist()))
        if leaked:
            raise ValueError(
                f"trial {i}'s test half holds {len(leaked)} identities the model was trained on "
                f"(e.g. {leaked[:5]}); evaluate each trial with a model trained on that trial's split"
            )
    results = []
    for test_ids in splits:
        in_test = np.isin(pids, test_ids)
        q = in_test & (camids == cams[0])
        g = in_test & (camids == cams[1])
        results.append(evaluate_features(features[q], features[g], pids[q], pids[g], camids[q], camids[g],
                                         metric=metric, max_rank=max_rank))
    return aggregate_trials(results)
