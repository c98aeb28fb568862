"""k-means on N x 2,048 float32: our Ray k-means vs faiss.Kmeans vs scikit-learn, same iterations.

All get the same data, K, seed and iteration budget; every inertia is recomputed the same way (exact
nearest-centroid search with faiss on the full data, summed in float64) so they compare.

* ``fixed`` rows: exactly ``ITERS`` Lloyd iterations for ours (``tol=None``) and faiss (``niter``).
  scikit-learn cannot be forced past a fixed point (it stops when no label changes, even at
  ``tol=0``), so its rows also give the time per iteration it ran.
* ``same start`` rows: ours (``local``) and faiss, ``ITERS`` iterations each from the same initial
  centroids (K random rows): the cost of the Lloyd iterations alone, without the seeding (ours:
  k-means++ on a sample; faiss: random rows).
* ``converge`` rows: ours and scikit-learn with their default tolerance (faiss has no early stop).

Our time is k-means on shards already in the object store (as the cluster stage has them: tasks read
the feature parquet into it); ``ours_put_s`` is what putting an in-memory array there and checking it
costs, and ``ratio_with_put`` includes it. Every mode of ours is timed (``local``: the whole k-means
in one task; ``actors``: resident shard actors, an actor call per group of shards and iteration; ``auto`` picks by size) to locate the
crossover. The peers run inside a Ray task given the same CPUs as ours: Ray runs its workers at
nice 15, so on a shared machine a peer in the driver would get more CPU than ours. Every timing is
the minimum of ``REPEAT`` runs, taken in interleaved rounds (ours, faiss, scikit-learn, ours, ...) so
load from others on a shared machine hits every method alike; all times are kept in the JSON.

Data: an overlapping Gaussian mixture of 20 groups in 2,048-d, non-negative like pooled ReLU
features. Sizes: ``small`` N = 20,000; ``market`` N = 200,000; ``scan`` 20k, 50k, 100k and 200k.

    python benchmarks/bench_kmeans.py --size small
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
from common import chosen_size, report, size_parser

SIZES = {"small": (20_000,), "market": (200_000,), "scan": (20_000, 50_000, 100_000, 200_000)}
DIM = 2048
ITERS = 20
KS = (3, 5)
REPEAT = 3


def make_data(n: int, d: int = DIM, groups: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.gamma(2.0, 0.5, size=(groups, d)).astype(np.float32)
    X = np.empty((n, d), np.float32)
    which = rng.integers(groups, size=n)
    for start in range(0, n, 20_000):  # chunked to keep the temporaries small
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


def _peer(X: np.ndarray, k: int, which: str, fixed: bool, seed: int, cpus: int, init: np.ndarray | None = None) -> dict:
    """faiss or scikit-learn, timed inside a Ray task that holds ``cpus`` CPUs (like ours); faiss from
    ``init`` when given (``ITERS`` iterations from those centroids, no seeding)."""
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(cpus)
    with threadpool_limits(limits=cpus):
        t0 = time.perf_counter()
        if which == "faiss":
            km = faiss.Kmeans(X.shape[1], k, niter=ITERS, seed=seed, max_points_per_centroid=len(X))
            km.train(X, init_centroids=init)
            km.index.search(X, 1)  # the labels: ours and scikit-learn return them too
            out = {"centroids": km.centroids, "iters": ITERS}
        else:
            from sklearn.cluster import KMeans

            km = KMeans(k, n_init=1, random_state=seed, max_iter=ITERS if fixed else 300,
                        tol=0.0 if fixed else 1e-4).fit(X)
            out = {"centroids": km.cluster_centers_, "iters": int(km.n_iter_)}
        return {**out, "seconds": time.perf_counter() - t0}


@contextlib.contextmanager
def _iteration_probe():
    """Times every Lloyd step of ``mode="actors"`` in the driver: the round trip of ``step`` (call the
    resident shard actors, wait for all), the slowest shard's own compute (``seconds`` in its partial result), and
    the reduce (``_m_step``). Yields the dict of lists it fills."""
    import slsr_ray.kmeans as km

    times: dict = {"round_trip": [], "task_compute": [], "reduce": []}
    step, m_step = km._ActorSteps.step, km._m_step

    def timed_step(self, *args):
        t0 = time.perf_counter()
        parts = step(self, *args)
        times["round_trip"].append(time.perf_counter() - t0)
        times["task_compute"].append(max(p["seconds"] for p in parts))
        return parts

    def timed_m_step(*args):
        t0 = time.perf_counter()
        out = m_step(*args)
        times["reduce"].append(time.perf_counter() - t0)
        return out

    km._ActorSteps.step, km._m_step = timed_step, timed_m_step
    try:
        yield times
    finally:
        km._ActorSteps.step, km._m_step = step, m_step


def _ours(shards, k: int, mode: str, fixed: bool, seed: int, init: np.ndarray | None = None) -> dict:
    from slsr_ray.kmeans import kmeans

    with _iteration_probe() as times:
        t0 = time.perf_counter()
        res = (kmeans(shards, k, n_init=1, max_iter=ITERS, tol=None, seed=seed, mode=mode, init=init) if fixed
               else kmeans(shards, k, n_init=1, seed=seed, mode=mode))
        seconds = time.perf_counter() - t0
    out = {"centroids": res.centroids, "iters": res.n_iter, "seconds": seconds}
    if times["round_trip"]:  # medians over the steps: where one iteration of the task mode goes
        med = {key: 1000 * float(np.median(v)) for key, v in times.items() if v}
        out["iteration_ms"] = {"round_trip": med["round_trip"], "task_compute": med["task_compute"],
                               "overhead": med["round_trip"] - med["task_compute"], "reduce": med.get("reduce", 0.0)}
    return out


def _interleaved(runs: dict, repeat: int) -> dict:
    """Call every ``runs[name]()`` once per round, ``repeat`` rounds (so a burst of load on the shared
    machine hits all of them alike); per name the fastest result plus all the times."""
    results: dict = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            load = os.getloadavg()[0]  # a shared machine: how busy it was when this run started
            results[name].append({**fn(), "load_1m": load})
            print(f"  {name}: {results[name][-1]['seconds']:.3f} s (load {load:.1f})", flush=True)
    out = {}
    for name, rs in results.items():
        best = dict(min(rs, key=lambda r: r["seconds"]))
        best["all_seconds"] = [round(r["seconds"], 3) for r in rs]
        best["all_load_1m"] = [round(r["load_1m"], 2) for r in rs]
        out[name] = best
    return out


def _init_ray(nbytes: int) -> int:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # the peer task's function lives in this module: let the (local) workers import it
        here, root = os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, root, os.environ.get("PYTHONPATH")) if p)
        ray.init(include_dashboard=False, object_store_memory=max(300 * 2**20, int(nbytes * 2.5) + 2**28))
    return int(ray.cluster_resources().get("CPU", 1))


def _rows_for(X: np.ndarray, k: int, size: str, cpus: int, repeat: int, sklearn: bool = True,
              converge: bool = True) -> list[dict]:
    import ray

    from slsr_ray.kmeans import auto_mode as pick_mode
    from slsr_ray.kmeans import to_shards

    n = len(X)
    t0 = time.perf_counter()
    shards = to_shards(X)
    put_s = time.perf_counter() - t0
    xref = ray.put(X)
    peer = ray.remote(num_cpus=cpus)(_peer)
    auto_mode = pick_mode(n * DIM * 4, use_gpu=False)
    start = X[np.random.default_rng(0).choice(n, size=k, replace=False)]  # one start for both: no seeding
    runs = {
        "faiss_start": lambda: ray.get(peer.remote(xref, k, "faiss", True, 0, cpus, start)),
        "local_start": lambda: _ours(shards, k, "local", True, 0, start),
        "faiss": lambda: ray.get(peer.remote(xref, k, "faiss", True, 0, cpus)),
        "sklearn": lambda: ray.get(peer.remote(xref, k, "sklearn", True, 0, cpus)),
        "local": lambda: _ours(shards, k, "local", True, 0),
        "actors": lambda: _ours(shards, k, "actors", True, 0),
        "sklearn_conv": lambda: ray.get(peer.remote(xref, k, "sklearn", False, 0, cpus)),
        "auto_conv": lambda: _ours(shards, k, "auto", False, 0),
    }
    if not sklearn:
        del runs["sklearn"], runs["sklearn_conv"]
    if not converge:
        runs.pop("sklearn_conv", None)
        del runs["auto_conv"]
    got = _interleaved(runs, repeat)
    inertia = {name: exact_inertia(X, r["centroids"]) for name, r in got.items()}
    base = {"size": size, "n": n, "d": DIM, "k": k, "cpus": cpus, "ours_put_s": put_s}
    rows = []
    for mode in ("local", "actors"):
        ours = got[mode]
        common = {**base, "name": f"kmeans fixed {ITERS} iters k={k} n={n} mode={mode}"
                  + (" (auto)" if mode == auto_mode else ""), "mode": mode, "auto": mode == auto_mode,
                  "ours_s": ours["seconds"], "ours_all_s": ours["all_seconds"], "ours_iters": ours["iters"],
                  "ours_per_iter_ms": 1000 * ours["seconds"] / ours["iters"], "ours_inertia": inertia[mode],
                  "ours_all_load_1m": ours["all_load_1m"]}
        if "iteration_ms" in ours:
            common.update({f"iter_{key}_ms": v for key, v in ours["iteration_ms"].items()})
        for name, key in (("faiss.Kmeans", "faiss"), ("sklearn.KMeans", "sklearn")):
            if key not in got:
                continue
            r = got[key]
            rows.append({**common, "peer": name, "peer_s": r["seconds"], "peer_all_s": r["all_seconds"],
                         "peer_iters": r["iters"], "peer_per_iter_ms": 1000 * r["seconds"] / r["iters"],
                         "ratio": ours["seconds"] / r["seconds"],
                         "ratio_with_put": (ours["seconds"] + put_s) / r["seconds"],
                         "per_iter_ratio": (ours["seconds"] / ours["iters"]) / (r["seconds"] / r["iters"]),
                         "peer_inertia": inertia[key], "peer_all_load_1m": r["all_load_1m"],
                         "inertia_rel_diff": (inertia[mode] - inertia[key]) / inertia[key]})
    ours, peer_start = got["local_start"], got["faiss_start"]
    rows.append({**base, "name": f"kmeans same start {ITERS} iters k={k} n={n} mode=local", "mode": "local",
                 "auto": auto_mode == "local", "ours_s": ours["seconds"], "ours_all_s": ours["all_seconds"],
                 "ours_iters": ours["iters"], "ours_per_iter_ms": 1000 * ours["seconds"] / ours["iters"],
                 "ours_inertia": inertia["local_start"], "peer": "faiss.Kmeans (same start)",
                 "peer_s": peer_start["seconds"], "peer_all_s": peer_start["all_seconds"],
                 "peer_iters": peer_start["iters"], "peer_per_iter_ms": 1000 * peer_start["seconds"] / ITERS,
                 "ratio": ours["seconds"] / peer_start["seconds"],
                 "per_iter_ratio": (ours["seconds"] / ours["iters"]) / (peer_start["seconds"] / ITERS),
                 "peer_inertia": inertia["faiss_start"],
                 "inertia_rel_diff": (inertia["local_start"] - inertia["faiss_start"]) / inertia["faiss_start"]})
    if "sklearn_conv" not in got or "auto_conv" not in got:
        return rows
    ours, sk = got["auto_conv"], got["sklearn_conv"]
    rows.append({**base, "name": f"kmeans to convergence k={k} n={n} mode=auto ({auto_mode})", "mode": auto_mode,
                 "ours_s": ours["seconds"], "ours_all_s": ours["all_seconds"], "ours_iters": ours["iters"],
                 "ours_inertia": inertia["auto_conv"], "peer": "sklearn.KMeans", "peer_s": sk["seconds"],
                 "peer_all_s": sk["all_seconds"], "peer_iters": sk["iters"], "ratio": ours["seconds"] / sk["seconds"],
                 "peer_inertia": inertia["sklearn_conv"],
                 "inertia_rel_diff": (inertia["auto_conv"] - inertia["sklearn_conv"]) / inertia["sklearn_conv"]})
    return rows


def run(size: str = "small", repeat: int = REPEAT, sklearn_max_n: int | None = None, ns: tuple | None = None,
        ks: tuple = KS, converge: bool = True) -> list[dict]:
    """Rows for every N of ``size`` (or ``ns``) and K in ``ks``: each mode of ours vs faiss and
    scikit-learn (scikit-learn only up to ``sklearn_max_n`` points when given: it is the slow one;
    ``converge=False``: the fixed-iteration rows only)."""
    from slsr_ray.kmeans import kmeans

    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    ns = tuple(ns or SIZES[size])
    cpus = _init_ray(max(ns) * DIM * 4)
    warm = make_data(2000)
    for mode in ("local", "actors"):  # start the Ray workers and their imports outside the timings
        kmeans(warm, 2, n_init=1, max_iter=2, tol=None, mode=mode)
    rows = []
    for n in ns:
        X = make_data(n)
        for k in ks:
            print(f"n={n} k={k}", flush=True)
            rows += _rows_for(X, k, size, cpus, repeat, sklearn=sklearn_max_n is None or n <= sklearn_max_n,
                              converge=converge)
        del X
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = size_parser(__doc__, SIZES)
    parser.add_argument("--repeat", type=int, default=REPEAT, help="runs per measurement (the minimum is kept)")
    parser.add_argument("--sklearn-max-n", type=int, default=None, help="run scikit-learn only up to this many points")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="these N instead of the size's")
    parser.add_argument("--k", type=int, nargs="+", default=list(KS), help="these K (default: 3 5)")
    parser.add_argument("--fixed-only", action="store_true", help="skip the run-to-convergence rows")
    args = parser.parse_args(argv)
    size = chosen_size(args)
    cols = ["name", "peer", "ours_s", "peer_s", "ratio", "per_iter_ratio", "ours_iters", "peer_iters",
            "ours_per_iter_ms", "peer_per_iter_ms", "iter_round_trip_ms", "iter_task_compute_ms", "inertia_rel_diff",
            "load_avg_1m"]
    return report("kmeans", size, run(size, args.repeat, args.sklearn_max_n, args.n, tuple(args.k),
                                       not args.fixed_only), cols)


if __name__ == "__main__":
    main()
