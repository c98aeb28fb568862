"""The GAN stage on a real local Ray: one actor per cluster, restarts, divergence, generation, CLI."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from PIL import Image
from sklearn.cluster import KMeans
from typer.testing import CliRunner

from slsr_ray import storage
from slsr_ray.cli import app
from slsr_ray.data import MANIFEST_SCHEMA, read_image, read_image_array, read_image_bytes
from slsr_ray.gan import (
    COLLAPSE_DIVERSITY,
    GanCheckpointError,
    GanConfig,
    GanDataError,
    GanError,
    GanTrainerCore,
    cluster_paths,
    load_checkpoint,
    make_trainer,
    train_gans,
)
from slsr_ray.generate import generate_images, split_count

TINY = dict(image_size=32, ngf=8, ndf=8, batch_size=16, seed=0)


def _mean_colours(paths: list[str], size=(32, 32)) -> np.ndarray:
    return np.stack([read_image_array(p, size).reshape(-1, 3).mean(0) for p in paths])


@pytest.fixture(scope="module")
def clusters(synthetic_dataset, tmp_path_factory):
    """A K=3 clustering of the synthetic train set, in the clustering stage's format.

    Clusters are k-means on each image's mean colour, so they differ visibly in colour (which the
    "GAN learned something" check relies on).
    """
    train = synthetic_dataset.train
    paths = train["path"].to_pylist()
    labels = KMeans(3, n_init=10, random_state=0).fit_predict(_mean_colours(paths)).astype(np.int64)
    table = pa.table(
        {"path": paths, "pid": train["pid"], "camid": train["camid"], "cluster": pa.array(labels, pa.int64())}
    )
    kdir = str(tmp_path_factory.mktemp("clusters") / "k3")
    storage.write_table(storage.join(kdir, "assignments.parquet"), table)
    membership = [
        {"cluster": c, "size": int((labels == c).sum()), "pids": sorted(set(table.filter(
            pa.compute.equal(table["cluster"], c))["pid"].to_pylist()))}
        for c in range(3)
    ]
    storage.write_json(storage.join(kdir, "membership.json"), {"k": 3, "rule": "any", "clusters": membership})
    return kdir, table


@pytest.fixture(scope="module")
def trained(ray_session, clusters, tmp_path_factory):
    """Three tiny DCGANs trained as three concurrent actors (2 epochs each)."""
    kdir, table = clusters
    gan_dir = str(tmp_path_factory.mktemp("gan"))
    t0 = time.perf_counter()
    results = train_gans(kdir, gan_dir, GanConfig(epochs=2, **TINY), progress=False)
    return gan_dir, table, results, time.perf_counter() - t0


def test_k_actors_train_concurrently_and_write_artifacts(trained):
    gan_dir, table, results, wall = trained
    sizes = {c: len(p) for c, p in cluster_paths(table).items()}
    assert sorted(results) == [0, 1, 2]
    # One process per cluster, all three alive at the same moment (each had loaded its data before
    # any finished training), and all trainings launched together once every actor was ready.
    assert len({r["pid"] for r in results.values()}) == 3
    last_ready = max(r["ready_at"] for r in results.values())
    first_done = min(r["finished_at"] for r in results.values())
    assert last_ready < first_done, results
    assert all(r["started_at"] >= last_ready for r in results.values())
    assert wall < sum(r["wall_s"] for r in results.values()) + 30  # sanity, not a speed claim
    for c, r in results.items():
        assert r["epochs"] == 2 and r["num_images"] == sizes[c] and r["unreadable"] == 0
        assert np.isfinite(r["loss_d"]) and np.isfinite(r["loss_g"])
        cdir = os.path.join(gan_dir, f"c{c}")
        losses = storage.read_json(os.path.join(cdir, "losses.json"))
        assert [e["epoch"] for e in losses] == [1, 2]
        ckpt = load_checkpoint(os.path.join(cdir, "ckpt.pt"))
        assert ckpt["epoch"] == 2 and ckpt["num_images"] == sizes[c]
        assert {"G", "D", "opt_g", "opt_d"} <= set(ckpt)
        grid = Image.open(os.path.join(cdir, "samples.png"))
        assert grid.size == (8 * 34 + 2, 8 * 34 + 2)  # 8x8 grid of 32x32 with 2px padding
        assert Image.open(os.path.join(cdir, "losses.png")).size[0] > 100
    summary = storage.read_json(os.path.join(gan_dir, "gan.json"))
    assert set(summary["clusters"]) == {"0", "1", "2"} and summary["failures"] == {}


def test_generate_manifest_split_prefix_and_resume(trained, tmp_path):
    gan_dir, table, _, _ = trained
    sizes = {c: len(p) for c, p in cluster_paths(table).items()}
    out = str(tmp_path / "gen")
    manifest_uri = generate_images(gan_dir, out, 30, seed=3, image_size=(64, 32), batch_size=8, progress=False)
    m = storage.read_table(manifest_uri)
    assert m.schema.names == MANIFEST_SCHEMA.names + ["generator"]
    assert m.num_rows == 30
    assert set(m["pid"].to_pylist()) == {-1} and set(m["camid"].to_pylist()) == {-1}
    assert set(m["source"].to_pylist()) == {"generated"}
    per_cluster = {c: m["cluster"].to_pylist().count(c) for c in sizes}
    assert per_cluster == split_count(30, sizes)
    # proportional: within one image of the exact share
    for c, n in per_cluster.items():
        assert abs(n - 30 * sizes[c] / sum(sizes.values())) <= 1
    for row in m.to_pylist():
        assert row["generator"] == os.path.join(gan_dir, f"c{row['cluster']}", "ckpt.pt")
        assert f"{os.sep}c{row['cluster']}{os.sep}" in row["path"]
        assert read_image(row["path"]).size == (32, 64)  # resized back to the re-id shape (w, h)

    # Prefix: a smaller count with the same seed gives byte-identical first images of every cluster.
    small = storage.read_table(
        generate_images(gan_dir, str(tmp_path / "small"), 7, seed=3, image_size=(64, 32), batch_size=8, progress=False)
    )
    big_paths = {(r["cluster"], r["path"].rsplit("#", 1)[1]): r["path"] for r in m.to_pylist()}
    for r in small.to_pylist():
        assert read_image_bytes(r["path"]) == read_image_bytes(big_paths[(r["cluster"], r["path"].rsplit("#", 1)[1])])

    # Resumable: a deleted shard is regenerated identically; the others are not rewritten.
    shards = sorted({r["path"].rsplit("#", 1)[0] for r in m.to_pylist()})
    victim, keeper = shards[0], shards[-1]
    victim_bytes = storage.read_bytes(victim)
    keeper_mtime = os.stat(keeper).st_mtime_ns
    os.remove(victim)
    generate_images(gan_dir, out, 30, seed=3, image_size=(64, 32), batch_size=8, progress=False)
    assert storage.read_bytes(victim) == victim_bytes
    assert os.stat(keeper).st_mtime_ns == keeper_mtime

    # Another seed must not mix into the same folder.
    with pytest.raises(GanError, match="other checkpoints or settings"):
        generate_images(gan_dir, out, 30, seed=4, image_size=(64, 32), batch_size=8, progress=False)
    # A different seed gives different images.
    other = storage.read_table(generate_images(gan_dir, str(tmp_path / "s4"), 3, seed=4, batch_size=8, progress=False))
    first = other.to_pylist()[0]
    assert read_image_bytes(first["path"]) != read_image_bytes(
        big_paths[(first["cluster"], first["path"].rsplit("#", 1)[1])])


def test_generate_equal_split_and_bad_counts(trained, tmp_path):
    gan_dir = trained[0]
    m = storage.read_table(generate_images(gan_dir, str(tmp_path / "eq"), 7, split="equal", progress=False))
    assert sorted(m["cluster"].to_pylist().count(c) for c in range(3)) == [2, 2, 3]
    for bad in (0, -5):
        with pytest.raises(ValueError, match="positive"):
            generate_images(gan_dir, str(tmp_path / "bad"), bad)
    with pytest.raises(ValueError, match="split"):
        generate_images(gan_dir, str(tmp_path / "bad"), 3, split="weird")
    with pytest.raises(GanError, match="no DCGAN checkpoints"):
        generate_images(str(tmp_path), str(tmp_path / "bad"), 3)


def test_split_count_is_house_monotone():
    sizes = {0: 19, 1: 55, 2: 22, 3: 1}
    prev = split_count(1, sizes)
    for n in range(2, 300):
        cur = split_count(n, sizes)
        assert sum(cur.values()) == n
        assert all(cur[c] >= prev[c] for c in sizes)
        prev = cur
    assert split_count(12000, {0: 1, 1: 2, 2: 3}) == {0: 2000, 1: 4000, 2: 6000}


def test_killed_actor_resumes_from_checkpoint(ray_session, clusters, tmp_path):
    _, table = clusters
    paths = cluster_paths(table)
    c = max(paths, key=lambda k: len(paths[k]))
    gan_dir = str(tmp_path / "gan")
    cfg = GanConfig(epochs=6, max_restarts=2, **{**TINY, "batch_size": 8})
    actor = make_trainer(c, paths[c], gan_dir, cfg)
    ref = actor.train.remote()
    losses_uri = os.path.join(gan_dir, f"c{c}", "losses.json")
    deadline = time.time() + 600  # the first epoch: seconds on an idle machine, minutes on a loaded one
    while time.time() < deadline:
        if os.path.exists(losses_uri) and len(storage.read_json(losses_uri)) >= 1:
            break
        time.sleep(0.05)
    killed_after = len(storage.read_json(losses_uri))
    assert 1 <= killed_after < 6, "training finished before the kill; make epochs longer"
    ray.kill(actor, no_restart=False)
    result = ray.get(ref)
    assert result["epochs"] == 6
    assert result["resumed_from_epoch"] >= killed_after  # the restarted actor loaded the checkpoint
    assert [e["epoch"] for e in storage.read_json(losses_uri)] == list(range(1, 7))
    assert load_checkpoint(os.path.join(gan_dir, f"c{c}", "ckpt.pt"))["epoch"] == 6
    ray.kill(actor)


def test_divergence_is_a_clear_error_and_keeps_last_good_checkpoint(ray_session, clusters, tmp_path):
    _, table = clusters
    one = table.filter(pa.compute.equal(table["cluster"], 0))
    gan_dir = str(tmp_path / "gan")
    train_gans(one, gan_dir, GanConfig(epochs=1, **TINY), progress=False)
    # max_loss is a guard, not a training setting: the resume is allowed and epoch 2 trips it
    with pytest.raises(GanError, match=r"cluster 0 diverged .*last good checkpoint \(epoch 1\)"):
        train_gans(one, gan_dir, GanConfig(epochs=3, max_loss=1e-6, **TINY), progress=False)
    assert load_checkpoint(os.path.join(gan_dir, "c0", "ckpt.pt"))["epoch"] == 1
    # ...and the kept checkpoint resumes normally
    res = train_gans(one, gan_dir, GanConfig(epochs=2, **TINY), progress=False)
    assert res[0]["resumed_from_epoch"] == 1 and res[0]["epochs"] == 2


def test_tiny_cluster_unreadable_images_and_arch_mismatch(ray_session, clusters, tmp_path):
    _, table = clusters
    paths = table["path"].to_pylist()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    # cluster 0: 3 images (< one batch of 16) plus one unreadable file; cluster 1: 5 images
    small = pa.table({"path": paths[:3] + [str(broken)] + paths[3:8], "cluster": [0, 0, 0, 0, 1, 1, 1, 1, 1]})
    gan_dir = str(tmp_path / "gan")
    res = train_gans(small, gan_dir, GanConfig(epochs=1, **TINY), progress=False)
    assert res[0]["num_images"] == 3 and res[0]["unreadable"] == 1
    assert res[0]["unreadable_examples"] == [str(broken)]
    assert res[1]["num_images"] == 5 and res[1]["epochs"] == 1

    # the policy "error" surfaces through the actor as a clear error naming the cluster
    with pytest.raises(GanError, match="cluster 0 has 3 readable images, fewer than one batch"):
        train_gans(small, str(tmp_path / "g2"), GanConfig(epochs=1, min_images="error", **TINY), progress=False)
    with pytest.raises(GanError, match="lack columns"):
        train_gans(pa.table({"path": paths[:3]}), gan_dir, GanConfig(**TINY), progress=False)
    # same checks on the plain class (what each actor runs), without starting more actors
    with pytest.raises(GanDataError, match="unreadable training image"):
        GanTrainerCore(0, paths[:3] + [str(broken)], str(tmp_path / "g3"), GanConfig(on_unreadable="error", **TINY))
    with pytest.raises(GanCheckpointError, match="different DCGAN architecture"):
        GanTrainerCore(1, paths[3:8], gan_dir, GanConfig(**{**TINY, "ngf": 16}))
    with pytest.raises(GanCheckpointError, match="another image set"):
        GanTrainerCore(1, paths[3:7], gan_dir, GanConfig(**TINY))
    # a changed lr or seed never resumes the old weights (only more epochs of the same config do)
    with pytest.raises(GanCheckpointError, match=r"other settings \(lr: 0.0002 then, 0.001 now\)"):
        GanTrainerCore(1, paths[3:8], gan_dir, GanConfig(**{**TINY, "lr": 1e-3}))
    with pytest.raises(GanCheckpointError, match=r"seed: 0 then, 7 now"):
        GanTrainerCore(1, paths[3:8], gan_dir, GanConfig(**{**TINY, "seed": 7}))
    assert GanTrainerCore(1, paths[3:8], gan_dir, GanConfig(**{**TINY, "epochs": 5})).epoch == 1
    with pytest.raises(GanDataError, match="at least 2"):
        GanTrainerCore(5, [str(broken), paths[0]], str(tmp_path / "g4"), GanConfig(**TINY))


def test_s3_run_root(ray_session, clusters, s3_bucket):
    _, table = clusters
    one = table.filter(pa.compute.equal(table["cluster"], 1))
    gan_dir = f"{s3_bucket}/run/gan"
    res = train_gans(one, gan_dir, GanConfig(epochs=1, **TINY), progress=False)
    assert sorted(res) == [1] and res[1]["checkpoint"] == f"{gan_dir}/c1/ckpt.pt"
    assert storage.exists(f"{gan_dir}/c1/samples.png") and storage.exists(f"{gan_dir}/c1/losses.png")
    manifest = generate_images(gan_dir, f"{s3_bucket}/run/generated", 5, progress=False)
    m = storage.read_table(manifest)
    assert m.num_rows == 5 and all(p.startswith(f"{s3_bucket}/run/generated/images/c") for p in m["path"].to_pylist())
    img = read_image(m["path"][0].as_py())
    assert img.size == (64, 128)
    assert len(storage.listdir(f"{s3_bucket}/run/generated/images/c1")) == 1  # 5 images, one shard object


def test_cli_train_and_generate(ray_session, clusters, tmp_path):
    _, table = clusters
    one = str(tmp_path / "k1" / "assignments.parquet")
    storage.write_table(one, table.filter(pa.compute.equal(table["cluster"], 2)))
    runner = CliRunner()
    out = str(tmp_path / "gan")
    r = runner.invoke(app, ["gan", "train", "--clusters", one, "--output", out, "--epochs", "1",
                            "--image-size", "32", "--ngf", "8", "--ndf", "8", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    assert os.path.exists(os.path.join(out, "c2", "ckpt.pt"))
    gen = str(tmp_path / "gen")
    r = runner.invoke(app, ["gan", "generate", "--gan-dir", out, "--count", "6", "--output", gen])
    assert r.exit_code == 0, r.output
    assert storage.read_table(os.path.join(gen, "manifest.parquet")).num_rows == 6
    r = runner.invoke(app, ["gan", "generate", "--gan-dir", out, "--count", "0", "--output", gen])
    assert r.exit_code == 2 and "positive" in r.output


def test_gan_learns_its_clusters_colours(ray_session, clusters, tmp_path):
    """Cheap objective check: each cluster's generated images have a mean colour nearest to their own
    cluster's real images. lr 1e-3 and batch 8 (not the paper's 2e-4/64) because a test has only a few
    hundred steps; an untrained generator outputs grey (nearest to whichever cluster is greyest)."""
    kdir, table = clusters
    paths = cluster_paths(table)
    centroids = np.stack([_mean_colours(paths[c]).mean(0) for c in sorted(paths)])
    gan_dir = str(tmp_path / "gan")
    cfg = GanConfig(epochs=40, lr=1e-3, **{**TINY, "batch_size": 8, "ngf": 16, "ndf": 16})
    res = train_gans(kdir, gan_dir, cfg, progress=False)
    # trained GANs are not collapsed: their samples vary like the real images of their cluster
    print("diversity", {c: round(r["diversity"], 2) for c, r in res.items()},
          "realism", {c: round(r["realism"], 2) for c, r in res.items()})
    assert all(r["diversity"] > COLLAPSE_DIVERSITY for r in res.values())
    m = storage.read_table(generate_images(gan_dir, str(tmp_path / "gen"), 60, split="equal", image_size=(32, 32),
                                           progress=False))
    own, per_cluster = [], {}
    for c in sorted(paths):
        gen = _mean_colours(m.filter(pa.compute.equal(m["cluster"], c))["path"].to_pylist())
        nearest = ((gen[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        own.append(nearest == c)
        per_cluster[c] = np.linalg.norm(gen.mean(0) - centroids, axis=1).round(1).tolist()
    accuracy = float(np.concatenate(own).mean())
    print(f"\nGAN colour check: {accuracy:.0%} of generated images nearest their own cluster's mean colour "
          f"(chance 33%); distance of each cluster's generated mean colour to the 3 real centroids: {per_cluster}")
    assert all(int(np.argmin(d)) == c for c, d in per_cluster.items()), per_cluster
    assert accuracy >= 0.6


def test_collapsed_generator_is_detected(clusters, tmp_path):
    """A generator whose output ignores z (every sample the same picture) has diversity ~0."""
    _, table = clusters
    paths = table["path"].to_pylist()[:20]
    core = GanTrainerCore(0, paths, str(tmp_path / "g"), GanConfig(epochs=0, **TINY))
    healthy = core.quality()
    with torch.no_grad():
        for p in core.G.parameters():
            p.zero_()  # constant output tanh(0) = 0 for every z
    collapsed = core.quality()
    assert collapsed["diversity"] < 0.01 < COLLAPSE_DIVERSITY
    assert healthy["diversity"] > collapsed["diversity"]
    assert collapsed["realism"] > 0 and collapsed["samples"] == 20


@ray.remote(num_cpus=0)
class _FlakyTrainer:
    """Stands in for a GAN actor on a node that dies: ``unreachable`` calls fail as Ray's do while the
    node is being declared dead, then the call succeeds (the restarted actor resumed)."""

    def __init__(self, unreachable: int):
        self.unreachable = unreachable
        self.calls = 0

    def train(self, epochs: int):
        from ray.exceptions import ActorUnavailableError

        self.calls += 1
        if self.calls <= self.unreachable:
            raise ActorUnavailableError("failed to connect to all addresses (test)", None)
        return {"epochs": epochs, "calls": self.calls}


def test_unreachable_or_dead_gan_actor_is_resent_then_replaced(ray_session, monkeypatch):
    # On a 3-node cluster a node kill spent Ray's task retries within a second (connection refused before
    # the node was declared dead) and the stage failed: the driver now re-sends, and replaces a dead actor.
    from slsr_ray import gan

    monkeypatch.setattr(gan, "RESEND_EVERY_S", 0.1)
    actors = {0: _FlakyTrainer.remote(2), 1: _FlakyTrainer.remote(0)}
    ray.get(actors[1].train.remote(0))  # started; now kill it for good: its call must go to a new actor
    ray.kill(actors[1], no_restart=True)
    # ray.kill is asynchronous: a call sent right after it can still run on the old process (seen once in
    # a fresh-clone CI run: no replacement). Wait until the actor is really dead.
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            ray.get(actors[1].train.remote(0), timeout=30)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the killed actor still answers after 60 s")
    replaced = []

    def restart(c):
        replaced.append(c)
        actors[c] = _FlakyTrainer.remote(0)

    results, failures = {}, {}
    gan._await_trainings(actors, [0, 1], GanConfig(epochs=3, max_restarts=1), results, failures, restart,
                         lambda: None)
    assert failures == {} and replaced == [1]
    assert results[0] == {"epochs": 3, "calls": 3}  # two unreachable calls, then the resent one
    assert results[1] == {"epochs": 3, "calls": 1}  # the new actor's first call
    # restarts used up: the cluster fails with the error named, the other clusters are unaffected
    actors = {0: _FlakyTrainer.remote(0)}
    ray.kill(actors[0], no_restart=True)
    results, failures = {}, {}
    gan._await_trainings(actors, [0], GanConfig(epochs=1, max_restarts=0), results, failures, restart,
                         lambda: None)
    assert results == {} and "actor" in failures[0]  # Ray's own line: killed / never ran
