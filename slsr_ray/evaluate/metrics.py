"""CMC / mAP / mINP under the Market-1501 rules, vectorised and batched over queries.

Why no sort: every metric only needs the rank of each *positive* gallery entry among the kept gallery
(CMC: the first positive's rank; AP: mean of ``j / rank_j``; INP: ``#positives / rank_last``). A
positive's rank is the number of kept negatives ranked before it plus the positives before it, so per
query we sort the (few) positive distances and place every negative between them with a batched
``searchsorted`` -- O(G log P) per query instead of the O(G log G) full argsort that torchreid does,
and no Python loop over queries or gallery.

Tie rule: entries with equal distance are ordered by gallery index (what a *stable* argsort gives).
torchreid's ``np.argsort`` uses an unstable quicksort, so on exact ties its numbers depend on numpy's
sort internals; without ties the two agree to float precision.

Short galleries: torchreid's Python ``eval_market1501`` keeps ``cmc[:max_rank]`` per query, so when
fewer than ``max_rank`` gallery entries survive the same-id-same-camera filter its per-query curves
are ragged (recent numpy raises "inhomogeneous shape"; torchreid's Cython code reads stale memory).
It also shortens the curve to ``num_gallery`` when the whole gallery is smaller than ``max_rank``.
Here the curve always has ``max_rank`` entries and a valid query's curve stays at its last value (1:
it has been matched) past the end of its kept gallery -- "pad with the last value".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

# Bytes of scratch per (query, gallery) cell in one batch (distances, masks, int64 bucket indices).
_BYTES_PER_CELL = 24
DEFAULT_BATCH_BYTES = 64 * 1024**2
# Query x gallery distances made per GEMM by evaluate_features (large blocks keep the GEMM efficient).
DEFAULT_BLOCK_BYTES = 256 * 1024**2

METRICS = ("euclidean", "sqeuclidean", "cosine")


# ----------------------------------------------------------------------------------------------- checks
def _as_1d_int(name: str, values, expected_len: int | None = None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer ids, got shape {arr.shape}")
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    if expected_len is not None and len(arr) != expected_len:
        raise ValueError(f"{name} has length {len(arr)}, expected {expected_len} (to match the distance matrix)")
    return arr.astype(np.int64, copy=False)


def _check_max_rank(max_rank: int) -> int:
    if not isinstance(max_rank, int | np.integer) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    return int(max_rank)


def check_distmat(distmat, name: str = "distmat") -> np.ndarray:
    """Return ``distmat`` as a 2-D float array; ValueError naming it when not 2-D, empty or not finite."""
    arr = np.asarray(distmat)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (num_query, num_gallery) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); need at least one query and one gallery entry")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name} has {bad} non-finite (NaN/inf) entries; distances must be finite")
    return arr


def check_features(features, name: str) -> np.ndarray:
    """Return ``features`` as a C-contiguous float32 (n, d) array; ValueError naming it otherwise."""
    arr = np.asarray(features)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (num_images, feature_dim) array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not arr.flags.writeable:  # e.g. pyarrow's zero-copy to_numpy(): torch.from_numpy warns on those
        arr = arr.copy()
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite (NaN/inf) values")
    return arr


# ------------------------------------------------------------------------------------------- core maths
@dataclass
class _PositiveRanks:
    """Zero-based ranks (among kept gallery) of each query's positives, padded; count per query."""

    ranks: torch.Tensor  # (B, P) int64, ascending per row; entries >= count are padding
    count: torch.Tensor  # (B,) int64


class _GalleryIndex:
    """Gallery entries grouped by pid, so a query's same-pid entries come without a (B, G) comparison."""

    def __init__(self, g_pids: np.ndarray, g_cams: np.ndarray):
        self.order = np.argsort(g_pids, kind="stable")  # gallery index ascending within a pid
        self.sorted_pids = g_pids[self.order]
        self.g_cams = g_cams
        self.size = len(g_pids)

    def same_pid(self, q_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, gallery col) of every gallery entry sharing the query's pid, row-major, cols ascending."""
        lo = np.searchsorted(self.sorted_pids, q_pids, side="left")
        counts = np.searchsorted(self.sorted_pids, q_pids, side="right") - lo
        total = int(counts.sum())
        rows = np.repeat(np.arange(len(q_pids)), counts)
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        return rows, self.order[np.repeat(lo, counts) + within]


