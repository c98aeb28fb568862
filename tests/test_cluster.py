"""Distributed k-means, silhouette, K choice, membership and the cluster artifact, on a real local Ray."""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, silhouette_score

from slsr_ray import storage
from slsr_ray.cluster import (
    ClusteringError,
    choose_k,
    cluster_membership,
    kmeans,
    run_clustering,
    silhouette,
)
from slsr_ray.extract import features_column


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=4000, n_features=64, centers=5, cluster_std=2.0, random_state=7)
    return X.astype(np.float32), y


def test_kmeans_recovers_planted_clusters_and_matches_sklearn_inertia(ray_session, blobs):
    X, y = blobs
    ours = kmeans(X, 5, n_init=3, seed=0, num_shards=3)
    assert ours.centroids.shape == (5, 64) and ours.labels.shape == (4000,)
    assert adjusted_rand_score(y, ours.labels) > 0.95
    ref = KMeans(5, n_init=3, random_state=0).fit(X)
    assert abs(ours.inertia - ref.inertia_) / ref.inertia_ < 0.01
    # the reported inertia is that of the returned labels and centroids
    direct = ((X.astype(np.float64) - ours.centroids[ours.labels]) ** 2).sum()
    assert ours.inertia == pytest.approx(direct, rel=1e-4)


def test_kmeans_on_object_store_shards_equals_array_input(ray_session, blobs):
    X, _ = blobs
    refs = [ray_session.put(X[:1500]), ray_session.put(X[1500:2600]), ray_session.put(X[2600:])]
    from_refs = kmeans(refs, 4, n_init=1, seed=3)
    from_array = kmeans(X, 4, n_init=1, seed=3, num_shards=3)
    np.testing.assert_array_equal(from_refs.labels, from_array.labels)
    assert from_refs.inertia == pytest.approx(from_array.inertia, rel=1e-6)


def test_empty_clusters_are_reseeded_from_farthest_points(ray_session, blobs):
    X, y = blobs
    # Four blob means plus a duplicate: cluster 4 starts empty and must move to the fifth blob,
    # whose points are the farthest from the other four centroids.
    means = np.stack([X[y == c].mean(0) for c in range(4)])
    init = np.concatenate([means, means[:1]])
    res = kmeans(X, 5, init=init, seed=0)
    assert np.bincount(res.labels, minlength=5).min() > 0
    assert adjusted_rand_score(y, res.labels) > 0.95
    # all-identical starting centroids still end with no empty cluster, at a Lloyd fixed point when run
    # to convergence (the default tolerances may stop a few rows short of it: seen 0.025 off a mean on
    # one CPU, 1e-5 on another, as float rounding decides which points move last)
    res = kmeans(X, 5, init=np.repeat(X[:1], 5, axis=0), seed=0, tol=0.0, inertia_tol=0.0)
    assert res.converged
    assert np.bincount(res.labels, minlength=5).min() > 0
    for c in range(5):
        np.testing.assert_allclose(res.centroids[c], X[res.labels == c].mean(0), rtol=1e-4, atol=1e-4)


def test_a_cluster_emptied_by_the_last_step_is_refilled(ray_session):
    # Four points, three centroids starting on top of each other: the first step empties clusters 1 and
    # 2 and re-seeds them on the left and right pairs, which then take every point from cluster 0's
    # mean in the final assignment. No cluster may come back empty (k-means re-seeds and steps again).
    X = np.array([[-1, 0], [1, 0], [-1, 0.1], [1, 0.1]], np.float32)
    for mode in ("local", "tasks"):
        res = kmeans(X, 3, init=np.zeros((3, 2), np.float32), max_iter=1, num_shards=2, mode=mode)
        assert np.bincount(res.labels, minlength=3).min() > 0, mode
        assert res.inertia == pytest.approx(((X - res.centroids[res.labels]) ** 2).sum(), abs=1e-5)


def test_too_few_distinct_points_for_k_is_a_clear_error(ray_session):
    X = np.repeat(np.array([[0, 0], [1, 1]], np.float32), 10, axis=0)  # 2 distinct points, K = 3
    with pytest.raises(ClusteringError, match="fewer than 3 distinct points"):
        kmeans(X, 3, n_init=1, seed=0)


def test_tol_none_runs_exactly_max_iter_iterations(ray_session, blobs):
    X, _ = blobs
    early = kmeans(X, 5, n_init=1, seed=0, tol=0.0)  # stops at the fixed point
    assert early.converged and early.n_iter < 40
    fixed = kmeans(X, 5, n_init=1, seed=0, tol=None, max_iter=40)
    assert fixed.n_iter == 40 and not fixed.converged
    np.testing.assert_array_equal(fixed.labels, early.labels)  # past the fixed point nothing moves
    with pytest.raises(ClusteringError, match="tol must be >= 0"):
        kmeans(X, 5, tol=-1.0)


