"""Step 3 of Algorithm 1: distributed k-means over feature shards, silhouette-based choice of K, and the
identity -> cluster membership (S_c) that the GAN and training stages consume.

K-means itself (Lloyd over feature shards in the Ray object store, k-means++ seeding, empty-cluster
re-seeding) is :mod:`slsr_ray.kmeans`; its names are re-exported here. The features never gather on
the driver: tasks read the parquet shards into the object store and the k-means steps run next to them.

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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from . import layout, storage
from .feature_shards import _check_finite, _default_num_shards, _gather_rows
from .kmeans import (  # noqa: F401  (re-exported: the kernel used to live here)
    INIT_SAMPLE_SIZE,
    LOCAL_MAX_BYTES,
    ClusteringError,
    KMeansResult,
    _remote,
    _Shards,
    kmeans,
    kmeans_plusplus,
    to_shards,
)

log = logging.getLogger(__name__)

#: Default number of points the silhouette is computed on. The exact silhouette is O(n^2 d); 10,000
#: points keep it to a few seconds on two cores while the sampling error of the mean stays ~0.3 %.
SILHOUETTE_SAMPLE_SIZE = 10_000

MEMBERSHIP_RULES = ("majority", "any", "min_share")


# --------------------------------------------------------------------------------------------------
# Feature helpers
# --------------------------------------------------------------------------------------------------


def _read_feature_files(uris: list[str]) -> np.ndarray:
    """Concatenate the ``feature`` column of some parquet shards into one float32 [n, d] array."""
    from .extract import feature_matrix  # the extract stage owns its feature column's codec
    parts = [feature_matrix(storage.read_table(u, columns=["feature"])) for u in uris]
    return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros((0, 0), np.float32)


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
    # Long because one pass over the chosen Ks writing each K's artifacts in order (the marker last); the kernels live in kmeans.py.
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
    marker = storage.join(output_dir, layout.SILHOUETTE)
    storage.remove(marker)  # an interrupted rerun must not look finished
    chosen = choose_k(shards, ks, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed,
                      sample_size=sample_size, use_gpu=use_gpu)
    # assignments in manifest order when the extraction recorded it
    order = np.argsort(meta["row_index"].to_numpy(), kind="stable") if "row_index" in meta.column_names else None
    for row in chosen.rows:
        k = row["k"]
        res = chosen.results[k]
        cols = {c: meta[c] for c in ("path", "pid", "camid") if c in meta.column_names}
        cols["cluster"] = pa.array(res.labels, pa.int64())
        assignments = pa.table(cols)
        storage.write_table(layout.assignments_file(output_dir, k),
                            assignments.take(order) if order is not None else assignments)
        storage.write_bytes(layout.centroids_file(output_dir, k), _npy_bytes(res.centroids.astype(np.float32)))
        members = cluster_membership(pids, res.labels, rule=rule, min_share=min_share, k=k)
        line, spread = membership_report(members, n_ids)
        log.info("K=%d (%s): %s", k, rule, line)
        if spread > NEAR_UNIFORM_SHARE:
            log.warning(
                "K=%d: the sparse labels spread over %.0f%% of the identities on average: SLSR is close to "
                "LSRO here (rule %r); the 'majority' rule partitions the identities", k, 100 * spread, rule,
            )
        sizes = np.bincount(res.labels, minlength=k)
        storage.write_json(layout.membership_file(output_dir, k), {
            "k": k, "rule": rule, "min_share": min_share if rule == "min_share" else None,
            "silhouette": row["silhouette"], "label_spread": spread,
            "clusters": [{"cluster": c, "size": int(sizes[c]), "pids": members[c]} for c in range(k)],
        })
    storage.write_json(storage.join(output_dir, layout.CLUSTER_SUMMARY), {
        "features": features_dir, "rows": chosen.rows, "best_k": chosen.best_k, "seed": seed,
        "sample_size": sample_size, "n_init": n_init, "rule": rule, "min_share": min_share,
        "num_images": shards.n, "num_ids": n_ids, "dim": shards.dim,
    })
    scores = {str(r["k"]): r["silhouette"] for r in chosen.rows}
    storage.write_json(marker, {**scores, "best_k": chosen.best_k})
    log.info("cluster table:\n%s", chosen.format_table())
    return {"silhouette": {r["k"]: r["silhouette"] for r in chosen.rows}, "best_k": chosen.best_k,
            "rows": chosen.rows, "table": chosen.format_table()}