def _positive_ranks(dist: torch.Tensor, q_pids: np.ndarray, q_cams: np.ndarray,
                    gallery: _GalleryIndex) -> _PositiveRanks:
    """Rank of every valid match for a batch of queries (see module docstring for the method)."""
    b, g = dist.shape
    same_rows, same_cols = gallery.same_pid(q_pids)
    is_pos = gallery.g_cams[same_cols] != q_cams[same_rows]  # same pid, other camera; else junk
    rows, cols = torch.from_numpy(same_rows[is_pos]), torch.from_numpy(same_cols[is_pos])
    same_rows, same_cols = torch.from_numpy(same_rows), torch.from_numpy(same_cols)
    count = torch.bincount(rows, minlength=b)
    p = int(count.max()) if rows.numel() else 0
    if p == 0:
        return _PositiveRanks(torch.zeros((b, 0), dtype=torch.int64), count)

    # Positive distances and gallery indices packed into (B, P), padded with +inf / G.
    starts = torch.cumsum(count, 0) - count
    slot = torch.arange(rows.numel()) - starts[rows]
    pos_d = torch.full((b, p), float("inf"), dtype=dist.dtype)
    pos_i = torch.full((b, p), g, dtype=torch.int64)
    pos_d[rows, slot] = dist[rows, cols]
    pos_i[rows, slot] = cols
    pos_d, order = torch.sort(pos_d, dim=1, stable=True)  # stable keeps (distance, index) order
    pos_i = torch.gather(pos_i, 1, order)

    # Bucket of each gallery entry = number of positives with a smaller distance.
    bucket = torch.searchsorted(pos_d, dist.contiguous(), right=False, out_int32=True)
    # Exact ties of a negative with a positive: the positive goes first only if its gallery index is
    # smaller. (A bucket past the row's positives points at +inf padding or a smaller distance.)
    tie = torch.gather(pos_d, 1, bucket.clamp_max(p - 1).long()) == dist
    tie[same_rows, same_cols] = False  # only negatives
    if bool(tie.any()):
        t_rows, t_cols = tie.nonzero(as_tuple=True)
        d = dist[t_rows, t_cols]
        ahead = (pos_d[t_rows] == d[:, None]) & (pos_i[t_rows] < t_cols[:, None])
        bucket[t_rows, t_cols] += ahead.sum(1).to(torch.int32)

    # Histogram of negatives per bucket (positives and junk go to a discarded bin), cumulated.
    bucket[same_rows, same_cols] = p + 1
    bucket += (torch.arange(b, dtype=torch.int32) * (p + 2))[:, None]
    hist = torch.bincount(bucket.view(-1), minlength=b * (p + 2)).reshape(b, p + 2)
    negatives_before = torch.cumsum(hist[:, :p], 1)
    ranks = negatives_before + torch.arange(p)[None, :]
    return _PositiveRanks(ranks, count)


class _Accumulator:
    """Collects per-query first-match rank, AP and INP across batches."""

    def __init__(self, max_rank: int):
        self.max_rank = max_rank
        self.first_hits = np.zeros(max_rank + 1, dtype=np.int64)  # last bin: first match beyond max_rank
        self.ap: list[np.ndarray] = []
        self.inp: list[np.ndarray] = []
        self.num_queries = 0

    def add(self, pr: _PositiveRanks) -> None:
        self.num_queries += int(pr.count.numel())
        valid = pr.count > 0
        if not bool(valid.any()):
            return
        ranks = pr.ranks[valid].to(torch.float64)
        count = pr.count[valid]
        p = ranks.shape[1]
        in_row = torch.arange(p)[None, :] < count[:, None]
        precision = (torch.arange(1, p + 1, dtype=torch.float64)[None, :] / (ranks + 1)) * in_row
        self.ap.append((precision.sum(1) / count).numpy())
        last = torch.gather(ranks, 1, (count - 1)[:, None])[:, 0]
        self.inp.append((count.to(torch.float64) / (last + 1)).numpy())
        first = pr.ranks[valid][:, 0].clamp_max(self.max_rank).numpy()
        self.first_hits += np.bincount(first, minlength=self.max_rank + 1)

    def result(self) -> dict:
        num_valid = int(self.first_hits.sum())
        if num_valid == 0:
            raise ValueError(
                f"no query has a valid match in the gallery (all {self.num_queries} queries have no gallery "
                "entry with the same pid from another camera); check q_pids/g_pids/q_camids/g_camids"
            )
        cmc = np.cumsum(self.first_hits[: self.max_rank]) / num_valid
        ap = np.concatenate(self.ap)
        inp = np.concatenate(self.inp)
        return {
            "cmc": cmc.astype(np.float64),
            "mAP": float(ap.mean()),
            "mINP": float(inp.mean()),
            "num_valid_queries": num_valid,
            "num_queries": self.num_queries,
        }


