"""Exact k nearest neighbours of every row among all rows, and each row's largest distance, in one
blocked pass over the symmetric N x N distance matrix that never holds more than one block of it.

What the k-reciprocal re-ranking needs from the N x N distances (N = queries + gallery) is each row's
k nearest neighbours, its largest distance (the normaliser) and the query x gallery block. All come
from one pass over the block pairs (a <= b), so each distance is computed once, not twice:

* a block of distances is one GEMM of augmented matrices: ``[x, |x|^2, 1] @ [-2y, 1, |y|^2]^T`` is
  ``|x - y|^2`` (``[x, 1] @ [-y, 1]^T`` is ``1 - cos`` for unit rows), with no extra passes;
* diagonal blocks go first and give every row a running k-th best distance; an off-diagonal block then
  only offers, for its rows and for its columns, the few entries below that threshold (a compare and a
  ``nonzero`` per side, no top-k over the block, no transposed copy). The result is exact: an entry
  above a row's current k-th best can never enter its final top k;
* offered entries are collected and merged into the lists once, at the end (one sort of int64
  (row, distance) keys; earlier when they pile up, which also tightens the thresholds) -- not merged
  block by block;
* the query x gallery distances are copied into the caller's output buffer on the way.

A block's entries are made exactly as ``compute_distance_matrix`` makes them (same ``addmm``, same
norms, no centring), so the distances are bit for bit those a caller of the reference re-ranking
would pass: near-ties at the k-th neighbour fall the same way (``tests/test_rerank.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# A block side whose thresholds admit more than this many entries per row on average offers its dense
# top k instead (bounds the candidates when thresholds are still loose).
_DENSE_ABOVE_PER_ROW = 32
# Candidates collected before they are merged (None: 8 n k, at least 4 M): bounds their memory.
_PENDING_LIMIT: int | None = None


@dataclass
class Neighbours:
    """``index`` (n, k) int64 and ``dist`` (n, k) float32: each row's k nearest rows, nearest first;
    ``row_max`` (n,): each row's largest distance (over all n rows)."""

    index: torch.Tensor
    dist: torch.Tensor
    row_max: torch.Tensor


def block_edges(n: int, split: int, size: int) -> list[tuple[int, int]]:
    """Row blocks of at most ``size`` rows that never straddle ``split`` (queries | gallery)."""
    return [(a, min(a + size, hi)) for lo, hi in ((0, split), (split, n)) for a in range(lo, hi, size)]


