"""Exact k nearest neighbours of every row among all rows, and each row's largest distance, in one
blocked pass over the symmetric N x N distance matrix that never holds more than one block of it.

What the k-reciprocal re-ranking needs from the N x N distances (N = queries + gallery) is each row's
k nearest neighbours, its largest distance (the normaliser) and the query x gallery block. All come
from one pass over the block pairs (a <= b), so each distance is computed once, not twice:

* a block of distances is one GEMM of augmented matrices: ``[x, |x|^2, 1] @ [-2y, 1, |y|^2]^T`` is
  ``|x - y|^2`` (``[x, 1] @ [-y, 1]^T`` is ``1 - cos`` for unit rows), with no extra passes;
* diagonal blocks go first and give every row a running k-th best distance; an off-diagonal block then
  only adds, for its rows and (transposed) for its columns, the few entries below that threshold --
  instead of a top-k over the block twice. The result is exact: an entry above a row's current k-th
  best can never enter its final top k;
* the query x gallery distances are copied into the caller's output buffer on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# An off-diagonal block whose threshold admits more than this many entries per row falls back to a
# dense top-k (bounds the candidate lists when a threshold is still loose).
_MAX_CANDIDATES_PER_ROW = 64


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


class _Augmented:
    """Left rows ``[x, s, 1]`` and right rows ``[-2x, 1, s]`` (``s = |x|^2``), padded to a multiple of
    16 columns for the GEMM; for ``cosine`` the unit rows ``[x, 1]`` and ``[-x, 1]``."""

    def __init__(self, parts: list[np.ndarray], metric: str, device: torch.device):
        d = parts[0].shape[1]
        n = sum(len(p) for p in parts)
        self.d, self.metric = d, metric
        self.left = torch.zeros((n, -(-(d + 2) // 16) * 16), dtype=torch.float32, device=device)
        start = 0
        for p in parts:  # fill in pieces: no concatenated copy of the features
            self.left[start : start + len(p), :d] = torch.from_numpy(p).to(device)
            start += len(p)
        x = self.left[:, :d]
        if metric == "cosine":
            x.copy_(torch.nn.functional.normalize(x, dim=1))
            self.left[:, d] = 1.0
        else:
            # Distances do not change under a shift; centred rows have smaller norms, so the float32
            # |x|^2 + |y|^2 - 2 x.y cancels less (pooled ReLU features are far from the origin).
            x.sub_(x.mean(0, dtype=torch.float64).to(torch.float32))
            self.left[:, d] = torch.einsum("ij,ij->i", x, x)
            self.left[:, d + 1] = 1.0

    @property
    def x(self) -> torch.Tensor:
        """The (unit, for cosine) feature rows."""
        return self.left[:, : self.d]

    def right(self, a: int, b: int) -> torch.Tensor:
        r = torch.zeros_like(self.left[a:b])
        d = self.d
        if self.metric == "cosine":
            r[:, :d] = -self.left[a:b, :d]
            r[:, d] = 1.0
        else:
            r[:, :d] = -2.0 * self.left[a:b, :d]
            r[:, d] = 1.0
            r[:, d + 1] = self.left[a:b, d]
        return r

    def pair_dist(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Distances of row pairs (i, j), computed directly (more exact than the GEMM form)."""
        xi, xj = self.x[i], self.x[j]
        if self.metric == "cosine":
            return 1.0 - (xi * xj).sum(1)
        return ((xi - xj) ** 2).sum(1)


class _TopK:
    """Running k smallest (distance, index) per row, sorted, plus the running row maximum."""

    def __init__(self, n: int, k: int, device: torch.device):
        self.k = k
        self.v = torch.full((n, k), float("inf"), dtype=torch.float32, device=device)
        self.i = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.max = torch.full((n,), -float("inf"), dtype=torch.float32, device=device)

    def _merge(self, a: int, nrows: int, r: torch.Tensor, c: torch.Tensor, vals: torch.Tensor) -> None:
        """Merge candidates (local row ``r`` ascending, global column ``c``, value) into rows a..a+nrows."""
        if r.numel() == 0:
            return
        counts = torch.bincount(r, minlength=nrows)
        pos = torch.arange(len(r), device=r.device) - (torch.cumsum(counts, 0) - counts)[r]
        k = self.k
        pv = torch.full((nrows, k + int(counts.max())), float("inf"), dtype=torch.float32, device=r.device)
        pi = torch.full(pv.shape, -1, dtype=torch.int64, device=r.device)
        pv[:, :k], pi[:, :k] = self.v[a : a + nrows], self.i[a : a + nrows]
        pv[r, k + pos], pi[r, k + pos] = vals, c
        top = torch.topk(pv, k, dim=1, largest=False, sorted=True)
        self.v[a : a + nrows], self.i[a : a + nrows] = top.values, torch.gather(pi, 1, top.indices)

    def offer_dense(self, a: int, block: torch.Tensor, col0: int) -> None:
        """Rows a.. take the top k of ``block`` (columns numbered from ``col0``) into their lists."""
        nrows, kk = len(block), min(self.k, block.shape[1])
        top = torch.topk(block, kk, dim=1, largest=False, sorted=True)
        r = torch.arange(nrows, device=block.device).repeat_interleave(kk)
        self._merge(a, nrows, r, (top.indices + col0).reshape(-1), top.values.reshape(-1))

    def offer(self, a: int, block: torch.Tensor, col0: int) -> None:
        """Rows a.. see ``block`` (columns from ``col0``): only entries below their k-th best are merged."""
        nrows = len(block)
        self.max[a : a + nrows] = torch.maximum(self.max[a : a + nrows], block.amax(1))
        mask = block < self.v[a : a + nrows, -1:]
        if int(torch.count_nonzero(mask)) > _MAX_CANDIDATES_PER_ROW * nrows:
            self.offer_dense(a, block, col0)
            return
        r, c = mask.nonzero(as_tuple=True)  # row-major order: r ascending
        self._merge(a, nrows, r, c + col0, block[r, c])


def all_knn(parts: list[np.ndarray], k: int, metric: str, block_rows: int, num_q: int,
            qg_out: np.ndarray | None = None, device: torch.device | None = None) -> tuple[Neighbours, _Augmented]:
    """k nearest rows of every row of ``concat(parts)`` (itself included), each row's largest distance
    (``sqeuclidean``: squared Euclidean; ``cosine``: 1 - cos), and, when ``qg_out`` (num_q, n - num_q)
    float32 is given, the distances of the first ``num_q`` rows to the others written into it."""
    device = device or torch.device("cpu")
    aug = _Augmented(parts, metric, device)
    n = len(aug.left)
    edges = block_edges(n, num_q, block_rows)
    top = _TopK(n, k, device)
    for a, b in edges:  # diagonal blocks first: every row gets a finite k-th best to filter with
        block = aug.left[a:b] @ aug.right(a, b).T
        top.max[a:b] = block.amax(1)
        top.offer_dense(a, block, a)
        del block
    for bi, (c, d) in enumerate(edges):
        right = aug.right(c, d)
        for a, b in edges[:bi]:
            block = aug.left[a:b] @ right.T  # rows a..b x columns c..d (c > a)
            top.offer(a, block, c)
            top.offer(c, block.T, a)
            if qg_out is not None and b <= num_q <= c:
                qg_out[a:b, c - num_q : d - num_q] = block.cpu().numpy()
            del block
    return Neighbours(top.i, top.v, top.max), aug
