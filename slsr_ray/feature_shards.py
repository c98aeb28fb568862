"""Feature matrices as row shards in the Ray object store: put them there (or take refs already there),
check every shard next to its data (shape, dtype, NaN/inf) while computing the data variance and the
row norms that k-means reuses, and fetch chosen rows back. Used by :mod:`slsr_ray.kmeans` and the
silhouette in :mod:`slsr_ray.cluster`; the feature matrix never gathers on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SlsrError

# Rows per chunk of the checking pass (and of a k-means step): bounds a task's scratch memory.
CHUNK_ROWS = 16_384


class ClusteringError(SlsrError, ValueError):
    """Bad input to clustering: wrong K, non-finite features, empty shards, too few identities."""


def _shard_stats(shard: np.ndarray) -> tuple[dict, np.ndarray]:
    """Shape, dtype and non-finite rows of a shard, the sums behind the data variance, and its float32
    squared row norms (kept in the object store and reused by every Lloyd step)."""
    if not isinstance(shard, np.ndarray) or shard.ndim != 2:
        shape = getattr(shard, "shape", type(shard).__name__)
        return {"error": f"expected a 2-D float32 array, got {shape}"}, np.zeros(0, np.float32)
    n, d = shard.shape
    if shard.dtype != np.float32 or n == 0:
        return {"n": n, "d": d, "dtype": str(shard.dtype)}, np.zeros(0, np.float32)
    row_sq = np.empty(n, np.float32)
    col_sum = np.zeros(d, np.float64)
    for start in range(0, n, CHUNK_ROWS):
        chunk = shard[start : start + CHUNK_ROWS]
        row_sq[start : start + len(chunk)] = np.einsum("ij,ij->i", chunk, chunk)
        col_sum += chunk.sum(axis=0, dtype=np.float64)
    # A NaN/inf entry (or a float32 overflow: also unusable features) makes the row norm non-finite.
    bad = np.flatnonzero(~np.isfinite(row_sq))
    stats = {"n": n, "d": d, "dtype": "float32", "nonfinite": len(bad), "first_bad": int(bad[0]) if len(bad) else -1,
             "col_sum": col_sum, "sq_sum": float(row_sq.sum(dtype=np.float64))}
    return stats, row_sq


def _take_rows(shard: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.array(shard[rows], dtype=np.float32)


_REMOTES: dict = {}


def _remote(fn, **opts):
    """``ray.remote(fn)`` built lazily (importing this module must not need Ray running)."""
    import ray

    key = (fn.__name__, tuple(sorted(opts.items())))
    if key not in _REMOTES:
        _REMOTES[key] = ray.remote(**opts)(fn) if opts else ray.remote(fn)
    return _REMOTES[key]


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------


def _default_num_shards() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


@dataclass
class _Shards:
    refs: list
    sizes: list[int]
    dim: int
    mean_var: float
    sq_refs: list | None = None  # float32 squared row norms per shard

    @property
    def n(self) -> int:
        return int(sum(self.sizes))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)


def _check_finite(X: np.ndarray) -> None:
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ClusteringError(
            f"features contain NaN or inf in {len(rows)} of {len(X)} rows (first rows {rows[:5].tolist()}); "
            "check the extraction checkpoint (a diverged model gives NaN features)"
        )


def _check_stats(stats: list[dict]) -> None:
    dims = set()
    for i, s in enumerate(stats):
        if "error" in s:
            raise ClusteringError(f"feature shard {i}: {s['error']}")
        if s["n"] == 0:
            raise ClusteringError(f"feature shard {i} of {len(stats)} is empty (0 rows); drop it or re-shard")
        if s["dtype"] != "float32":
            raise ClusteringError(f"feature shard {i} has dtype {s['dtype']}; expected float32")
        if s["nonfinite"]:
            raise ClusteringError(
                f"feature shard {i} has NaN or inf in {s['nonfinite']} of {s['n']} rows "
                f"(first at row {s['first_bad']}); check the extraction checkpoint"
            )
        dims.add(s["d"])
    if len(dims) != 1:
        raise ClusteringError(f"feature shards disagree on the dimension: {sorted(dims)}")


def to_shards(features, num_shards: int | None = None) -> _Shards:
    """Put an [n, d] array into the object store as row shards, or validate a list of shard refs.

    Every shard is checked for shape, emptiness and NaN/inf by a task next to the data; the data
    variance (for the convergence tolerance) and the row norms come from the same pass.
    """
    import ray

    if isinstance(features, _Shards):
        return features
    if isinstance(features, np.ndarray):
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ClusteringError(f"features must be a non-empty 2-D [n, d] array, got shape {features.shape}")
        X = np.ascontiguousarray(features, dtype=np.float32)
        n = len(X)
        num_shards = min(num_shards or _default_num_shards(), n)
        bounds = np.linspace(0, n, num_shards + 1).astype(int)
        refs = [ray.put(X[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    else:
        refs = list(features)
    if not refs:
        raise ClusteringError("no feature shards given (empty list)")
    stats_task = _remote(_shard_stats, num_returns=2)
    pairs = [stats_task.remote(r) for r in refs]
    stats = ray.get([p[0] for p in pairs])
    if isinstance(features, np.ndarray) and any(s.get("nonfinite") for s in stats):
        _check_finite(X)  # the error names global rows
    _check_stats(stats)
    n = sum(s["n"] for s in stats)
    d = stats[0]["d"]
    mean = sum(s["col_sum"] for s in stats) / n
    # mean per-dimension variance = E||x||^2 / d - ||E x||^2 / d
    mean_var = max(sum(s["sq_sum"] for s in stats) / n / d - float(mean @ mean) / d, 0.0)
    return _Shards(refs, [s["n"] for s in stats], d, mean_var, [p[1] for p in pairs])


def _global_to_local(offsets: np.ndarray, rows: np.ndarray):
    """Yield (shard index, positions in ``rows``, local rows) for global row indices ``rows``."""
    which = np.searchsorted(offsets, rows, side="right") - 1
    for s in np.unique(which):
        pos = np.flatnonzero(which == s)
        yield int(s), pos, rows[pos] - offsets[s]


def _gather_rows(shards: _Shards, rows: np.ndarray) -> np.ndarray:
    """Rows at global indices ``rows`` (any order) fetched from the shards by tasks."""
    import ray

    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), shards.dim), np.float32)
    parts = [(pos, _remote(_take_rows).remote(shards.refs[s], local))
             for s, pos, local in _global_to_local(shards.offsets, rows)]
    for (pos, _), got in zip(parts, ray.get([p[1] for p in parts]), strict=True):
        out[pos] = got
    return out
