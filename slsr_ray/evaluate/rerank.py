"""k-reciprocal encoding re-ranking (Zhong et al., CVPR 2017), exact and memory-bounded.

Two entry points share one sparse pipeline:

* :func:`re_ranking` takes the three distance blocks like the original code (torchreid's
  ``utils/rerank.py``) and returns the same q x g matrix (float32, to ~1e-6).
* :func:`re_ranking_features` takes features and never builds an (N x N) matrix, N = q + g.

What the reference does, with N = q + g:
  1. ``original[i, j] = D[j, i]**2 / max_k D[k, i]**2`` (the stacked distance, squared, each column
     divided by its max, transposed) and ``initial_rank = argsort(original)`` -- a dense N x N sort.
  2. R(i): the k1+1 nearest j of i that also have i among their k1+1 nearest; expand R(i) with the
     half-size sets R_half(c), c in R(i), that overlap R(i) by more than 2/3.
  3. ``V[i, E(i)] = softmax(-original[i, E(i)])``; query expansion ``V[i] = mean(V[top-k2 of i])``.
  4. Jaccard distance ``1 - s / (2 - s)``, ``s = sum_k min(V[i, k], V[j, k])``, query rows x gallery
     columns; ``final = (1 - lambda) * jaccard + lambda * original``.

Here: only the top max(k1+1, k2) neighbours of each row are kept (``torch.topk`` per chunk of rows), R,
R_half and the expansion test are batched array ops over chunks of rows, V is a scipy CSR matrix
(about 30-150 non-zeros per row), query expansion is one sparse product, and the Jaccard sum of minima
is formed pair-wise (query non-zero x gallery rows sharing that column) in chunks and scattered into the
q x g output. Memory for the feature entry point, N = q + g, d = feature dim, c = chunk rows:

  features N*d*4  +  top-k N*(k1+1)*8  +  V (CSR, ~N*200*8)  +  O(chunk_bytes) scratch  +  output q*g*4.

MSMT17 (11,659 x 82,161, N = 93,820, d = 2048), estimated from that formula (not run here): 0.77 GB
features + 16 MB top-k + ~0.15 GB V + ~0.3 GB scratch (default chunk_bytes 64 MB) + 3.8 GB float32
output, about 5 GB peak, where the reference's N x N float32 matrices are 35 GB each. Compute is one
pass over the N x N distances (top-k and row max together) plus one q x g pass: ~4e13 flops at d = 2048,
about 10 minutes on a 2-core CPU, seconds on a GPU (``device``).

The feature entry point makes every distance exactly as ``compute_distance_matrix`` does (the same
``addmm`` and norms, see neighbours.py), squares it as the reference squares its float32 input (square
root, then square), and uses ``original = that / row max`` (for a symmetric distance the row max equals
the reference's column max). Its neighbour lists are therefore those of the reference given
``compute_distance_matrix``'s three matrices; the only departure is that each pair's distance is made
once, for both rows (the reference's q x q and g x g matrices differ from their transposes in the last
bit for a few per cent of pairs), and that does not change a top-k set at the benchmark sizes: mAP and
CMC are identical (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from .metrics import check_distmat, check_features
from .neighbours import all_knn

DEFAULT_CHUNK_BYTES = 64 * 1024**2
RowFn = Callable[[int, int], torch.Tensor]
PairFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _check_params(k1: int, k2: int, lambda_value: float) -> None:
    if not isinstance(k1, int | np.integer) or k1 < 1:
        raise ValueError(f"k1 must be a positive integer, got {k1!r}")
    if not isinstance(k2, int | np.integer) or k2 < 1:
        raise ValueError(f"k2 must be a positive integer, got {k2!r}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")


# ---------------------------------------------------------------------------------- neighbour search
def _topk_rows(row_fn: RowFn, n: int, k: int, chunk: int) -> np.ndarray:
    """Indices of the k smallest entries of every row, nearest first (``row_fn(a, b)`` gives rows a..b)."""
    out = np.empty((n, k), dtype=np.int64)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        out[a:b] = torch.topk(row_fn(a, b), k, dim=1, largest=False, sorted=True).indices.cpu().numpy()
    return out


def _reciprocal_mask(rank: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """mask[i, m] = rank[i, m] is a k-reciprocal neighbour of i (i is among its own k nearest)."""
    n = len(rank)
    fwd = rank[:, :k]
    mask = np.empty((n, k), dtype=bool)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        back = fwd[fwd[a:b]]  # (c, k, k)
        mask[a:b] = (back == np.arange(a, b)[:, None, None]).any(-1)
    return mask


def _expansion_pairs(rank: np.ndarray, k1: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) pairs of the expanded k-reciprocal sets E(i), sorted and unique per row."""
    n = len(rank)
    k = min(k1 + 1, n)
    kh = min(int(np.around(k1 / 2.0)) + 1, n)
    rec = _reciprocal_mask(rank, k, chunk)
    rec_half = _reciprocal_mask(rank, kh, chunk)
    fwd, fwd_half = rank[:, :k], rank[:, :kh]
    keys = []
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        cand, cand_ok = fwd[a:b], rec[a:b]  # R(i) = cand[cand_ok]
        half, half_ok = fwd_half[cand], rec_half[cand]  # R_half(c) for every candidate c: (c, k, kh)
        in_r = ((half[..., None] == cand[:, None, None, :]) & cand_ok[:, None, None, :]).any(-1)
        overlap = (in_r & half_ok).sum(-1)
        take = cand_ok & (overlap > 2.0 / 3 * half_ok.sum(-1))
        rows = np.arange(a, b, dtype=np.int64)
        base_key = rows[:, None] * n + cand
        half_key = rows[:, None, None] * n + half
        keys.append(np.unique(np.concatenate([base_key[cand_ok], half_key[take[..., None] & half_ok]])))
    key = np.concatenate(keys)
    return key // n, key % n