def test_actor_mode_equals_local_and_kills_its_actors(ray_session, blobs, monkeypatch):
    # "actors" (resident shard actors; "tasks" is its old name) gives exactly the clustering of
    # "local", and the actors are gone when k-means returns -- also when it raises.
    import ray

    import slsr_ray.kmeans as km

    made = []
    init = km._ActorSteps.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(list(self.actors))

    monkeypatch.setattr(km._ActorSteps, "__init__", recording_init)
    X, _ = blobs
    for num_shards, mode in ((5, "actors"), (3, "tasks")):  # "tasks": the old name, same mode
        local = kmeans(X, 4, n_init=2, seed=1, num_shards=num_shards, mode="local")
        actors = kmeans(X, 4, n_init=2, seed=1, num_shards=num_shards, mode=mode)
        np.testing.assert_array_equal(local.labels, actors.labels)
        np.testing.assert_allclose(local.centroids, actors.centroids, rtol=1e-5, atol=1e-5)
        assert local.inertia == pytest.approx(actors.inertia, rel=1e-6) and local.n_iter == actors.n_iter
    with pytest.raises(ClusteringError, match="mode must be one of"):
        kmeans(X, 4, mode="gpu")
    with pytest.raises(ClusteringError, match="fewer than 3 distinct points"):
        kmeans(np.repeat(np.array([[0, 0], [1, 1]], np.float32), 10, axis=0), 3, n_init=1, mode="actors")
    assert len(made) == 3 and all(made)  # actors, tasks, the failing call
    # ray.kill is asynchronous: the kill goes through the GCS while a call goes straight to the actor,
    # so a ping sent just after the kill can still be answered (seen once on CI). Each actor must die
    # within a minute of k-means returning.
    for handles in made:
        for a in handles:
            deadline = time.monotonic() + 120  # 120 s: a loaded machine
            with pytest.raises(ray.exceptions.RayActorError):
                while time.monotonic() < deadline:
                    ray.get(a.ping.remote(), timeout=300)
                    time.sleep(0.2)