def _batch_size(num_gallery: int, batch_bytes: int) -> int:
    return max(1, batch_bytes // (max(num_gallery, 1) * _BYTES_PER_CELL))


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  batch_bytes: int = DEFAULT_BATCH_BYTES) -> dict:
    """CMC, mAP and mINP of a query x gallery distance matrix under the Market-1501 rules.

    Gallery entries with the query's pid *and* camera are ignored; queries without any remaining match
    are skipped (``num_valid_queries`` counts the others). AP is non-interpolated (equal to torchreid's
    ``eval_market1501``), mINP as in the AGW paper (Ye et al. 2021). Returns a dict with ``cmc`` (numpy,
    fractions, length ``max_rank``), ``mAP``, ``mINP`` (fractions), ``num_valid_queries`` and
    ``num_queries``. Work is batched over queries so scratch memory stays under ``batch_bytes``.
    """
    distmat = check_distmat(distmat)
    num_q, num_g = distmat.shape
    q_pids = _as_1d_int("q_pids", q_pids, num_q)
    g_pids = _as_1d_int("g_pids", g_pids, num_g)
    q_camids = _as_1d_int("q_camids", q_camids, num_q)
    g_camids = _as_1d_int("g_camids", g_camids, num_g)
    max_rank = _check_max_rank(max_rank)

    def batches() -> Iterator[tuple[slice, torch.Tensor]]:
        step = _batch_size(num_g, batch_bytes)
        for start in range(0, num_q, step):
            sl = slice(start, min(start + step, num_q))
            yield sl, torch.tensor(distmat[sl])  # a copy: distmat may be read-only

    return _evaluate_batches(batches(), q_pids, g_pids, q_camids, g_camids, max_rank)


def _evaluate_batches(batches, q_pids, g_pids, q_camids, g_camids, max_rank) -> dict:
    gallery = _GalleryIndex(g_pids, g_camids)
    acc = _Accumulator(max_rank)
    for sl, dist in batches:
        acc.add(_positive_ranks(dist, q_pids[sl], q_camids[sl], gallery))
    return acc.result()


# ------------------------------------------------------------------------------------------ distances
def pairwise_distance(x: torch.Tensor, y: torch.Tensor, metric: str = "euclidean",
                      y_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Distances between rows of ``x`` and ``y``: ``euclidean``, ``sqeuclidean`` or ``cosine`` (1 - cos).
    ``y_sq``: the squared row norms of ``y`` when the caller has them (blocks against one gallery)."""
    if metric in ("euclidean", "sqeuclidean"):
        # |x|^2 - 2 x.y + |y|^2 with one (B, G) buffer, updated in place.
        d = torch.addmm((x * x).sum(1, keepdim=True), x, y.T, beta=1.0, alpha=-2.0)
        d.add_(((y * y).sum(1) if y_sq is None else y_sq)[None, :]).clamp_min_(0)
        return d.sqrt_() if metric == "euclidean" else d
    if metric == "cosine":
        xn = torch.nn.functional.normalize(x, dim=1)
        yn = torch.nn.functional.normalize(y, dim=1)
        return 1.0 - xn @ yn.T
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def compute_distance_matrix(qf, gf, metric: str = "euclidean") -> np.ndarray:
    """Dense float32 (num_query, num_gallery) distance matrix from feature arrays."""
    qf = check_features(qf, "qf")
    gf = check_features(gf, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf has feature dim {qf.shape[1]} but gf has {gf.shape[1]}")
    return pairwise_distance(torch.from_numpy(qf), torch.from_numpy(gf), metric).numpy()


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, metric: str = "euclidean",
                      max_rank: int = 50, batch_bytes: int = DEFAULT_BATCH_BYTES,
                      block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict:
    """Like :func:`evaluate_rank`, from query/gallery features. The query x gallery distances are made
    ``block_bytes`` at a time (one GEMM against the whole gallery, whose norms are computed once) and
    ranked ``batch_bytes`` of scratch at a time, so the full matrix is never held: at MSMT17 size
    (11,659 x 82,161) that is one 256 MB block instead of 3.8 GB."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    qf = check_features(qf, "qf")
    gf = check_features(gf, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf has feature dim {qf.shape[1]} but gf has {gf.shape[1]}")
    num_q, num_g = len(qf), len(gf)
    q_pids = _as_1d_int("q_pids", q_pids, num_q)
    g_pids = _as_1d_int("g_pids", g_pids, num_g)
    q_camids = _as_1d_int("q_camids", q_camids, num_q)
    g_camids = _as_1d_int("g_camids", g_camids, num_g)
    max_rank = _check_max_rank(max_rank)
    tq, tg = torch.from_numpy(qf), torch.from_numpy(gf)
    if metric == "cosine":  # normalise the gallery once, not once per block
        tq, tg, metric = torch.nn.functional.normalize(tq, dim=1), torch.nn.functional.normalize(tg, dim=1), "dot"
    g_sq = (tg * tg).sum(1) if metric != "dot" else None

    def batches():
        step = _batch_size(num_g, batch_bytes)
        block = max(step, (block_bytes // (4 * num_g)) // step * step)  # a multiple of the ranking batch
        for b0 in range(0, num_q, block):
            x = tq[b0 : b0 + block]
            dist = 1.0 - x @ tg.T if metric == "dot" else pairwise_distance(x, tg, metric, y_sq=g_sq)
            for start in range(0, len(x), step):
                yield slice(b0 + start, b0 + min(start + step, len(x))), dist[start : start + step]
            del dist

    return _evaluate_batches(batches(), q_pids, g_pids, q_camids, g_camids, max_rank)