class _Rows:
    """The feature rows (unit rows for ``cosine``) and their squared norms, and distance blocks made
    exactly as :func:`slsr_ray.evaluate.pairwise_distance` makes them.

    ``block(a, b, c, d)`` is ``|x|^2 - 2 x.y + |y|^2`` for rows a..b (x) against rows c..d (y) --
    the same ``addmm`` with the same norms, so every entry equals, bit for bit, the squared entry of
    ``compute_distance_matrix`` before its square root (the distances the reference re-ranking is
    given); for ``cosine`` it is ``1 - x.y`` of the unit rows, as there.
    """

    def __init__(self, parts: list[np.ndarray], metric: str, device: torch.device):
        d = parts[0].shape[1]
        n = sum(len(p) for p in parts)
        self.d, self.metric = d, metric
        self.x = torch.empty((n, d), dtype=torch.float32, device=device)
        self.sq = torch.empty(n, dtype=torch.float32, device=device)
        start = 0
        for p in parts:  # fill in pieces: no concatenated copy of the features
            x = self.x[start : start + len(p)]
            x.copy_(torch.from_numpy(p).to(device))
            if metric == "cosine":
                x.copy_(torch.nn.functional.normalize(x, dim=1))
            else:
                self.sq[start : start + len(p)] = (x * x).sum(1)
            start += len(p)

    def block(self, a: int, b: int, c: int, d: int) -> torch.Tensor:
        if self.metric == "cosine":
            return 1.0 - self.x[a:b] @ self.x[c:d].T
        out = torch.addmm(self.sq[a:b, None], self.x[a:b], self.x[c:d].T, beta=1.0, alpha=-2.0)
        return out.add_(self.sq[None, c:d])

    def pair_dist(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Distances of row pairs (i, j), computed directly (the same form, not the GEMM's rounding)."""
        dot = (self.x[i] * self.x[j]).sum(1)
        if self.metric == "cosine":
            return 1.0 - dot
        return (self.sq[j] - 2.0 * dot) + self.sq[i]


def _order_key(vals: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) in the order of the float32 ``vals`` (negative ones included)."""
    b = vals.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(b < 0, -1 - b, b + (1 << 31))


class _TopK:
    """The k smallest (distance, index) of every row, plus the running row maximum.

    Blocks offer (row, column, distance) candidates, which are collected and merged into the per-row
    lists in bulk (:meth:`flush`: one int64 sort of (row, distance) keys) -- at the end, or when they
    exceed ``pending_limit`` -- not block by block. ``thr`` bounds each row's k-th smallest distance
    from above and filters what a block may offer; a flush tightens it.
    """

    def __init__(self, n: int, k: int, device: torch.device):
        self.n, self.k = n, k
        self.v = torch.full((n, k), float("inf"), dtype=torch.float32, device=device)
        self.i = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.max = torch.full((n,), -float("inf"), dtype=torch.float32, device=device)
        self.thr = torch.full((n,), float("inf"), dtype=torch.float32, device=device)
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending = 0
        self.pending_limit = _PENDING_LIMIT or max(8 * n * k, 1 << 22)

    def set_rows(self, a: int, block: torch.Tensor, col0: int) -> None:
        """Rows a.. start from the k smallest of ``block`` (their diagonal block: columns from ``col0``)."""
        nrows, kk = len(block), min(self.k, block.shape[1])
        top = torch.topk(block, kk, dim=1, largest=False, sorted=True)
        self.v[a : a + nrows, :kk] = top.values
        self.i[a : a + nrows, :kk] = top.indices + col0
        if kk == self.k:
            self.thr[a : a + nrows] = top.values[:, -1]

    def _add(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        self._parts.append((rows.reshape(-1), cols.reshape(-1), vals.reshape(-1)))
        self._pending += rows.numel()
        if self._pending > self.pending_limit:
            self.flush()

    def flush(self) -> None:
        """Merge the collected candidates into the per-row lists; tighten the thresholds."""
        if not self._parts:
            return
        n, k, dev = self.n, self.k, self.v.device
        rows = torch.cat([torch.arange(n, device=dev).repeat_interleave(k), *(p[0] for p in self._parts)])
        cols = torch.cat([self.i.reshape(-1), *(p[1] for p in self._parts)])
        vals = torch.cat([self.v.reshape(-1), *(p[2] for p in self._parts)])
        self._parts, self._pending = [], 0
        order = torch.sort((rows << 32) | _order_key(vals)).indices  # by row, then by distance
        rows = rows[order]
        counts = torch.bincount(rows, minlength=n)  # >= k: every row brings its current k
        first = torch.cumsum(counts, 0) - counts
        take = order[(first[:, None] + torch.arange(k, device=dev)).reshape(-1)]
        self.v = vals[take].reshape(n, k)
        self.i = cols[take].reshape(n, k)
        self.thr = torch.minimum(self.thr, self.v[:, -1])

    def offer_dense(self, a: int, block: torch.Tensor, col0: int) -> None:
        """Rows a.. offer the k smallest of their ``block`` row (columns numbered from ``col0``)."""
        nrows, kk = len(block), min(self.k, block.shape[1])
        top = torch.topk(block, kk, dim=1, largest=False, sorted=False)
        if kk == self.k:  # k entries at most this far: a bound for the row's k-th distance
            self.thr[a : a + nrows] = torch.minimum(self.thr[a : a + nrows], top.values.amax(1))
        self._add(torch.arange(a, a + nrows, device=block.device).repeat_interleave(kk), top.indices + col0,
                  top.values)

    def offer(self, a: int, block: torch.Tensor, col0: int) -> None:
        """Rows a.. see ``block`` (columns from ``col0``): only entries below their threshold are offered
        (the block's top k instead when the thresholds are too loose to filter)."""
        nrows = len(block)
        self.max[a : a + nrows] = torch.maximum(self.max[a : a + nrows], block.amax(1))
        mask = block < self.thr[a : a + nrows, None]
        if int(torch.count_nonzero(mask)) > _DENSE_ABOVE_PER_ROW * nrows:
            self.offer_dense(a, block, col0)
            return
        r, c = mask.nonzero(as_tuple=True)
        self._add(r + a, c + col0, block[r, c])

    def offer_columns(self, c0: int, block: torch.Tensor, row0: int) -> None:
        """:meth:`offer` for the columns of ``block`` (global rows c0..) against its rows (row0..),
        without transposing the block."""
        ncols = block.shape[1]
        self.max[c0 : c0 + ncols] = torch.maximum(self.max[c0 : c0 + ncols], block.amax(0))
        mask = block < self.thr[None, c0 : c0 + ncols]
        if int(torch.count_nonzero(mask)) > _DENSE_ABOVE_PER_ROW * ncols:
            self.offer_dense(c0, block.T.contiguous(), row0)
            return
        r, c = mask.nonzero(as_tuple=True)
        self._add(c + c0, r + row0, block[r, c])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, distances), each (n, k), nearest first."""
        self.flush()
        return self.i, self.v


def all_knn(parts: list[np.ndarray], k: int, metric: str, block_rows: int, num_q: int,
            qg_out: np.ndarray | None = None, device: torch.device | None = None) -> tuple[Neighbours, _Rows]:
    """k nearest rows of every row of ``concat(parts)`` (itself included), each row's largest distance
    (``sqeuclidean``: squared Euclidean; ``cosine``: 1 - cos), and, when ``qg_out`` (num_q, n - num_q)
    float32 is given, the distances of the first ``num_q`` rows to the others written into it."""
    device = device or torch.device("cpu")
    aug = _Rows(parts, metric, device)
    n = len(aug.x)
    edges = block_edges(n, num_q, block_rows)
    top = _TopK(n, k, device)
    for a, b in edges:  # diagonal blocks first: every row gets a finite k-th best to filter with
        block = aug.block(a, b, a, b)
        top.max[a:b] = block.amax(1)
        top.set_rows(a, block, a)
        del block
    for bi, (c, d) in enumerate(edges):
        for a, b in edges[:bi]:
            block = aug.block(a, b, c, d)  # rows a..b x columns c..d (c > a)
            top.offer(a, block, c)
            top.offer_columns(c, block, a)
            if qg_out is not None and b <= num_q <= c:
                qg_out[a:b, c - num_q : d - num_q] = block.cpu().numpy()
            del block
    index, dist = top.result()
    return Neighbours(index, dist, top.max), aug