def test_incremental_sums_equal_a_full_recompute(blobs):
    # A Lloyd step with a per-shard state only re-adds the rows that changed cluster (or sums every
    # row again when more than 1/8 moved, or K changed); over a whole run its sums, counts and
    # labels must stay those of a step that sums every row, within float32 summation error.
    from slsr_ray.kmeans import _partial_step

    X, _ = blobs
    x_sq = np.einsum("ij,ij->i", X, X)
    state: dict = {}
    moved = []
    centroids = X[np.random.default_rng(0).choice(len(X), 5, replace=False)]
    for it in range(40):
        if it == 30:  # the same centroids in reverse order: every row changes label (the full path)
            centroids = centroids[::-1].copy()
        if it == 35:  # a new K: the state no longer fits, the step starts over
            centroids = centroids[:4]
        had = state.get("labels")
        inc = _partial_step(X, x_sq, centroids, 4, True, state=state)
        full = _partial_step(X, x_sq, centroids, 4, True)
        if had is not None:
            moved.append(int((inc["labels"] != had).sum()))
        np.testing.assert_array_equal(inc["labels"], full["labels"])
        np.testing.assert_array_equal(inc["counts"], full["counts"])
        exact, scale = np.zeros((len(centroids), X.shape[1])), np.zeros((len(centroids), X.shape[1]))
        np.add.at(exact, full["labels"], X.astype(np.float64))
        np.add.at(scale, full["labels"], np.abs(X.astype(np.float64)))
        for got in (inc["sums"], full["sums"]):
            assert (np.abs(got - exact) <= 2e-5 * scale + 1e-9).all()
        centroids = (full["sums"] / np.maximum(full["counts"], 1)[:, None]).astype(np.float32)
    # every path ran: a few rows moved, none moved, most moved
    assert any(0 < m <= len(X) // 8 for m in moved) and 0 in moved and max(moved) > len(X) // 8, moved


def test_restarts_tied_on_inertia_keep_the_earliest(monkeypatch):
    # Restarts that found the same partition differ only in rounding (and often in cluster numbering):
    # the earliest of them is kept, so a last-bit change in the arithmetic does not renumber clusters.
    import slsr_ray.kmeans as km

    inertias = iter([100.0, 100.0 - 1e-5, 99.0, 99.0 * (1 - 1e-8)])
    monkeypatch.setattr(km, "_lloyd", lambda steps, init, *a: km.KMeansResult(init, np.zeros(4, np.int64),
                                                                                next(inertias), 1))

    class Rows:
        def take(self, rows):
            return np.random.default_rng(len(rows)).random((len(rows), 2)).astype(np.float32)

    runs = []
    real_pp = km.kmeans_plusplus
    monkeypatch.setattr(km, "kmeans_plusplus", lambda *a: runs.append(real_pp(*a)) or runs[-1])
    best = km._restarts(Rows(), 4, 2, 4, 10, None, 1e-6, 0, 100, None)
    assert best.inertia == 99.0 and best.centroids is runs[2]  # 1e-5 and 1e-8 less are ties; 1 % is not


def test_local_task_uses_every_core_of_its_node(ray_session, blobs, monkeypatch):
    # The local task's CPU request follows Ray's lagging view of free CPUs (often 1 of 2 right after
    # other tasks); its threads must not: it runs on all of its node's cores, whatever it was given.
    import ray
    import torch

    import slsr_ray.kmeans as km

    X, _ = blobs
    threads = []
    monkeypatch.setattr(km, "_node_cores", lambda: 3)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    ref, sq = ray.put(X), ray.put(np.einsum("ij,ij->i", X, X))
    res = km._local_task([ref], [sq], len(X), 5, 1, 5, None, 1e-6, 0, 1000, None)
    assert threads[0] == 3 and len(res.labels) == len(X)
    assert km._node_cores() >= 1


def test_silhouette_equals_sklearn(ray_session, blobs):
    X, _ = blobs
    labels = kmeans(X, 4, n_init=1, seed=0).labels
    for sample_size, seed in ((None, 0), (700, 0), (700, 5)):
        ours = silhouette(X, labels, sample_size=sample_size, seed=seed)
        ref = silhouette_score(X, labels, sample_size=sample_size, random_state=seed)
        assert ours == pytest.approx(float(ref), abs=1e-6)
    # singleton clusters score 0, as in sklearn
    lab = labels.copy()
    lab[0] = 9
    assert silhouette(X[:500], lab[:500], None) == pytest.approx(float(silhouette_score(X[:500], lab[:500])), abs=1e-6)


def test_choose_k_picks_planted_k_and_formats_table(ray_session):
    X, _ = make_blobs(n_samples=1500, n_features=16, centers=3, cluster_std=1.0, random_state=1)
    res = choose_k(X.astype(np.float32), ks=(2, 3, 4, 5), n_init=2, sample_size=800)
    assert [r["k"] for r in res.rows] == [2, 3, 4, 5]
    assert res.best_k == 3
    for r in res.rows:
        assert r["silhouette_pct"] == pytest.approx(100 * r["silhouette"])
        assert sum(r["sizes"]) == 1500
    table = res.format_table()
    assert "silhouette %" in table and "best K = 3" in table


def test_membership_rules():
    #          pid: 0 0 0 0 0   1 1   2   3 3 3 3 3 3 3 3 3 3
    pids = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    assert cluster_membership(pids, labels, "any") == {0: [0, 3], 1: [0, 1, 3], 2: [1, 2, 3]}
    # pid 0: 80 % in c0, 20 % in c1; pid 1: 50/50 in c1/c2; pid 3: 80 % c0, 10 % c1, 10 % c2
    got = cluster_membership(pids, labels, "min_share", min_share=0.2)
    assert got == {0: [0, 3], 1: [0, 1], 2: [1, 2]}
    # min_share above every share of pid 1: it falls back to its majority cluster (tie -> lowest id)
    got = cluster_membership(pids, labels, "min_share", min_share=0.9)
    assert got == {0: [0, 3], 1: [1], 2: [2]}
    members = {p for c in got.values() for p in c}
    assert members == {0, 1, 2, 3}
    assert all(got[c] for c in range(3))  # no cluster with images is left without identities
    with pytest.raises(ClusteringError, match="rule"):
        cluster_membership(pids, labels, "most")


def test_majority_rule_partitions_identities_and_is_the_default():
    pids = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    # pid 0 -> c0 (4 of 5), pid 1 -> c1 (tie c1/c2: lowest id), pid 2 -> c2, pid 3 -> c0 (8 of 10)
    want = {0: [0, 3], 1: [1], 2: [2]}
    assert cluster_membership(pids, labels, "majority") == want
    assert cluster_membership(pids, labels) == want  # the paper's rule is the default
    # a partition: every identity in exactly one cluster
    assert sorted(p for c in want.values() for p in c) == [0, 1, 2, 3]
    # a cluster with images but nobody's majority borrows the identities with the largest share in it
    got = cluster_membership(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 0, 0, 0]), "majority")
    assert got == {0: [0, 1], 1: [0]}


