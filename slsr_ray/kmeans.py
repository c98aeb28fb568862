"""The k-means kernel of step 3: Lloyd's algorithm over feature shards in the Ray object store.

One Lloyd step per shard is :func:`_partial_step`: squared distances to the centroids as one
``addmm`` (||c||^2 - 2 x.c; the row norms ||x||^2 are computed once per shard, when the shard is
checked), the nearest centroid per row, and the per-cluster partial sums, counts, inertia and farthest
rows. The sums are incremental: a step adds only the rows that changed cluster (and subtracts them
from their old one), so once few rows move a step is one pass over the data -- the distance GEMM --
instead of two. Only ``k x d`` numbers leave a shard per step; the driver reduces them.

Two ways to run the steps, with the same arithmetic and so the same result (``mode``):

* ``"local"``: the whole k-means (every restart) in one Ray task that maps all shards (zero-copy on
  one node) and runs on all of that node's cores -- no per-iteration round trips.
* ``"actors"`` (``"tasks"`` is its old name and means the same): a pool of resident shard actors
  (:class:`_ShardWorker`, one per group of shards, at most one per free CPU, or one per shard on a GPU
  share), each placed next to its shards and mapping them once (zero-copy on its node). A Lloyd step
  is one actor call per worker (centroids in, partial sums out): no task lease or scheduling per
  iteration. The actors live for one :func:`kmeans` call and are killed when it returns or raises.

``"auto"`` picks ``"local"`` up to :data:`LOCAL_MAX_BYTES` of features on a CPU-only cluster and
``"actors"`` above it or with GPUs. Measured on the idle 2-core machine (``bench_kmeans.py --size
scan``; benchmarks/RESULTS.md "Issue 17.4"), exactly 20 iterations at 20k-200k x 2,048: a whole
``local`` call takes 0.86-1.35x of ``faiss.Kmeans``'s time at K=3 and 1.25-1.6x at K=5 (k-means++
seeding on a 10k-row sample is a fixed ~0.1 s that faiss's random init does not pay), and 0.2-0.3x of
scikit-learn's time per iteration. The actors take 2.3-9x faiss's time (a process per shard group to
start per call), so on one node the two modes do not cross below 200k; the actors are for features
beyond one task's share, and for GPUs.

Empty clusters are re-seeded after every M-step at the candidate point farthest from every other
centroid (candidates: each shard's rows farthest from their own centroid, as scikit-learn and faiss
re-seed), and the final labels are checked: k-means never returns an empty cluster (it raises when the
features have too few distinct points to fill K clusters).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np

from .feature_shards import (  # noqa: F401  (ClusteringError, to_shards: part of this module's API)
    ClusteringError,
    _cluster_gpus,
    _global_to_local,
    _remote,
    _Shards,
    to_shards,
)

log = logging.getLogger(__name__)

#: Restarts whose inertias differ by less than this (relative) are a tie, kept by the earliest restart.
INERTIA_TIE_RTOL = 1e-6

#: Default number of points k-means++ seeds from (a uniform sample of the data, seeded).
INIT_SAMPLE_SIZE = 10_000

#: ``mode="auto"`` runs k-means in one Ray task up to this many bytes of features (all shards mapped
#: by one worker; 262k x 2,048): on one node the resident actors did not beat it below 200k x 2,048,
#: where whole calls tie on 16 idle cores (module docstring; benchmarks/RESULTS.md "Issue 17.4").
LOCAL_MAX_BYTES = 2 * 1024**3

#: ``"tasks"`` is the old name of ``"actors"`` (the distributed mode once ran a task per shard and step).
MODES = ("auto", "local", "actors", "tasks")

#: Feature rows per chunk of a Lloyd step's distance GEMM (a [rows, k] distance block at a time).
#: Large chunks: the GEMM runs at memory speed and the per-chunk op overhead is paid rarely.
STEP_CHUNK_ROWS = 16_384


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
# Work next to the data (Ray tasks, or the local task)
# --------------------------------------------------------------------------------------------------


def _partial_step(x: np.ndarray, x_sq: np.ndarray, centroids: np.ndarray, num_far: int, want_labels: bool,
                  device=None, state: dict | None = None) -> dict:
    """Assign every row of ``x`` to its nearest centroid; return the partial k-means statistics (and
    ``seconds``: how long that took here, for the per-iteration breakdown in bench_kmeans.py).

    ``state`` (a dict kept by the caller per shard, empty at first) makes the per-cluster sums
    incremental on CPUs: the first step sums every row, later ones only add the rows that changed cluster
    to their new cluster and subtract them from their old one (float64 totals). After the first
    iterations few rows move, so a step is about one pass over the data (the distance GEMM) instead of
    two. Rows that moved are compared with the labels of the previous step, whatever its centroids.
    Above 1/8 of the rows moving, summing every row again is cheaper (gathering 16 % of 10k x 2,048
    rows and two ``index_add_`` took 6.1 ms, one ``index_add_`` over all of them 5.3 ms).
    """
    import time

    import torch

    t0 = time.perf_counter()
    warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # object-store views; only read
    k, d = centroids.shape
    dev = torch.device(device or "cpu")
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(dev)
    c_sq = (c.double() ** 2).sum(1).float()[None, :]
    n = len(x)
    state = {} if state is None else state
    dists = np.empty(n, np.float32)
    labels = np.empty(n, np.int64)

    def cluster_sums(rows: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        # float32 sums of the rows per cluster, widened to float64 (totals accumulate in float64)
        return torch.zeros((k, d), dtype=torch.float32, device=rows.device).index_add_(0, lab, rows).double()

    # On a GPU the sums are made right beside the distances (every chunk crosses to the device once);
    # on CPUs after them, incrementally when few rows moved (the GEMM pass alone runs at memory speed).
    fused = dev.type != "cpu"
    sums = torch.zeros((k, d), dtype=torch.float64, device=dev)
    for start in range(0, n, STEP_CHUNK_ROWS):
        stop = min(n, start + STEP_CHUNK_ROWS)
        chunk = torch.from_numpy(x[start:stop]).to(dev)  # a read-only view is fine: torch only reads it
        # ||x||^2 is the same for every centroid, so the nearest one minimises ||c||^2 - 2 x.c.
        best, lab = torch.addmm(c_sq, chunk, c.T, beta=1.0, alpha=-2.0).min(1)
        if fused:
            sums += cluster_sums(chunk, lab)
        labels[start:stop] = lab.cpu().numpy()
        dists[start:stop] = best.cpu().numpy()
    prev = state.get("labels")
    moved = None if prev is None or state["sums"].shape != (k, d) else np.flatnonzero(labels != prev)
    if not fused and moved is not None and len(moved) <= n // 8:  # few rows moved: update the last sums
        sums_np = state["sums"].copy()
        if len(moved):
            rows = torch.from_numpy(x[moved])
            gained = cluster_sums(rows, torch.from_numpy(labels[moved]))
            lost = cluster_sums(rows, torch.from_numpy(prev[moved]))
            sums_np += gained.numpy() - lost.numpy()
    else:
        if not fused:  # every row, chunk by chunk as in the fused loop
            for start in range(0, n, STEP_CHUNK_ROWS):
                stop = min(n, start + STEP_CHUNK_ROWS)
                sums += cluster_sums(torch.from_numpy(x[start:stop]), torch.from_numpy(labels[start:stop]))
        sums_np = sums.cpu().numpy()
    state["labels"], state["sums"] = labels, sums_np
    dists += x_sq
    np.maximum(dists, 0.0, out=dists)  # ||x||^2+||c||^2-2xc can dip below 0 in float32
    far = np.argpartition(-dists, min(num_far, n) - 1)[:num_far]
    out = {"sums": sums_np, "counts": np.bincount(labels, minlength=k), "inertia": float(dists.sum(dtype=np.float64)),
           "far_rows": far, "far_dist": dists[far]}
    if want_labels:
        out["labels"] = labels
    out["seconds"] = time.perf_counter() - t0
    return out


class _ShardWorker:
    """A resident k-means worker (Ray actor) holding a few shards for the whole k-means call.

    It maps its shards once (``ray.get``: zero-copy when they are on its node, one transfer otherwise)
    and then serves every Lloyd step as an actor method call: no task lease, scheduling or shard
    fetch per iteration, only the k x d centroids in and the partial sums out."""

    def __init__(self, refs: list, sq_refs: list, use_gpu: bool, threads: int):
        import ray
        import torch

        from .gpu import device_for, gpu_assigned

        self.arrays, self.row_sqs = ray.get(list(refs)), ray.get(list(sq_refs))
        # a GPU actor on a node without CUDA: CPU tensors, said once
        self.device = device_for(use_gpu and gpu_assigned(), "k-means assignment")
        torch.set_num_threads(threads)  # Ray starts workers with OMP_NUM_THREADS = their num_cpus (often 1)
        self.states = [{} for _ in self.arrays]  # per shard: last labels and sums (incremental steps)

    def step(self, centroids: np.ndarray, num_far: int, want_labels: bool) -> list[dict]:
        return [_partial_step(a, s, centroids, num_far, want_labels, self.device, st)
                for a, s, st in zip(self.arrays, self.row_sqs, self.states, strict=True)]

    def take(self, shard_rows: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        """Rows of this worker's shards: ``(shard index within the worker, local rows)`` pairs."""
        return [np.array(self.arrays[i][rows], dtype=np.float32) for i, rows in shard_rows]

    def ping(self) -> bool:
        return True