def _encode(rank: np.ndarray, pair_fn: PairFn, k1: int, k2: int, chunk: int) -> sp.csr_matrix:
    """The k-reciprocal feature V (N x N CSR, float32), after query expansion when k2 > 1."""
    n = len(rank)
    rows, cols = _expansion_pairs(rank, k1, chunk)
    weight = np.exp(-pair_fn(rows, cols)).astype(np.float32)
    row_sum = np.bincount(rows, weights=weight, minlength=n).astype(np.float32)
    v = sp.csr_matrix((weight / row_sum[rows], (rows, cols)), shape=(n, n), dtype=np.float32)
    if k2 != 1:
        k2 = min(k2, n)
        qe = sp.csr_matrix(
            (np.full(n * k2, 1.0 / k2, dtype=np.float32),
             (np.repeat(np.arange(n), k2), rank[:, :k2].reshape(-1))),
            shape=(n, n), dtype=np.float32,
        )
        v = (qe @ v).tocsr()
    v.sort_indices()
    return v


def _jaccard_rows(v: sp.csr_matrix, num_q: int, pair_budget: int, max_rows: int):
    """Yield (row slice, Jaccard distance float32 (rows, g)) of query rows vs gallery rows of V."""
    n = v.shape[0]
    g = n - num_q
    vg = v[num_q:].tocsc()  # column k -> gallery rows holding it
    col_nnz = np.diff(vg.indptr)
    vq = v[:num_q]
    # Pairs each query row will expand to: sum over its non-zero columns of that column's gallery nnz.
    per_query = np.bincount(np.repeat(np.arange(num_q), np.diff(vq.indptr)), weights=col_nnz[vq.indices],
                            minlength=num_q).astype(np.int64)
    a = 0
    while a < num_q:
        # Grow the chunk of queries until its pair count reaches the budget (always >= 1 query).
        cum = np.cumsum(per_query[a:])
        b = a + max(1, int(np.searchsorted(cum, pair_budget, side="right")))
        b = min(b, a + max_rows, num_q)  # also bound the dense (rows, g) sums
        sub = vq[a:b]
        nnz_rows = np.repeat(np.arange(b - a), np.diff(sub.indptr))
        ks, vals = sub.indices, sub.data
        counts = col_nnz[ks]
        total = int(counts.sum())
        if total:
            offsets = np.repeat(vg.indptr[ks] - (np.cumsum(counts) - counts), counts) + np.arange(total)
            j = vg.indices[offsets]
            contrib = np.minimum(np.repeat(vals, counts), vg.data[offsets])
            flat = np.repeat(nnz_rows, counts) * g + j
            s = np.bincount(flat, weights=contrib, minlength=(b - a) * g).astype(np.float32).reshape(b - a, g)
        else:
            s = np.zeros((b - a, g), dtype=np.float32)
        yield slice(a, b), 1 - s / (2.0 - s)
        a = b


