"""Step 3 of Algorithm 1: distributed k-means over feature shards, silhouette-based choice of K, and the
identity -> cluster membership (S_c) that the GAN and training stages consume.

K-means runs as Ray tasks over feature shards held in the object store. Each iteration puts the
current centroids in the object store once; one task per shard assigns its rows with faiss
(``IndexFlatL2`` on CPU, a faiss GPU index when the task was given a GPU) and returns per-cluster
partial sums, counts, its inertia and its farthest points; the driver reduces them into new centroids.
Only ``k x d`` numbers travel per shard and iteration, so the features never gather on the driver.

Artifact written by :func:`run_clustering` (names and keys are a contract)::

    output_dir/k{K}/assignments.parquet   path, pid, camid, cluster  (one row per train image)
    output_dir/k{K}/centroids.npy         float32 [K, D] (np.save format)
    output_dir/k{K}/membership.json       {"k", "rule", "min_share", "silhouette",
                                           "clusters": [{"cluster", "size", "pids"}, ...]}
    output_dir/silhouette.json            {"2": s2, "3": s3, ..., "best_k": K}   (written last)
    output_dir/summary.json               the Table-2 style rows (K, silhouette %, inertia, iterations)

Silhouette scores are fractions in [-1, 1] (the paper's Table 2 shows them as percentages).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from . import storage
from .errors import SlsrError

log = logging.getLogger(__name__)

#: Default number of points the silhouette is computed on. The exact silhouette is O(n^2 d); 10,000
#: points keep it to a few seconds on two cores while the sampling error of the mean stays ~0.3 %.
SILHOUETTE_SAMPLE_SIZE = 10_000

#: Default number of points k-means++ seeds from (a uniform sample of the data, seeded).
INIT_SAMPLE_SIZE = 10_000

# Rows per faiss search / partial-sum chunk inside a shard task: bounds the task's scratch memory.
_CHUNK_ROWS = 16_384

MEMBERSHIP_RULES = ("majority", "any", "min_share")


class ClusteringError(SlsrError, ValueError):
    """Bad input to clustering: wrong K, non-finite features, empty shards, too few identities."""


@dataclass
class KMeansResult:
    """Best run of :func:`kmeans`: ``centroids`` float32 [k, d], ``labels`` int64 [n] (in shard order),
    ``inertia`` (sum of squared distances to the assigned centroid), ``n_iter`` (Lloyd iterations)."""

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int
    converged: bool = True


# --------------------------------------------------------------------------------------------------
# Shard tasks (run on any node; they see only object-store data)
# --------------------------------------------------------------------------------------------------


def _shard_stats(shard: np.ndarray) -> dict:
    """Rows, dims, non-finite count and the column sums needed for the data variance."""
    if not isinstance(shard, np.ndarray) or shard.ndim != 2:
        shape = getattr(shard, "shape", type(shard).__name__)
        return {"error": f"expected a 2-D float32 array, got {shape}"}
    n, d = shard.shape
    nonfinite = 0
    first_bad = -1
    col_sum = np.zeros(d, np.float64)
    col_sq = np.zeros(d, np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        chunk = shard[start : start + _CHUNK_ROWS]
        # A row sum is NaN/inf when any entry is (or when float32 overflows: also unusable features).
        bad = ~np.isfinite(chunk.sum(axis=1, dtype=np.float64))
        if bad.any():
            if first_bad < 0:
                first_bad = start + int(np.flatnonzero(bad)[0])
            nonfinite += int(bad.sum())
            continue
        col_sum += chunk.sum(axis=0, dtype=np.float64)
        col_sq += np.einsum("ij,ij->j", chunk, chunk, dtype=np.float64)
    return {
        "n": n, "d": d, "dtype": str(shard.dtype), "nonfinite": nonfinite, "first_bad": first_bad,
        "col_sum": col_sum, "col_sq": col_sq,
    }


_GPU_RES = None


def _make_index(d: int, use_gpu: bool):
    import faiss

    if use_gpu:
        import ray

        from .gpu import warn_no_cuda

        global _GPU_RES
        if not hasattr(faiss, "StandardGpuResources"):
            warn_no_cuda("k-means assignment", "faiss has no GPU support (pip install 'slsr-ray[gpu]')")
        elif not ray.get_gpu_ids() or faiss.get_num_gpus() == 0:
            warn_no_cuda("k-means assignment", "faiss sees no GPU")
        else:
            if _GPU_RES is None:
                _GPU_RES = faiss.StandardGpuResources()
            return faiss.GpuIndexFlatL2(_GPU_RES, d)
    return faiss.IndexFlatL2(d)


def _assign_shard(shard: np.ndarray, centroids: np.ndarray, want_labels: bool, num_far: int, use_gpu: bool) -> dict:
    """Assign every row of ``shard`` to its nearest centroid; return the partial k-means statistics."""
    import scipy.sparse as sp

    k, d = centroids.shape
    index = _make_index(d, use_gpu)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    n = shard.shape[0]
    sums = np.zeros((k, d), np.float64)
    counts = np.zeros(k, np.int64)
    dists = np.empty(n, np.float32)
    labels = np.empty(n, np.int64)
    for start in range(0, n, _CHUNK_ROWS):
        chunk = np.ascontiguousarray(shard[start : start + _CHUNK_ROWS])
        dist, idx = index.search(chunk, 1)
        lab = idx[:, 0]
        m = len(chunk)
        dists[start : start + m] = np.maximum(dist[:, 0], 0.0)  # faiss's ||x||^2+||c||^2-2xc can dip below 0
        labels[start : start + m] = lab
        # One sparse one-hot product sums the rows of every cluster in a single pass over the chunk.
        onehot = sp.csr_matrix((np.ones(m, np.float32), (lab, np.arange(m))), shape=(k, m))
        sums += onehot @ chunk
        counts += np.bincount(lab, minlength=k)
    far = np.argpartition(-dists, min(num_far, n) - 1)[:num_far] if n else np.empty(0, np.int64)
    out = {
        "sums": sums, "counts": counts, "inertia": float(dists.sum(dtype=np.float64)),
        "far_rows": far, "far_dist": dists[far],
    }
    if want_labels:
        out["labels"] = labels
    return out


def _take_rows(shard: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.array(shard[rows], dtype=np.float32)


def _read_feature_files(uris: list[str]) -> np.ndarray:
    """Concatenate the ``feature`` column of some parquet shards into one float32 [n, d] array."""
    parts = [feature_matrix(storage.read_table(u, columns=["feature"])) for u in uris]
    return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros((0, 0), np.float32)


_REMOTES: dict = {}


def _remote(fn, **opts):
    """``ray.remote(fn)`` built lazily (importing this module must not need Ray running)."""
    import ray

    key = (fn.__name__, tuple(sorted(opts.items())))
    if key not in _REMOTES:
        _REMOTES[key] = ray.remote(**opts)(fn) if opts else ray.remote(fn)
    return _REMOTES[key]


# --------------------------------------------------------------------------------------------------
# Feature helpers
# --------------------------------------------------------------------------------------------------


def feature_matrix(table: pa.Table, column: str = "feature") -> np.ndarray:
    """The fixed-size-list (or list) float column ``column`` of ``table`` as a float32 [n, d] array."""
    if column not in table.column_names:
        raise ClusteringError(f"table has no {column!r} column; has {table.column_names}")
    arr = table[column].combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    if arr.null_count:
        raise ClusteringError(f"{arr.null_count} rows have a null {column!r}")
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    else:
        lengths = np.unique(arr.value_lengths().to_numpy())
        if len(lengths) != 1:
            raise ClusteringError(f"{column!r} rows have different lengths {lengths[:5].tolist()}")
        d = int(lengths[0])
    return np.ascontiguousarray(arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), d), np.float32)


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


def to_shards(features, num_shards: int | None = None) -> _Shards:
    """Put an [n, d] array into the object store as row shards, or validate a list of shard refs.

    Every shard is checked for shape, emptiness and NaN/inf by a task next to the data; the data
    variance (for the convergence tolerance) comes from the same pass.
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
    stats = ray.get([_remote(_shard_stats).remote(r) for r in refs])
    if isinstance(features, np.ndarray) and any(s.get("nonfinite") for s in stats):
        _check_finite(X)  # the error names global rows
    dims = set()
    for i, s in enumerate(stats):
        if "error" in s:
            raise ClusteringError(f"feature shard {i}: {s['error']}")
        if s["n"] == 0:
            raise ClusteringError(f"feature shard {i} of {len(refs)} is empty (0 rows); drop it or re-shard")
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
    n = sum(s["n"] for s in stats)
    mean = sum(s["col_sum"] for s in stats) / n
    var = sum(s["col_sq"] for s in stats) / n - mean**2
    return _Shards(refs, [s["n"] for s in stats], dims.pop(), float(np.maximum(var, 0).mean()))