def test_membership_report_flags_labels_close_to_lsro():
    from slsr_ray.cluster import NEAR_UNIFORM_SHARE, membership_report

    line, spread = membership_report({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, 4)
    assert "c0=4" in line and spread == 1.0 > NEAR_UNIFORM_SHARE
    line, spread = membership_report({0: [0, 1], 1: [2, 3]}, 4)
    assert "c1=2" in line and spread == 0.5


def _write_features(folder: str, X: np.ndarray, pids: np.ndarray) -> None:
    n = len(X)
    table = pa.table({
        "path": [f"/data/img_{i:05d}.jpg" for i in range(n)],
        "pid": pa.array(pids, pa.int64()),
        "camid": pa.array(np.arange(n) % 4, pa.int64()),
        "row_index": pa.array(np.arange(n), pa.int64()),
    }).append_column("feature", features_column(X))
    half = n // 2  # file names in the opposite order of the rows, as Ray Data may write them
    storage.write_table(storage.join(folder, "part-1.parquet"), table.slice(0, half))
    storage.write_table(storage.join(folder, "part-0.parquet"), table.slice(half))
    storage.write_bytes(storage.join(folder, "_SUCCESS"), b"")


def test_run_clustering_writes_the_artifact(ray_session, tmp_path):
    X, y = make_blobs(n_samples=600, n_features=32, centers=3, cluster_std=1.0, random_state=2)
    pids = (np.arange(600) // 10).astype(np.int64)  # 60 identities of 10 images
    feats = str(tmp_path / "features")
    _write_features(feats, X.astype(np.float32), pids)
    out = str(tmp_path / "clusters")
    summary = run_clustering(feats, out, ks=(2, 3), rule="min_share", min_share=0.3, n_init=2)
    assert summary["best_k"] == 3
    sil = storage.read_json(storage.join(out, "silhouette.json"))
    assert set(sil) == {"2", "3", "best_k"} and sil["best_k"] == 3
    for k in (2, 3):
        assign = storage.read_table(storage.join(out, f"k{k}", "assignments.parquet"))
        assert assign.column_names == ["path", "pid", "camid", "cluster"] and assign.num_rows == 600
        assert assign["path"].to_pylist() == [f"/data/img_{i:05d}.jpg" for i in range(600)]  # manifest order
        cents = np.load(io.BytesIO(storage.read_bytes(storage.join(out, f"k{k}", "centroids.npy"))))
        assert cents.shape == (k, 32) and cents.dtype == np.float32
        mem = storage.read_json(storage.join(out, f"k{k}", "membership.json"))
        assert set(mem) == {"k", "rule", "min_share", "silhouette", "label_spread", "clusters"}
        sizes = [len(c["pids"]) for c in mem["clusters"]]
        assert mem["label_spread"] == pytest.approx(np.mean(sizes) / len(np.unique(assign["pid"].to_numpy())))
        assert mem["k"] == k and mem["rule"] == "min_share" and mem["min_share"] == 0.3
        assert mem["silhouette"] == pytest.approx(sil[str(k)])
        labels = assign["cluster"].to_numpy()
        expected = cluster_membership(assign["pid"].to_numpy(), labels, "min_share", 0.3, k=k)
        assert [c["cluster"] for c in mem["clusters"]] == list(range(k))
        for c in mem["clusters"]:
            assert c["pids"] == expected[c["cluster"]] and c["size"] == int((labels == c["cluster"]).sum())
    a3 = storage.read_table(storage.join(out, "k3", "assignments.parquet"))
    assert adjusted_rand_score(y, a3["cluster"].to_numpy()) > 0.95


def test_bad_input_errors(ray_session, blobs, tmp_path):
    X, _ = blobs
    with pytest.raises(ClusteringError, match="larger than the number of feature rows"):
        kmeans(X[:4], 5)
    with pytest.raises(ClusteringError, match="K >= 2"):
        choose_k(X[:200], ks=(1, 2))
    with pytest.raises(ClusteringError, match="2 <= number of clusters"):
        silhouette(X[:100], np.zeros(100, np.int64))
    bad = X[:300].copy()
    bad[[7, 42], 3] = np.nan
    bad[100, 0] = np.inf
    with pytest.raises(ClusteringError, match=r"NaN or inf in 3 of 300 rows \(first rows \[7, 42, 100\]"):
        kmeans(bad, 2)
    refs = [ray_session.put(X[:10]), ray_session.put(X[:0]), ray_session.put(X[10:20])]
    with pytest.raises(ClusteringError, match="shard 1 of 3 is empty"):
        kmeans(refs, 2)
    with pytest.raises(ClusteringError, match="shard 0 has NaN or inf"):
        kmeans([ray_session.put(bad)], 2)
    feats = str(tmp_path / "few_ids")
    _write_features(feats, X[:40], np.repeat(np.arange(2), 20))
    with pytest.raises(ClusteringError, match=r"K=\[3\] larger than the number of identities \(2\)"):
        run_clustering(feats, str(tmp_path / "out"), ks=(2, 3))
    assert not storage.exists(str(tmp_path / "out" / "silhouette.json"))
    with pytest.raises(ClusteringError, match="no _SUCCESS marker"):
        run_clustering(str(tmp_path / "nothing"), str(tmp_path / "out"), ks=(2,))