def _rerank_core(rank: np.ndarray, pair_fn: PairFn, qg_fn: RowFn, num_q: int, k1: int, k2: int,
                 lambda_value: float, chunk_bytes: int, out: np.ndarray | None = None) -> np.ndarray:
    """Steps 2-4 of the module docstring, given each row's nearest neighbours ``rank`` (N x k).
    ``out``: the (q, g) float32 result buffer (``qg_fn`` may read a chunk's rows from it first)."""
    n = len(rank)
    g = n - num_q
    # (c, k1+1, k1/2+1, k1+1) booleans in the expansion test dominate the per-row scratch.
    v = _encode(rank, pair_fn, k1, k2, max(1, chunk_bytes // (8 * (k1 + 1) ** 2 * (k1 // 2 + 2))))
    del rank
    if out is None:
        out = np.empty((num_q, g), dtype=np.float32)
    for sl, jac in _jaccard_rows(v, num_q, pair_budget=max(1 << 16, chunk_bytes // 64),
                                 max_rows=max(1, chunk_bytes // (16 * g))):
        orig = qg_fn(sl.start, sl.stop).cpu().numpy()
        out[sl] = jac * np.float32(1 - lambda_value) + orig * np.float32(lambda_value)
    return out


def _chunk_rows(n: int, chunk_bytes: int) -> int:
    return max(1, min(n, chunk_bytes // (max(n, 1) * 16)))


# ----------------------------------------------------------------------------------------- dense API
def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """k-reciprocal re-ranking of a query x gallery distance matrix (same output as the original code).

    ``q_g_dist`` (q, g), ``q_q_dist`` (q, q), ``g_g_dist`` (g, g) are distances (the code squares them,
    like the reference). Returns the re-ranked (q, g) float32 distance. Memory beyond the inputs is the
    output plus O(chunk) scratch -- no (q+g)^2 matrices; ties between equal distances may order differently
    from the reference's unstable argsort.
    """
    # Long because the published k-reciprocal algorithm, kept step for step comparable with the reference code.
    _check_params(k1, k2, lambda_value)
    q_g = check_distmat(q_g_dist, "q_g_dist")
    q_q = check_distmat(q_q_dist, "q_q_dist")
    g_g = check_distmat(g_g_dist, "g_g_dist")
    num_q, num_g = q_g.shape
    if q_q.shape != (num_q, num_q):
        raise ValueError(f"q_q_dist must have shape ({num_q}, {num_q}) to match q_g_dist, got {q_q.shape}")
    if g_g.shape != (num_g, num_g):
        raise ValueError(f"g_g_dist must have shape ({num_g}, {num_g}) to match q_g_dist, got {g_g.shape}")
    n = num_q + num_g

    def sq(x: np.ndarray) -> np.ndarray:  # as the reference: square in the input dtype, then float32
        return np.power(x, 2).astype(np.float32)

    def abs_max(x: np.ndarray, axis: int) -> np.ndarray:  # max |x| without an |x| copy
        return np.maximum(x.max(axis), -x.min(axis))

    # Column max of the stacked squared matrix [[qq, qg], [qg^T, gg]]; squaring is monotone in |x|.
    col_max = sq(np.concatenate([
        np.maximum(abs_max(q_q, 0), abs_max(q_g, 1)),
        np.maximum(abs_max(q_g, 0), abs_max(g_g, 0)),
    ]))

    def rows(a: int, b: int) -> torch.Tensor:
        # Row i of the reference's ``original`` = column i of the stacked matrix / its max.
        parts = []
        if a < num_q:
            qa, qb = a, min(b, num_q)
            parts.append(np.concatenate([sq(q_q[:, qa:qb]).T, sq(q_g[qa:qb])], axis=1))
        if b > num_q:
            ga, gb = max(a, num_q) - num_q, b - num_q
            parts.append(np.concatenate([sq(q_g[:, ga:gb]).T, sq(g_g[:, ga:gb]).T], axis=1))
        block = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return torch.from_numpy(block / col_max[a:b, None])

    def pairs(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        # original[i, j] = stacked[j, i] / col_max[i], looked up block by block.
        out = np.empty(len(i), dtype=np.float32)
        iq, jq = i < num_q, j < num_q
        for sel, block, r, c in (
            (jq & iq, q_q, j, i),
            (jq & ~iq, q_g, j, i - num_q),
            (~jq & iq, q_g, i, j - num_q),
            (~jq & ~iq, g_g, j - num_q, i - num_q),
        ):
            if sel.any():
                out[sel] = sq(block[r[sel], c[sel]])
        return out / col_max[i]

    def query_gallery(a: int, b: int) -> torch.Tensor:
        return torch.from_numpy(sq(q_g[a:b]) / col_max[a:b, None])

    rank = _topk_rows(rows, n, min(max(k1 + 1, k2), n), _chunk_rows(n, chunk_bytes))
    return _rerank_core(rank, pairs, query_gallery, num_q, k1, k2, lambda_value, chunk_bytes)


# ------------------------------------------------------------------------------------- features API
def re_ranking_features(qf, gf, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        metric: str = "euclidean", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        device: str | None = None) -> np.ndarray:
    """k-reciprocal re-ranking straight from features, without any (q+g)^2 matrix.

    Equivalent to ``re_ranking(D(q, g), D(q, q), D(g, g))`` with ``D`` the ``metric`` distance
    (``euclidean``: the original paper's squared Euclidean ``original`` distance; ``cosine``: 1 - cos).
    Distances are made chunk by chunk with torch (on ``device``, default CUDA when available), keeping
    only each row's top-k neighbours and maximum. Returns the re-ranked (q, g) float32 distance.
    """
    _check_params(k1, k2, lambda_value)
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    qf = check_features(qf, "qf")
    gf = check_features(gf, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf has feature dim {qf.shape[1]} but gf has {gf.shape[1]}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    num_q, n = len(qf), len(qf) + len(gf)
    k = min(max(k1 + 1, k2), n)
    # One pass over the N x N distances (each computed once, see neighbours.py): top-k, row maxima, and
    # the raw query x gallery distances, kept in the output buffer the final step overwrites.
    out = np.empty((num_q, n - num_q), dtype=np.float32)
    block = max(64, int((chunk_bytes // 4) ** 0.5))
    nb, aug = all_knn([qf, gf], k, "cosine" if metric == "cosine" else "sqeuclidean", block, num_q, out, dev)

    def original(d: torch.Tensor) -> torch.Tensor:
        # The reference squares the float32 distance it is given: sqrt, then square, both rounded as
        # there (not the same as |x - y|^2 in the last bit, which decides near-ties in the top k).
        return d.clamp_min(0).sqrt().square() if metric == "euclidean" else d.clamp(0, 2) ** 2

    row_max = original(nb.row_max).clamp_min(1e-12)
    rank = nb.index.cpu().numpy()
    # Pair distances from the neighbour lists where the pair is there (almost always), else computed.
    known_keys = torch.from_numpy(np.arange(n, dtype=np.int64)[:, None] * n + rank).to(dev).reshape(-1)
    known_keys, order = torch.sort(known_keys)
    known_vals = nb.dist.reshape(-1)[order]
    del nb

    def pairs(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        ti, tj = torch.from_numpy(i).to(dev), torch.from_numpy(j).to(dev)
        key = ti * n + tj
        pos = torch.searchsorted(known_keys, key).clamp_max(len(known_keys) - 1)
        found = known_keys[pos] == key
        d = torch.where(found, known_vals[pos], 0.0)
        miss = (~found).nonzero(as_tuple=True)[0]
        step = max(1, chunk_bytes // (aug.d * 8))
        for s in range(0, len(miss), step):
            m = miss[s : s + step]
            d[m] = aug.pair_dist(ti[m], tj[m])
        return (original(d) / row_max[ti]).cpu().numpy()

    def query_gallery(a: int, b: int) -> torch.Tensor:
        return original(torch.from_numpy(out[a:b]).to(dev)) / row_max[a:b, None]

    return _rerank_core(rank, pairs, query_gallery, num_q, k1, k2, lambda_value, chunk_bytes, out)
