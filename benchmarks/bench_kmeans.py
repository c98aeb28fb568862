"""k-means on N x 2,048 float32: our Ray-task k-means vs faiss.Kmeans (one process) vs scikit-learn.

All three get the same data, K, seed and iteration budget; every inertia is recomputed the same way
(exact nearest-centroid search with faiss on the full data, summed in float64) so they compare.

* ``fixed`` rows: exactly ``ITERS`` Lloyd iterations for everyone (faiss always runs its ``niter``;
  ours and scikit-learn get ``tol=0``), so times compare per iteration.
* ``converge`` rows: ours and scikit-learn with their default tolerance (faiss has no early stop).

Ours includes putting the array into the object store (``ours_put_s`` shows that part); Ray start-up is
excluded; faiss's time includes the search that labels the data (the others return labels). The
data is an overlapping Gaussian mixture of 20 groups in 2,048-d, non-negative like pooled ReLU
features. Sizes: ``small`` N = 20,000, ``market`` N = 200,000.

    python benchmarks/bench_kmeans.py --size small
"""

from __future__ import annotations

import os
import time

import numpy as np
from common import chosen_size, report, size_parser

SIZES = {"small": 20_000, "market": 200_000}
DIM = 2048
ITERS = 20
KS = (3, 5)


def make_data(n: int, d: int = DIM, groups: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.gamma(2.0, 0.5, size=(groups, d)).astype(np.float32)
    X = np.empty((n, d), np.float32)
    which = rng.integers(groups, size=n)
    for start in range(0, n, 20_000):  # chunked to keep the float64 temporaries small
        stop = min(n, start + 20_000)
        noise = rng.standard_normal((stop - start, d), dtype=np.float32) * 2.0
        X[start:stop] = np.maximum(centers[which[start:stop]] + noise, 0)
    return X


def exact_inertia(X: np.ndarray, centroids: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatL2(X.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    total = 0.0
    for start in range(0, len(X), 50_000):
        dist, _ = index.search(X[start : start + 50_000], 1)
        total += float(np.maximum(dist, 0).sum(dtype=np.float64))
    return total


def _ours(X, k, fixed, seed):
    from slsr_ray.cluster import kmeans, to_shards

    t0 = time.perf_counter()
    shards = to_shards(X)
    t_put = time.perf_counter() - t0
    if fixed:
        res = kmeans(shards, k, n_init=1, max_iter=ITERS, tol=0.0, inertia_tol=-1.0, seed=seed)
    else:
        res = kmeans(shards, k, n_init=1, seed=seed)
    total = time.perf_counter() - t0
    return total, t_put, res.centroids, res.n_iter


def _faiss(X, k, seed):
    import faiss

    t0 = time.perf_counter()
    km = faiss.Kmeans(X.shape[1], k, niter=ITERS, seed=seed, max_points_per_centroid=len(X), verbose=False)
    km.train(X)
    km.index.search(X, 1)  # the labels: ours and scikit-learn return them too
    return time.perf_counter() - t0, km.centroids, ITERS


def _sklearn(X, k, fixed, seed):
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    km = KMeans(k, n_init=1, random_state=seed, max_iter=ITERS if fixed else 300, tol=0.0 if fixed else 1e-4)
    km.fit(X)
    return time.perf_counter() - t0, km.cluster_centers_, int(km.n_iter_)


def run(size: str = "small") -> list[dict]:
    import ray

    n = SIZES[size]
    X = make_data(n)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, object_store_memory=max(300 * 2**20, int(X.nbytes * 2.5)))
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    cpus = int(ray.cluster_resources().get("CPU", 1))
    _ours(X[:2000], 2, True, 0)  # warm the Ray workers (imports) so start-up is not timed
    rows = []
    for k in KS:
        ours_s, put_s, ours_c, ours_it = _ours(X, k, True, 0)
        ours_inertia = exact_inertia(X, ours_c)
        f_s, f_c, f_it = _faiss(X, k, 0)
        f_inertia = exact_inertia(X, f_c)
        s_s, s_c, s_it = _sklearn(X, k, True, 0)
        s_inertia = exact_inertia(X, s_c)
        base = {"size": size, "n": n, "d": DIM, "k": k, "cpus": cpus, "ours_iters": ours_it,
                "ours_put_s": round(put_s, 3), "ours_inertia": ours_inertia}
        rows.append({**base, "name": f"kmeans fixed {ITERS} iters k={k}", "ours_s": ours_s, "peer": "faiss.Kmeans",
                     "peer_s": f_s, "ratio": ours_s / f_s, "peer_iters": f_it, "peer_inertia": f_inertia,
                     "inertia_rel_diff": (ours_inertia - f_inertia) / f_inertia})
        rows.append({**base, "name": f"kmeans fixed {ITERS} iters k={k}", "ours_s": ours_s,
                     "peer": "sklearn.KMeans", "peer_s": s_s, "ratio": ours_s / s_s, "peer_iters": s_it,
                     "peer_inertia": s_inertia, "inertia_rel_diff": (ours_inertia - s_inertia) / s_inertia})
        ours_s, put_s, ours_c, ours_it = _ours(X, k, False, 0)
        ours_inertia = exact_inertia(X, ours_c)
        s_s, s_c, s_it = _sklearn(X, k, False, 0)
        s_inertia = exact_inertia(X, s_c)
        rows.append({**base, "name": f"kmeans to convergence k={k}", "ours_s": ours_s, "ours_iters": ours_it,
                     "ours_put_s": round(put_s, 3), "ours_inertia": ours_inertia, "peer": "sklearn.KMeans",
                     "peer_s": s_s, "ratio": ours_s / s_s, "peer_iters": s_it, "peer_inertia": s_inertia,
                     "inertia_rel_diff": (ours_inertia - s_inertia) / s_inertia})
    return rows




def main(argv: list[str] | None = None) -> list[dict]:
    args = size_parser(__doc__, SIZES).parse_args(argv)
    size = chosen_size(args)
    cols = ["name", "peer", "ours_s", "peer_s", "ratio", "ours_iters", "peer_iters", "ours_inertia",
            "peer_inertia", "inertia_rel_diff", "ours_put_s"]
    return report("kmeans", size, run(size), cols)


if __name__ == "__main__":
    main()