def _gather_rows(shards: _Shards, rows: np.ndarray) -> np.ndarray:
    """Rows at global indices ``rows`` (any order) fetched from the shards by tasks."""
    import ray

    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    offsets = shards.offsets
    which = np.searchsorted(offsets, sorted_rows, side="right") - 1
    pieces = []
    for s in np.unique(which):
        local = sorted_rows[which == s] - offsets[s]
        pieces.append(_remote(_take_rows).remote(shards.refs[s], local))
    gathered = np.concatenate(ray.get(pieces)) if pieces else np.zeros((0, shards.dim), np.float32)
    out = np.empty_like(gathered)
    out[order] = gathered
    return out


# --------------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------------


def _sq_dists(points: np.ndarray, x: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    # float32 products (fast) with float64 norms: seeding only needs distances roughly right
    p_sq = (points.astype(np.float64) ** 2).sum(1)
    d = p_sq[:, None] + x_sq[None, :] - 2.0 * (points @ x.T).astype(np.float64)
    return np.maximum(d, 0.0)


def kmeans_plusplus(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (as scikit-learn: 2 + log k candidates per step, keep the best)."""
    n = len(X)
    X = np.ascontiguousarray(X, dtype=np.float32)
    x_sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    n_trials = 2 + int(np.log(k))
    centers = np.empty((k, X.shape[1]), np.float32)
    first = int(rng.integers(n))
    centers[0] = X[first]
    closest = _sq_dists(X[first : first + 1], X, x_sq)[0]
    potential = closest.sum()
    for c in range(1, k):
        if potential <= 0:  # fewer distinct points than k: any point will do, empty clusters get re-seeded
            cand = rng.integers(n, size=n_trials)
        else:
            cand = np.searchsorted(np.cumsum(closest), rng.uniform(size=n_trials) * potential)
            cand = np.minimum(cand, n - 1)
        d_cand = np.minimum(closest[None, :], _sq_dists(X[cand], X, x_sq))
        pots = d_cand.sum(1)
        best = int(np.argmin(pots))
        closest, potential = d_cand[best], pots[best]
        centers[c] = X[cand[best]]
    return centers


def _lloyd(shards: _Shards, init: np.ndarray, max_iter: int, shift_tol: float, inertia_tol: float,
           use_gpu: bool, gpu_per_task: float) -> KMeansResult:
    import ray

    k = len(init)
    if use_gpu:
        from . import gpu

        cpus = max(0.01, gpu.cpus_beside(len(shards.refs), gpu_per_task, 1.0))  # GPU nodes may have few CPUs
        # max_calls=0: Ray would start a fresh process for every GPU task (max_calls=1 by default),
        # i.e. a new process, imports and faiss GPU resources per shard and iteration
        assign = _remote(_assign_shard, num_gpus=gpu_per_task, num_cpus=cpus, max_calls=0)
    else:
        assign = _remote(_assign_shard)
    centroids = init.astype(np.float32)
    prev_inertia = math.inf
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is used after the loop)
        cref = ray.put(centroids)
        parts = ray.get([assign.remote(r, cref, False, k, use_gpu) for r in shards.refs])
        sums = sum(p["sums"] for p in parts)
        counts = sum(p["counts"] for p in parts)
        inertia = sum(p["inertia"] for p in parts)
        new = np.empty_like(centroids)
        nonempty = counts > 0
        new[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        empty = np.flatnonzero(~nonempty)
        if len(empty):
            # Re-seed empty clusters at the points farthest from their centroid (as scikit-learn does).
            # Several empty clusters are placed greedily, each at the candidate farthest from every
            # centroid placed so far, so they do not all land on the same far group of points.
            far_d = np.concatenate([p["far_dist"] for p in parts]).astype(np.float64)
            far_x = np.concatenate(ray.get([
                _remote(_take_rows).remote(ref, p["far_rows"]) for ref, p in zip(shards.refs, parts, strict=True)
            ]))
            for c in empty:
                pick = int(np.argmax(far_d))
                new[c] = far_x[pick]
                far_d = np.minimum(far_d, ((far_x - far_x[pick]) ** 2).sum(1, dtype=np.float64))
            log.info("k-means: re-seeded %d empty cluster(s) at iteration %d", len(empty), n_iter)
        shift = float(((new.astype(np.float64) - centroids) ** 2).sum())
        centroids = new
        if len(empty) == 0 and (
            shift <= shift_tol or (prev_inertia - inertia) <= inertia_tol * max(inertia, 1e-30)
        ):
            converged = True
            break
        prev_inertia = inertia
    # Final E-step: labels and inertia for the returned centroids.
    cref = ray.put(centroids)
    parts = ray.get([assign.remote(r, cref, True, 1, use_gpu) for r in shards.refs])
    labels = np.concatenate([p["labels"] for p in parts])
    inertia = float(sum(p["inertia"] for p in parts))
    return KMeansResult(centroids, labels, inertia, n_iter, converged)


def kmeans(
    features,
    k: int,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    num_shards: int | None = None,
    init_sample_size: int = INIT_SAMPLE_SIZE,
    inertia_tol: float = 1e-6,
    use_gpu: bool | None = None,
    init: np.ndarray | None = None,
) -> KMeansResult:
    """Distributed k-means (Lloyd) over Ray tasks.

    ``features`` is a float32 [n, d] array (split into ``num_shards`` object-store shards, default one
    per cluster CPU) or a list of ``ObjectRef`` s of float32 [n_i, d] shards already in the object store.
    Each of ``n_init`` restarts seeds with greedy k-means++ on a uniform sample of ``init_sample_size``
    rows (seeded from ``seed``), then iterates until the squared centroid shift is below ``tol`` times
    the mean per-dimension data variance (scikit-learn's rule) or the inertia improves by less than
    ``inertia_tol`` (relative), or ``max_iter``. The restart with the lowest inertia is returned.
    ``use_gpu``: None = assignment tasks on the GPU nodes when the cluster has GPUs (faiss GPU indexes
    there; a task whose faiss has no GPU support uses the CPU index and logs it once).
    ``init``: explicit [k, d] starting centroids (then a single run, no k-means++).
    """
    if not isinstance(k, int | np.integer) or k < 1:
        raise ClusteringError(f"k must be a positive integer, got {k!r}")
    if n_init < 1 or max_iter < 1:
        raise ClusteringError(f"n_init and max_iter must be >= 1, got n_init={n_init}, max_iter={max_iter}")
    shards = to_shards(features, num_shards)
    n = shards.n
    if k > n:
        raise ClusteringError(f"k={k} is larger than the number of feature rows ({n})")
    if use_gpu is None:  # a task without faiss GPU support there falls back to the CPU index and says so
        use_gpu = _cluster_gpus() > 0
    gpu_per_task = 0.0
    if use_gpu:  # every shard's task on a GPU share at once (shares that fit each node's GPUs)
        from . import gpu

        gpu_per_task = gpu.share(len(shards.refs))
        gpu.check_request(gpu_per_task or 1.0, 1, "k-means assignment (use_gpu=True)")
    shift_tol = tol * shards.mean_var
    if init is not None:
        init = np.asarray(init, dtype=np.float32)
        if init.shape != (k, shards.dim) or not np.isfinite(init).all():
            raise ClusteringError(f"init must be a finite [{k}, {shards.dim}] array, got shape {init.shape}")
        return _lloyd(shards, init, max_iter, shift_tol, inertia_tol, use_gpu, gpu_per_task)
    rng = np.random.default_rng(seed)
    best: KMeansResult | None = None
    for run in range(n_init):
        m = min(n, init_sample_size)
        rows = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
        sample = _gather_rows(shards, rows)
        init = kmeans_plusplus(sample, int(k), rng)
        res = _lloyd(shards, init, max_iter, shift_tol, inertia_tol, use_gpu, gpu_per_task)
        log.info("k-means k=%d restart %d/%d: inertia %.6g in %d iterations", k, run + 1, n_init, res.inertia,
                 res.n_iter)
        if best is None or res.inertia < best.inertia:
            best = res
    return best


# --------------------------------------------------------------------------------------------------
# Silhouette
# --------------------------------------------------------------------------------------------------


def silhouette_sample_indices(n: int, sample_size: int | None, seed: int) -> np.ndarray:
    """The rows scikit-learn's ``silhouette_score(..., sample_size, random_state=seed)`` uses."""
    if sample_size is None or sample_size >= n:
        return np.arange(n)
    return np.random.RandomState(seed).permutation(n)[:sample_size]


def _silhouette_exact(X: np.ndarray, labelings: Sequence[np.ndarray], chunk_rows: int = 2048) -> list[float]:
    """Mean silhouette of ``X`` under each labelling; one chunked pass over the pairwise distances.

    Distances as scikit-learn computes them (float64, ||a||^2 + ||b||^2 - 2ab, clipped, zero
    diagonal), so the result equals ``sklearn.metrics.silhouette_score`` to rounding.
    """
    x = X.astype(np.float64)
    n = len(x)
    sq = (x * x).sum(1)
    encoded = []
    for labels in labelings:
        uniq, lab = np.unique(labels, return_inverse=True)
        if not 2 <= len(uniq) <= n - 1:
            raise ClusteringError(
                f"silhouette needs 2 <= number of clusters <= samples - 1; got {len(uniq)} clusters in {n} samples"
            )
        onehot = np.zeros((n, len(uniq)))
        onehot[np.arange(n), lab] = 1.0
        encoded.append((lab, onehot, np.bincount(lab).astype(np.float64)))
    totals = [0.0] * len(encoded)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        d = sq[start:stop, None] + sq[None, :] - 2.0 * (x[start:stop] @ x.T)
        np.maximum(d, 0.0, out=d)
        d[np.arange(stop - start), np.arange(start, stop)] = 0.0
        np.sqrt(d, out=d)
        rows = np.arange(stop - start)
        for j, (lab, onehot, freq) in enumerate(encoded):
            cd = d @ onehot  # [chunk, clusters]: summed distance to each cluster
            own = lab[start:stop]
            intra = cd[rows, own]
            cd[rows, own] = np.inf
            inter = (cd / freq).min(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                intra = intra / (freq[own] - 1)
                s = (inter - intra) / np.maximum(intra, inter)
            totals[j] += float(np.nan_to_num(s).sum())  # singleton clusters score 0, as in scikit-learn
    return [t / n for t in totals]


def silhouette(X: np.ndarray, labels: np.ndarray, sample_size: int | None = SILHOUETTE_SAMPLE_SIZE,
               seed: int = 0) -> float:
    """Mean silhouette coefficient on a seeded sample of ``sample_size`` rows (all rows when None or
    >= n). Equal to ``sklearn.metrics.silhouette_score(X, labels, sample_size=sample_size,
    random_state=seed)``: the same sample, the same distances."""
    return silhouette_many(X, [labels], sample_size, seed)[0]


def silhouette_many(X, labelings: Sequence[np.ndarray], sample_size: int | None = SILHOUETTE_SAMPLE_SIZE,
                    seed: int = 0) -> list[float]:
    """:func:`silhouette` for several labellings of the same points (e.g. K = 2..5) sharing one pass over
    the sample's distances. ``X`` may also be shards from :func:`to_shards` (rows are fetched by tasks)."""
    n = X.n if isinstance(X, _Shards) else len(X)
    for labels in labelings:
        if len(labels) != n:
            raise ClusteringError(f"labels has {len(labels)} entries for {n} feature rows")
    rows = silhouette_sample_indices(n, sample_size, seed)
    if isinstance(X, _Shards):
        sample = _gather_rows(X, rows)
    else:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ClusteringError(f"features must be 2-D [n, d], got shape {X.shape}")
        sample = X[rows]
        _check_finite(sample)
    return _silhouette_exact(sample, [np.asarray(lab)[rows] for lab in labelings])


# --------------------------------------------------------------------------------------------------
# Choosing K and cluster membership
# --------------------------------------------------------------------------------------------------


@dataclass
class ChooseKResult:
    """``rows``: one dict per K (k, silhouette, silhouette_pct, inertia, n_iter, sizes); ``best_k``: the
    K with the highest silhouette; ``results``: the k-means result per K."""

    rows: list[dict]
    best_k: int
    results: dict[int, KMeansResult] = field(repr=False)

    def format_table(self) -> str:
        """The paper's Table 2 layout: silhouette (%) per number of clusters."""
        head = "K            " + " ".join(f"{r['k']:>7d}" for r in self.rows)
        sil = "silhouette % " + " ".join(f"{r['silhouette_pct']:>7.2f}" for r in self.rows)
        return f"{head}\n{sil}\nbest K = {self.best_k}"


def choose_k(
    features,
    ks: Sequence[int] = (2, 3, 4, 5),
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    sample_size: int | None = SILHOUETTE_SAMPLE_SIZE,
    num_shards: int | None = None,
    use_gpu: bool | None = None,
) -> ChooseKResult:
    """Run :func:`kmeans` for every K in ``ks`` and score each with the sampled :func:`silhouette`
    (the same sample for every K); the best K has the highest silhouette (ties: smaller K)."""
    ks = [int(k) for k in ks]
    if not ks:
        raise ClusteringError("ks is empty; give at least one number of clusters")
    if min(ks) < 2:
        raise ClusteringError(f"silhouette needs K >= 2; got ks={ks}")
    shards = to_shards(features, num_shards)
    results = {}
    for k in ks:
        results[k] = kmeans(shards, k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, use_gpu=use_gpu)
    scores = silhouette_many(shards, [results[k].labels for k in ks], sample_size, seed)
    rows = []
    for k, s in zip(ks, scores, strict=True):
        r = results[k]
        rows.append({
            "k": k, "silhouette": s, "silhouette_pct": 100.0 * s, "inertia": r.inertia, "n_iter": r.n_iter,
            "sizes": np.bincount(r.labels, minlength=k).tolist(),
        })
    best = max(rows, key=lambda row: (row["silhouette"], -row["k"]))["k"]
    return ChooseKResult(rows, best, results)


def cluster_membership(pids, labels, rule: str = "majority", min_share: float = 0.2,
                       k: int | None = None) -> dict[int, list[int]]:
    """The identity set S_c of every cluster c: ``{c: sorted pids}``.

    ``rule="majority"`` (the paper, the default): the clusters partition the identities; each identity
    belongs to the cluster holding most of its images (ties: the lowest cluster id). The paper's K=3
    Market-1501 example ("a relative value of 0.004" = 1/250 with 751 ids) only works this way.
    ``rule="any"``: S_c = identities with at least one image in c; most identities then land in every
    cluster and SLSR degenerates to LSRO. ``rule="min_share"``: S_c = identities with at least
    ``min_share`` of their images in c. For ``min_share`` two fallbacks keep the sparse labels well
    defined: an identity that reaches ``min_share`` nowhere joins its majority cluster, and a cluster with
    images but no identity left gets the identities with the largest share of their images in it.
    Clusters 0..k-1 are all present (k defaults to max label + 1); a cluster with no images maps to [].
    With ``majority`` a cluster with images may hold no identity's majority: it gets the identities with
    the largest share of their images in it too (they then belong to two clusters), so that generated
    images of every cluster have a label distribution.
    """
    pids = np.asarray(pids)
    labels = np.asarray(labels, dtype=np.int64)
    if len(pids) != len(labels):
        raise ClusteringError(f"pids ({len(pids)}) and labels ({len(labels)}) differ in length")
    if len(labels) == 0:
        raise ClusteringError("no images to build cluster membership from")
    if labels.min() < 0:
        raise ClusteringError(f"cluster labels must be >= 0, got {labels.min()}")
    if rule not in MEMBERSHIP_RULES:
        raise ClusteringError(f"unknown membership rule {rule!r}; choose one of {MEMBERSHIP_RULES}")
    k = int(k if k is not None else labels.max() + 1)
    uniq, pid_idx = np.unique(pids, return_inverse=True)
    counts = np.zeros((len(uniq), k), np.int64)  # images of identity i in cluster c
    np.add.at(counts, (pid_idx, labels), 1)
    share = counts / counts.sum(axis=1, keepdims=True)
    if rule == "any":
        member = counts > 0
    elif rule == "majority":
        member = np.zeros_like(counts, dtype=bool)
        member[np.arange(len(uniq)), counts.argmax(axis=1)] = True  # argmax: first (lowest) id on ties
    else:
        if not 0.0 < min_share <= 1.0:
            raise ClusteringError(f"min_share must be in (0, 1], got {min_share}")
        member = share >= min_share - 1e-12
        orphans = ~member.any(axis=1)
        member[np.flatnonzero(orphans), share[orphans].argmax(axis=1)] = True
    for c in np.flatnonzero((counts.sum(axis=0) > 0) & ~member.any(axis=0)):
        member[:, c] = np.isclose(share[:, c], share[:, c].max())
    return {c: sorted(int(p) for p in uniq[member[:, c]]) for c in range(k)}


def membership_report(members: dict[int, list[int]], num_ids: int) -> tuple[str, float]:
    """One log line with |S_c| per cluster, and the mean share of all identities a generated image's
    label spreads over (1.0: every S_c holds every identity, i.e. SLSR is LSRO)."""
    sizes = {c: len(p) for c, p in sorted(members.items())}
    spread = float(np.mean([n / max(num_ids, 1) for n in sizes.values()])) if sizes else 0.0
    line = "|S_c| per cluster: " + ", ".join(f"c{c}={n}" for c, n in sizes.items()) + f" of {num_ids} identities"
    return line, spread


# SLSR labels that spread over more than this share of the identities are close to LSRO's uniform ones
NEAR_UNIFORM_SHARE = 0.9


# --------------------------------------------------------------------------------------------------
# The cluster stage
# --------------------------------------------------------------------------------------------------


def _feature_files(features_dir: str) -> list[str]:
    if not storage.exists(storage.join(features_dir, "_SUCCESS")):
        raise ClusteringError(
            f"{features_dir} is not a finished feature extraction (no _SUCCESS marker); run `slsr extract` first"
        )
    files = [f for f in storage.listdir(features_dir) if f.endswith(".parquet")]
    if not files:
        raise ClusteringError(f"{features_dir} has a _SUCCESS marker but no parquet shards")
    return [storage.join(features_dir, f) for f in files]


def load_feature_shards(features_dir: str, num_shards: int | None = None) -> tuple[pa.Table, _Shards]:
    """The id columns (path, pid, camid, row_index) of a feature extraction, read on the driver, and
    its features as object-store shards read by tasks (the feature matrix never passes through the
    driver). Rows are in shard-file order, the same in both."""

    files = _feature_files(features_dir)
    num_shards = min(num_shards or _default_num_shards(), len(files))
    groups = [g.tolist() for g in np.array_split(np.array(files, dtype=object), num_shards)]
    refs = [_remote(_read_feature_files).remote(g) for g in groups]
    import pyarrow.parquet as pq

    fs, first = storage.filesystem(files[0])
    names = pq.read_schema(first, filesystem=fs).names
    id_cols = [c for c in ("path", "pid", "camid", "row_index") if c in names]
    meta = pa.concat_tables([storage.read_table(f, columns=id_cols) for g in groups for f in g])
    shards = to_shards(refs)
    if shards.n != meta.num_rows:
        raise ClusteringError(f"{features_dir}: {meta.num_rows} id rows but {shards.n} feature rows")
    return meta, shards


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def run_clustering(
    features_dir: str,
    output_dir: str,
    ks: Sequence[int] = (2, 3, 4, 5),
    rule: str = "majority",
    min_share: float = 0.2,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    sample_size: int | None = SILHOUETTE_SAMPLE_SIZE,
    num_shards: int | None = None,
    use_gpu: bool | None = None,
) -> dict:
    """The cluster stage: k-means for each K, silhouette table, membership; writes the artifact
    described in the module docstring under ``output_dir`` (local or s3://) and returns
    ``{"silhouette": {K: s}, "best_k": K, "rows": [...]}``. ``silhouette.json`` is written last, so its
    presence marks a complete artifact."""
    if rule not in MEMBERSHIP_RULES:
        raise ClusteringError(f"unknown membership rule {rule!r}; choose one of {MEMBERSHIP_RULES}")
    meta, shards = load_feature_shards(features_dir, num_shards)
    if "pid" not in meta.column_names:
        raise ClusteringError(f"{features_dir} has no pid column; the membership needs identities")
    pids = meta["pid"].to_numpy()
    n_ids = len(np.unique(pids))
    too_big = [k for k in ks if k > n_ids]
    if too_big:
        raise ClusteringError(
            f"K={too_big} larger than the number of identities ({n_ids}) in {features_dir}; "
            "each cluster needs its own identities for the sparse labels"
        )
    marker = storage.join(output_dir, "silhouette.json")
    storage.remove(marker)  # an interrupted rerun must not look finished
    chosen = choose_k(shards, ks, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed,
                      sample_size=sample_size, use_gpu=use_gpu)
    # assignments in manifest order when the extraction recorded it
    order = np.argsort(meta["row_index"].to_numpy(), kind="stable") if "row_index" in meta.column_names else None
    for row in chosen.rows:
        k = row["k"]
        res = chosen.results[k]
        kdir = storage.join(output_dir, f"k{k}")
        cols = {c: meta[c] for c in ("path", "pid", "camid") if c in meta.column_names}
        cols["cluster"] = pa.array(res.labels, pa.int64())
        assignments = pa.table(cols)
        storage.write_table(storage.join(kdir, "assignments.parquet"),
                            assignments.take(order) if order is not None else assignments)
        storage.write_bytes(storage.join(kdir, "centroids.npy"), _npy_bytes(res.centroids.astype(np.float32)))
        members = cluster_membership(pids, res.labels, rule=rule, min_share=min_share, k=k)
        line, spread = membership_report(members, n_ids)
        log.info("K=%d (%s): %s", k, rule, line)
        if spread > NEAR_UNIFORM_SHARE:
            log.warning(
                "K=%d: the sparse labels spread over %.0f%% of the identities on average: SLSR is close to "
                "LSRO here (rule %r); the 'majority' rule partitions the identities", k, 100 * spread, rule,
            )
        sizes = np.bincount(res.labels, minlength=k)
        storage.write_json(storage.join(kdir, "membership.json"), {
            "k": k, "rule": rule, "min_share": min_share if rule == "min_share" else None,
            "silhouette": row["silhouette"], "label_spread": spread,
            "clusters": [{"cluster": c, "size": int(sizes[c]), "pids": members[c]} for c in range(k)],
        })
    storage.write_json(storage.join(output_dir, "summary.json"), {
        "features": features_dir, "rows": chosen.rows, "best_k": chosen.best_k, "seed": seed,
        "sample_size": sample_size, "n_init": n_init, "rule": rule, "min_share": min_share,
        "num_images": shards.n, "num_ids": n_ids, "dim": shards.dim,
    })
    scores = {str(r["k"]): r["silhouette"] for r in chosen.rows}
    storage.write_json(marker, {**scores, "best_k": chosen.best_k})
    log.info("cluster table:\n%s", chosen.format_table())
    return {"silhouette": {r["k"]: r["silhouette"] for r in chosen.rows}, "best_k": chosen.best_k,
            "rows": chosen.rows, "table": chosen.format_table()}