def _placement(refs: list) -> list[str | None]:
    """The node holding each shard (None where unknown): actors go next to their shards."""
    try:
        from ray.experimental import get_object_locations

        locs = get_object_locations(list(refs))
        return [((locs.get(r) or {}).get("node_ids") or [None])[0] for r in refs]
    except Exception:  # an experimental API: placement is an optimisation, never a failure
        return [None] * len(refs)


# --------------------------------------------------------------------------------------------------
# Where the Lloyd steps run
# --------------------------------------------------------------------------------------------------


class _ActorSteps:
    """Lloyd steps on a pool of resident :class:`_ShardWorker` actors (``mode="actors"``/``"tasks"``).

    The shards are split into ``workers`` contiguous groups (shard order, so the labels concatenate
    in order); each group's actor is placed (softly) on the node that holds most of its shards. Call
    :meth:`close` (k-means does, in a ``finally``) to kill the actors."""

    def __init__(self, shards: _Shards, workers: int, use_gpu: bool, gpu_per_actor: float, threads: int):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.shards = shards
        nshards = len(shards.refs)
        bounds = np.linspace(0, nshards, workers + 1).astype(int)
        self.groups = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        where = _placement(shards.refs)
        opts: dict = {"num_cpus": threads}
        if use_gpu:
            from . import gpu

            opts = {"num_gpus": gpu_per_actor,
                    "num_cpus": max(0.01, gpu.cpus_beside(len(self.groups), gpu_per_actor, 1.0))}
        cls = _remote(_ShardWorker, **opts)
        self.actors = []
        try:
            # Each group next to the node holding most of its shards -- unless that says nothing (every
            # shard on one node, e.g. put there by the driver on a head without GPUs): then spread the
            # actors over the nodes, or a multi-node cluster would run all of k-means on one of them.
            homes = [max(set(ns), key=ns.count) if (ns := [where[i] for i in g if where[i]]) else None
                     for g in self.groups]
            informative = len({h for h in homes if h}) > 1
            for g, home in zip(self.groups, homes, strict=True):
                strategy = NodeAffinitySchedulingStrategy(home, soft=True) if informative and home else "SPREAD"
                self.actors.append(cls.options(scheduling_strategy=strategy).remote(
                    [shards.refs[i] for i in g], [shards.sq_refs[i] for i in g], use_gpu, threads))
            ray.get([a.ping.remote() for a in self.actors])  # shards mapped: the first step is a plain step
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def step(self, centroids: np.ndarray, num_far: int, want_labels: bool) -> list[dict]:
        import ray

        # k x d centroids go inline with each call (under Ray's 100 KB inline limit for k x 2,048 up to
        # k = 12): no object-store put and fetch per iteration
        cref = ray.put(centroids) if centroids.nbytes > 64 * 1024 else centroids
        per_actor = ray.get([a.step.remote(cref, num_far, want_labels) for a in self.actors])
        return [p for parts in per_actor for p in parts]  # shard order

    def _take(self, wanted: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Rows ``wanted[shard]`` (local indices) of each listed shard, from the actors holding them."""
        import ray

        calls = []
        for a, g in zip(self.actors, self.groups, strict=True):
            pairs = [(j, wanted[i]) for j, i in enumerate(g) if i in wanted]
            if pairs:
                calls.append(([g[j] for j, _ in pairs], a.take.remote(pairs)))
        got = {}
        for ids, rows in zip([c[0] for c in calls], ray.get([c[1] for c in calls]), strict=True):
            got.update(zip(ids, rows, strict=True))
        return got

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shards.dim), np.float32)
        where = list(_global_to_local(self.shards.offsets, rows))
        got = self._take({s: local for s, _, local in where})
        for s, pos, _ in where:
            out[pos] = got[s]
        return out

    def take_far(self, parts: list[dict]) -> np.ndarray:
        got = self._take({i: p["far_rows"] for i, p in enumerate(parts)})
        return np.concatenate([got[i] for i in range(len(parts))])


class _LocalSteps:
    """Lloyd steps in this process over shard arrays (inside the one task of ``mode="local"``)."""

    def __init__(self, arrays: list[np.ndarray], row_sqs: list[np.ndarray]):
        self.arrays, self.row_sqs = arrays, row_sqs
        self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)
        self.states = [{} for _ in arrays]  # per shard: last labels and sums (incremental steps)

    def step(self, centroids: np.ndarray, num_far: int, want_labels: bool) -> list[dict]:
        return [_partial_step(a, s, centroids, num_far, want_labels, None, st)
                for a, s, st in zip(self.arrays, self.row_sqs, self.states, strict=True)]

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.arrays[0].shape[1]), np.float32)
        for s, pos, local in _global_to_local(self.offsets, rows):
            if len(pos) == pos[-1] - pos[0] + 1:  # sorted rows: one contiguous block, copied once
                np.take(self.arrays[s], local, axis=0, out=out[pos[0] : pos[-1] + 1])
            else:
                out[pos] = self.arrays[s][local]
        return out

    def take_far(self, parts: list[dict]) -> np.ndarray:
        return np.concatenate([a[p["far_rows"]] for a, p in zip(self.arrays, parts, strict=True)])


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
    # float64 norms, not the shards' float32 ones: seeding picks by cumulative distance, and a last-bit
    # change there can pick another seed (the same partition with other cluster numbers, other GANs)
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


def _sq_dist_to(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """[len(points)] squared distance of each point to its nearest row of ``centers`` (float64)."""
    if len(centers) == 0:
        return np.full(len(points), np.inf)
    diff = points.astype(np.float64)[:, None, :] - centers.astype(np.float64)[None, :, :]
    return (diff**2).sum(-1).min(1)


def _m_step(parts: list[dict], centroids: np.ndarray, steps) -> tuple[np.ndarray, int]:
    """New centroids from the partial sums; empty clusters re-seeded. Returns (centroids, #re-seeded)."""
    sums = sum(p["sums"] for p in parts)
    counts = sum(p["counts"] for p in parts)
    new = centroids.copy()
    nonempty = counts > 0
    new[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
    empty = np.flatnonzero(~nonempty)
    if len(empty):
        # Candidates: each shard's rows farthest from their own centroid (as scikit-learn and faiss). Each
        # empty cluster goes, greedily, to the candidate farthest from every centroid it would compete
        # with, so it wins at least that point in the next E-step and two never land on the same point.
        far_x = steps.take_far(parts)
        gap = _sq_dist_to(far_x, new[nonempty])
        for c in empty:
            pick = int(np.argmax(gap))
            if gap[pick] <= 0:
                break  # every candidate coincides with a centroid: nothing distinct left to seed with
            new[c] = far_x[pick]
            gap = np.minimum(gap, _sq_dist_to(far_x, far_x[pick : pick + 1]))
    return new, len(empty)


def _lloyd(steps, init: np.ndarray, max_iter: int, shift_tol: float | None, inertia_tol: float) -> KMeansResult:
    """Lloyd iterations from ``init``; ``shift_tol=None`` runs exactly ``max_iter`` of them."""
    k = len(init)
    centroids = init.astype(np.float32)
    prev_inertia = math.inf
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is used after the loop)
        parts = steps.step(centroids, k, False)
        inertia = sum(p["inertia"] for p in parts)
        new, reseeded = _m_step(parts, centroids, steps)
        if reseeded:
            log.info("k-means: re-seeded %d empty cluster(s) at iteration %d", reseeded, n_iter)
        shift = float(((new.astype(np.float64) - centroids) ** 2).sum())
        centroids = new
        if shift_tol is not None and reseeded == 0 and (
            shift <= shift_tol or (prev_inertia - inertia) <= inertia_tol * max(inertia, 1e-30)
        ):
            converged = True
            break
        prev_inertia = inertia
    # Final E-step: labels and inertia of the returned centroids. A centroid can still lose all its
    # points here (to one re-seeded next to them), so re-seed and step again until every cluster has one.
    for _ in range(k + 1):
        parts = steps.step(centroids, k, True)
        counts = sum(p["counts"] for p in parts)
        if counts.min() > 0:
            break
        centroids, _ = _m_step(parts, centroids, steps)
        n_iter += 1
    else:
        raise ClusteringError(
            f"k-means left {int((counts == 0).sum())} of {k} clusters empty after re-seeding: the features "
            f"have fewer than {k} distinct points (a collapsed model?); use a smaller K"
        )
    labels = np.concatenate([p["labels"] for p in parts])
    return KMeansResult(centroids, labels, float(sum(p["inertia"] for p in parts)), n_iter, converged)


def _restarts(steps, n: int, k: int, n_init: int, max_iter: int, shift_tol: float | None, inertia_tol: float,
              seed: int, init_sample_size: int, init: np.ndarray | None) -> KMeansResult:
    """``n_init`` seeded k-means++ restarts (or one run from ``init``); the lowest inertia wins."""
    if init is not None:
        return _lloyd(steps, init, max_iter, shift_tol, inertia_tol)
    rng = np.random.default_rng(seed)
    best: KMeansResult | None = None
    for run in range(n_init):
        m = min(n, init_sample_size)
        rows = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
        start = kmeans_plusplus(steps.take(rows), int(k), rng)
        res = _lloyd(steps, start, max_iter, shift_tol, inertia_tol)
        log.info("k-means k=%d restart %d/%d: inertia %.6g in %d iterations", k, run + 1, n_init, res.inertia,
                 res.n_iter)
        # A restart must beat the best by more than rounding: restarts that found the same partition
        # (often with the clusters numbered differently) keep the earliest, whatever the last bits say.
        if best is None or res.inertia < best.inertia * (1 - INERTIA_TIE_RTOL):
            best = res
    return best


def _node_cores() -> int:
    """CPU cores this process may run on (its node's, unless pinned)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _local_task(refs: list, sq_refs: list, *args) -> KMeansResult:
    """``mode="local"``: every restart of k-means in this one task, on all of its node's cores.

    Why all cores and not the CPUs the task was given: the request follows Ray's view of free CPUs,
    which lags -- right after other tasks end it still counts their CPUs, so the task often got 1 CPU of
    2 and ran single-threaded (5.3 s instead of 3.0 s at 200k x 2,048, measured). In a run the cluster
    stage is the only work at that point, and the thread count is then a property of the node, not of a
    race. (Tune trials side by side on one node oversubscribe it for the seconds k-means takes.)"""
    import ray
    import torch

    arrays, row_sqs = ray.get(list(refs)), ray.get(list(sq_refs))  # zero-copy views on one node
    before = torch.get_num_threads()
    torch.set_num_threads(_node_cores())  # the worker may have started with OMP_NUM_THREADS=1
    try:
        return _restarts(_LocalSteps(arrays, row_sqs), *args)
    finally:
        torch.set_num_threads(before)


def _free_cpus() -> int:
    """CPUs free in the cluster by Ray's view (which lags task completions: a lower bound)."""
    import ray

    return max(1, int(ray.available_resources().get("CPU", 1)))


def _local_cpus() -> int:
    """CPUs the local task asks for: those free now, at most one node's worth (a task is on one node)."""
    import ray

    per_node = max((nd["Resources"].get("CPU", 0) for nd in ray.nodes() if nd.get("Alive")), default=1)
    return max(1, int(min(per_node, _free_cpus())))


def auto_mode(nbytes: int, use_gpu: bool) -> str:
    """What ``mode="auto"`` runs for ``nbytes`` of float32 features: ``"local"`` (one task) up to
    :data:`LOCAL_MAX_BYTES` on a CPU-only cluster, else ``"actors"`` (resident actors over the shards)."""
    return "local" if not use_gpu and nbytes <= LOCAL_MAX_BYTES else "actors"


def kmeans(
    features,
    k: int,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float | None = 1e-4,
    seed: int = 0,
    num_shards: int | None = None,
    init_sample_size: int = INIT_SAMPLE_SIZE,
    inertia_tol: float = 1e-6,
    use_gpu: bool | None = None,
    init: np.ndarray | None = None,
    mode: str = "auto",
) -> KMeansResult:
    """Distributed k-means (Lloyd) over Ray.

    ``features`` is a float32 [n, d] array (split into ``num_shards`` object-store shards, default one
    per cluster CPU) or a list of ``ObjectRef`` s of float32 [n_i, d] shards already in the object store.
    Each of ``n_init`` restarts seeds with greedy k-means++ on a uniform sample of ``init_sample_size``
    rows (seeded from ``seed``), then iterates until the squared centroid shift is below ``tol`` times
    the mean per-dimension data variance (scikit-learn's rule) or the inertia improves by less than
    ``inertia_tol`` (relative), or ``max_iter``. ``tol=None``: no early stop, exactly ``max_iter``
    iterations (faiss's ``niter``). The restart with the lowest inertia is returned.
    ``use_gpu``: None = run the steps on GPUs when the cluster has them. ``init``: explicit [k, d]
    starting centroids (then a single run, no k-means++). ``mode``: where the steps run (module
    docstring): ``"auto"``, ``"local"`` (one task) or ``"actors"`` (resident shard actors; ``"tasks"``
    is an alias).
    """
    # Long because Lloyd iterations with restarts and empty-cluster reseeding over shards, one loop.
    import ray

    if not isinstance(k, int | np.integer) or k < 1:
        raise ClusteringError(f"k must be a positive integer, got {k!r}")
    if n_init < 1 or max_iter < 1:
        raise ClusteringError(f"n_init and max_iter must be >= 1, got n_init={n_init}, max_iter={max_iter}")
    if mode not in MODES:
        raise ClusteringError(f"mode must be one of {MODES}, got {mode!r}")
    if tol is not None and tol < 0:
        raise ClusteringError(f"tol must be >= 0 (or None for exactly max_iter iterations), got {tol}")
    shards = to_shards(features, num_shards)
    n = shards.n
    if k > n:
        raise ClusteringError(f"k={k} is larger than the number of feature rows ({n})")
    if init is not None:
        init = np.asarray(init, dtype=np.float32)
        if init.shape != (k, shards.dim) or not np.isfinite(init).all():
            raise ClusteringError(f"init must be a finite [{k}, {shards.dim}] array, got shape {init.shape}")
    if use_gpu is None:
        use_gpu = _cluster_gpus() > 0
    if mode == "auto":
        mode = auto_mode(n * shards.dim * 4, use_gpu)
    shift_tol = None if tol is None else tol * shards.mean_var
    args = (n, int(k), n_init, max_iter, shift_tol, inertia_tol, seed, init_sample_size, init)
    if mode == "local":
        cpus = _local_cpus()
        task = _remote(_local_task, num_cpus=cpus)
        return ray.get(task.remote(shards.refs, shards.sq_refs, *args))
    # Distributed: one resident actor per group of shards, at most one per free CPU (or GPU share).
    free = _free_cpus()
    workers = max(1, min(len(shards.refs), free))
    threads = max(1, free // workers) if not use_gpu else 1
    gpu_per_actor = 0.0
    if use_gpu:  # every actor on a GPU share at once (shares that fit each node's GPUs)
        from . import gpu

        workers = len(shards.refs)
        gpu_per_actor = gpu.share(workers)
        gpu.check_request(gpu_per_actor or 1.0, 1, "k-means assignment (use_gpu=True)")
    steps = _ActorSteps(shards, workers, use_gpu, gpu_per_actor, threads)
    try:
        return _restarts(steps, *args)
    finally:
        steps.close()  # the actors hold their shards (and CPUs/GPUs) only for this call
