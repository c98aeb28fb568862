"""Ray Tune sweeps over K, lambda and the generated count (slsr_ray.tune).

The long test runs a real 2x2 sweep (K in {2, 3} x generated in {0, 60}, lambda 1) on the session
synthetic dataset: a separate driver process connected to the session Ray builds the shared stages and
is killed (SIGKILL, by its pid) after the first trial finished; the sweep is then resumed in this
process, which must reuse the shared stages and the finished trial, run the rest and write the tables
and the best point's config. The ASHA test (no generated images, so a short pipeline) retrains its best
point on the full training set.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from slsr_ray import storage
from slsr_ray.generate import split_count
from slsr_ray.stages import read_record
from slsr_ray.tune import (
    SweepConfig,
    SweepError,
    SweepLayout,
    carve_validation_split,
    generated_prefix,
    grid_points,
    run_sweep,
)

REPO = Path(__file__).resolve().parents[1]

# resnet18 at 64x32, one epoch everywhere, 32 px GANs with 8 channels: the method, in seconds (extraction
# batches of 128: each input here is one batch, extracted in one task)
TINY = [
    "pretrain.epochs=1", "pretrain.height=64", "pretrain.width=32", "pretrain.num_workers=1",
    "pretrain.cpus_per_worker=1.0", "pretrain.batch_size=16",
    "extract.height=64", "extract.width=32", "extract.batch_size=128",
    "cluster.n_init=1", "gan.image_size=32", "gan.epochs=1", "gan.ngf=8", "gan.ndf=8", "gan.batch_size=16",
    "generate.height=64", "generate.width=32",
    "train.epochs=1", "train.height=64", "train.width=32", "train.batch_size=16", "train.num_workers=1",
    "baselines=[]", "evaluate.rerank=false",
]


def _config(synthetic_root: str, run_root: str, extra: list[str] = ()):
    from slsr_ray.pipeline import load_config

    return load_config("synthetic", [*TINY, f"data.root={synthetic_root}", *extra], run_root)


# ---------------------------------------------------------------------------------- pure pieces


def test_validation_split_holds_out_train_ids(synthetic_dataset):
    train = synthetic_dataset.train
    parts = carve_validation_split(train, val_fraction=0.25, seed=3)
    q, g, t = parts["query"], parts["gallery"], parts["train"]
    val_ids = set(q["pid"].to_pylist())
    assert len(val_ids) == round(0.25 * len(set(train["pid"].to_pylist())))
    assert set(g["pid"].to_pylist()) == val_ids
    # one query image per (id, camera), every other image of the held-out ids in the gallery
    pairs = list(zip(q["pid"].to_pylist(), q["camid"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs))
    held = [p for p in train["pid"].to_pylist() if p in val_ids]
    assert q.num_rows + g.num_rows == len(held)
    # remaining ids relabelled 0..N-1, disjoint paths
    assert sorted(set(t["pid"].to_pylist())) == list(range(len(set(train["pid"].to_pylist())) - len(val_ids)))
    assert not set(t["path"].to_pylist()) & set(q["path"].to_pylist() + g["path"].to_pylist())
    assert t.num_rows + q.num_rows + g.num_rows == train.num_rows
    # same seed, same split
    again = carve_validation_split(train, val_fraction=0.25, seed=3)
    assert again["query"]["path"].to_pylist() == q["path"].to_pylist()
    with pytest.raises(SweepError, match="cannot hold out"):
        carve_validation_split(train, val_fraction=0.99)


def _generated_table(counts: dict[int, int]) -> pa.Table:
    paths, clusters = [], []
    for c, n in counts.items():
        paths += [f"/g/images/c{c}/{i:06d}.jpg" for i in range(n)]
        clusters += [c] * n
    return pa.table({"path": paths, "pid": [-1] * len(paths), "camid": [-1] * len(paths),
                     "source": ["generated"] * len(paths), "cluster": pa.array(clusters, pa.int64())})


def test_generated_prefix_takes_the_first_images_of_each_cluster():
    sizes = {0: 50, 1: 31, 2: 7}
    full = _generated_table(split_count(400, sizes))
    for n in (1, 13, 60, 399, 400):
        sub = generated_prefix(full, n, sizes)
        want = split_count(n, sizes)
        got = {c: sub.filter(pa.compute.equal(sub["cluster"], c)).num_rows for c in sizes}
        assert got == {c: want[c] for c in sizes}
        for c in sizes:  # per cluster: exactly images 0..want[c]-1
            names = [p for p, cl in zip(sub["path"].to_pylist(), sub["cluster"].to_pylist(), strict=True) if cl == c]
            assert names == [f"/g/images/c{c}/{i:06d}.jpg" for i in range(want[c])]
    assert generated_prefix(full, 0, sizes).num_rows == 0
    with pytest.raises(SweepError, match="too few images"):
        generated_prefix(full, 401, sizes)


def test_grid_points_train_the_real_only_baseline_once():
    sweep = SweepConfig(ks=[2, 3], lams=[0.5, 1.0], generated=[0, 100, 200], lrs=[0.01, 0.1])
    points = grid_points(sweep)
    assert len(points) == 2 * (1 + 2 * 2 * 2)  # per lr: one baseline + K x lambda x {100, 200}
    assert sum(p["generated"] == 0 for p in points) == 2


def test_best_config_retrains_the_best_point_on_the_full_training_set(synthetic_root, tmp_path):
    from slsr_ray.tune.results import best_config

    cfg = _config(synthetic_root, str(tmp_path / "run"), ["baselines=[none,lsro]"])
    layout = SweepLayout(cfg.run_root)
    sweep = SweepConfig(ks=[2, 3], lams=[0.5], generated=[0, 60], lrs=[0.01, 0.02])
    row = {"k": 3, "lam": 0.5, "generated": 60, "lr": 0.02}
    best = best_config(cfg, row, sweep)
    assert best.run_root == layout.best and best.data.manifests.startswith(layout.source)
    assert (best.cluster.k, best.cluster.ks, best.generate.count) == (3, [3], 60)
    assert (best.train.lam, best.train.lr, best.train.strategy) == (0.5, 0.02, cfg.train.strategy)
    # the real-images-only point trains the baseline, without the strategies that need generated images
    real = best_config(cfg, {**row, "generated": 0, "lr": None}, sweep)
    assert (real.train.strategy, real.baselines, real.train.lr) == ("none", ["none"], cfg.train.lr)


def test_empty_or_bad_search_space_is_a_clear_error():
    with pytest.raises(SweepError, match="empty search space.*ks"):
        SweepConfig(ks=[])
    with pytest.raises(SweepError, match="empty search space.*generated"):
        SweepConfig(generated=[])
    with pytest.raises(SweepError, match="lams"):
        SweepConfig(lams=[1.5])
    with pytest.raises(SweepError, match="search must be one of"):
        SweepConfig(search="bayes")


def test_cli_accepts_repeated_and_space_separated_values():
    from slsr_ray.commands.sweep import _split_multi

    argv = ["sweep", "--k", "2", "3", "--lambda", "0.5", "--generated", "0", "100", "--resume", "--k", "4"]
    assert _split_multi(argv) == ["sweep", "--k", "2", "--k", "3", "--lambda", "0.5", "--generated", "0",
                                  "--generated", "100", "--resume", "--k", "4"]


# ------------------------------------------------------------------------- errors before trials


def test_k_larger_than_train_ids_fails_before_any_training(ray_session, synthetic_root, tmp_path):
    cfg = _config(synthetic_root, str(tmp_path / "run"))
    with pytest.raises(SweepError, match=r"K=\[40\] is larger than the 9 training identities"):
        run_sweep(cfg, SweepConfig(ks=[2, 40], generated=[0, 10], val_fraction=0.25), echo=lambda *_: None)
    layout = SweepLayout(cfg.run_root)
    assert read_record(layout.split, "split") is not None  # cheap bookkeeping only: no pretraining ran
    assert read_record(layout.shared, "pretrain") is None
    assert not os.path.exists(os.path.join(layout.root, "tune"))


def test_too_big_trials_and_missing_optuna_are_clear_errors(ray_session, synthetic_root, tmp_path):
    cfg = _config(synthetic_root, str(tmp_path / "run"))
    with pytest.raises(SweepError, match="one trial needs 3 CPUs"):
        run_sweep(cfg, SweepConfig(ks=[2], generated=[0], train_workers=2, cpus_per_worker=1.0))
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(SweepError, match=r"pip install 'slsr-ray\[optuna\]'"):
            run_sweep(cfg, SweepConfig(ks=[2], generated=[0], search="optuna"))


# ----------------------------------------------------------------------------------- real sweeps


def test_optuna_search_runs_two_trials_and_learns_from_them(ray_session, synthetic_root, tmp_path):
    """Two Optuna trials (random init, no generated images: the shared work is only the split): each is
    a finished trial in the results, and Optuna's own study holds both with the reported validation mAP."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    cfg = _config(synthetic_root, str(tmp_path / "run"), ["train_init=imagenet"])
    sweep = SweepConfig(ks=[2], generated=[0], lrs=[0.01, 0.05], search="optuna", num_samples=2, val_fraction=0.25,
                        retrain_best=False)
    res = run_sweep(cfg, sweep, echo=lambda *_: None)
    assert len(res.rows) == 2 and all(r["status"] == "done" and r["val_mAP"] is not None for r in res.rows), res.rows
    assert {r["lr"] for r in res.rows} <= {0.01, 0.05}
    # the search algorithm Tune saved is Optuna's, and its study saw both trials complete with their scores
    exp_dir = os.path.join(SweepLayout(cfg.run_root).root, "tune")
    limiter = ConcurrencyLimiter(OptunaSearch(), max_concurrent=1)
    limiter.restore_from_dir(exp_dir)
    study = limiter.searcher._ot_study
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2
    assert sorted(t.value for t in done) == pytest.approx(sorted(r["val_mAP"] for r in res.rows))
    assert sorted(t.params["lr"] for t in done) == sorted(r["lr"] for r in res.rows)



def _wait_for(pred, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep driver exited (rc {proc.returncode}) before {what}")
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def _terminated_trials(exp_dir: str) -> list[str]:
    """Trial ids Tune's saved experiment state lists as TERMINATED."""
    out = []
    for f in glob.glob(os.path.join(exp_dir, "experiment_state-*.json")):
        try:
            state = json.loads(Path(f).read_text())
        except (json.JSONDecodeError, OSError):
            continue
        for trial_json, _ in state.get("trial_data", []):
            t = json.loads(trial_json)
            if t.get("status") == "TERMINATED":
                out.append(t["trial_id"])
    return out


@pytest.mark.slow
def test_sweep_2x2_interrupted_resumed_with_shared_stages_built_once(ray_session, synthetic_root, tmp_path):
    run_root = str(tmp_path / "run")
    sweep_kw = dict(ks=[2, 3], lams=[1.0], generated=[0, 60], val_fraction=0.25)
    t0 = time.time()
    # 1. a separate driver on the session Ray: shared stages, then trials; killed after the first trial
    script = textwrap.dedent(f"""
        import ray
        from slsr_ray.pipeline import load_config
        from slsr_ray.tune import SweepConfig, run_sweep
        ray.init(address={ray_session.get_runtime_context().gcs_address!r})
        cfg = load_config("synthetic", {[*TINY, f"data.root={synthetic_root}"]!r}, {run_root!r})
        run_sweep(cfg, SweepConfig(**{sweep_kw!r}, retrain_best=False))
    """)
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    layout = SweepLayout(run_root)
    exp_dir = os.path.join(layout.root, "tune")
    try:
        _wait_for(lambda: _terminated_trials(exp_dir), 420, "the first trial to finish", proc)
    except AssertionError:
        print(log_path.read_text()[-5000:])
        raise
    finally:
        proc.kill()  # only the driver we started; Ray stops its trials and their train workers
        proc.wait()
    first_done = _terminated_trials(exp_dir)
    shared_keys = [(layout.shared, k) for k in ("pretrain", "extract", "cluster", "k2/gan", "k2/generate",
                                                "k3/gan", "k3/generate")]
    before = {key: read_record(root, key) for root, key in shared_keys}
    assert all(before.values()), "the shared stages ran before the first trial"
    first_model = os.path.join(layout.trials, first_done[0], "model.pt")
    first_mtime = os.path.getmtime(first_model)
    # Ray frees a killed driver's trial actors within seconds when idle, over a minute on a loaded machine
    _wait_for(lambda: ray_session.available_resources().get("CPU", 0) >= 2, 180, "the killed driver's trials to go")
    t_killed = time.time() - t0

    # 2. resume here: nothing shared is rebuilt, the finished trial is kept, the others run
    res = run_sweep(_config(synthetic_root, run_root), SweepConfig(**sweep_kw, retrain_best=False), resume=True)
    wall = time.time() - t0
    assert res.built == []
    for root, key in shared_keys:
        assert read_record(root, key).started == before[key].started, f"{key} was rebuilt"
    for k in (2, 3):  # one GAN set per K, one checkpoint per cluster
        gan_dir = os.path.join(layout.shared, f"k{k}", "gan")
        assert sorted(d for d in os.listdir(gan_dir) if d.startswith("c")) == [f"c{c}" for c in range(k)]
        gen = storage.read_table(os.path.join(layout.shared, f"k{k}", "generate", "manifest.parquet"))
        assert gen.num_rows == 60 and sorted(set(gen["cluster"].to_pylist())) == list(range(k))
    assert os.path.getmtime(first_model) == first_mtime, "the finished trial was trained again"

    rows = res.rows
    assert len(rows) == 3  # the 0-image baseline once, (K=2, 60) and (K=3, 60)
    assert {r["trial_id"] for r in rows} >= set(first_done)
    assert all(r["status"] == "done" and 0 <= r["val_mAP"] <= 1 for r in rows), rows
    summary = storage.read_json(res.files["json"])
    cells = {(c["k"], c["generated"]): c for c in summary["cells"]}
    assert set(cells) == {(2, 0), (2, 60), (3, 0), (3, 60)}
    assert all(c["status"] == "done" and c["mAP"] is not None for c in cells.values())
    assert cells[(2, 0)]["mAP"] == cells[(3, 0)]["mAP"]  # the shared baseline
    md = Path(res.files["markdown"]).read_text()
    assert "| K | 0 | 60 |" in md and len(re.findall(r"\| \d+\.\d\d / \d+\.\d\d ", md)) == 4
    assert Path(res.files["heatmap"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(Path(res.files["csv"]).read_text().strip().splitlines()) == 4

    # 3. the best point: valid pipeline YAML of the best row (its retraining: the ASHA test below)
    from slsr_ray.pipeline import load_config

    best_cfg = load_config(res.files["best"])
    best = res.best
    assert best["val_mAP"] == max(r["val_mAP"] for r in rows)
    assert best_cfg.run_root == layout.best
    assert math.isclose(best_cfg.train.lam, best["lam"]) or best["generated"] == 0
    if best["generated"]:
        assert (best_cfg.cluster.k, best_cfg.generate.count) == (best["k"], best["generated"])

    t = res.timings
    print(f"\nsweep wall {wall:.1f}s (first driver until kill {t_killed:.1f}s); shared stages {t['shared_s']:.1f}s, "
          f"trials {t['trials_s']:.1f}s -> {100 * t['shared_fraction']:.0f}% shared")


@pytest.mark.slow
def test_failed_trial_asha_and_s3_experiment(ray_session, synthetic_root, s3_bucket):
    """On an s3:// run root: no generated images and random init (the shared work is only the split),
    two epochs reported one by one to ASHA; lr 1e12 diverges (NaN) and the sweep goes on; the best
    point is retrained on the full training set and scored on the test split."""
    run_root = f"{s3_bucket}/run"
    cfg = _config(synthetic_root, run_root, ["train_init=imagenet", "train.epochs=2"])
    sweep = SweepConfig(ks=[2], generated=[0], lrs=[0.01, 1e12], val_fraction=0.25, asha=True, retrain_best=True)
    res = run_sweep(cfg, sweep)
    by_lr = {r["lr"]: r for r in res.rows}
    assert by_lr[1e12]["status"] == "failed" and "NaN" in by_lr[1e12]["error"]
    good = by_lr[0.01]
    assert good["status"] == "done" and good["epochs"] == 2 and good["val_mAP"] is not None
    assert res.best["lr"] == 0.01
    assert "failed" in res.table and "Failed trials" in storage.read_text(res.files["markdown"])
    layout = SweepLayout(run_root)
    assert read_record(layout.shared, "pretrain") is None
    # the best point, retrained on every train id (none held out) with its lr, scored on the test split
    best_train = storage.read_table(f"{layout.best}/prepare/train.parquet")
    assert best_train.num_rows == storage.read_table(f"{layout.source}/prepare/train.parquet").num_rows
    assert storage.read_json(f"{layout.best}/train/none/metrics.json")["config"]["lr"] == 0.01
    test = res.test["plain"]
    assert res.test["strategy"] == "none" and 0 < test["mAP"] <= 1 and test["num_valid_queries"] > 0
    # the Tune experiment and every trial artifact live on S3
    exp = f"{layout.root}/tune/{good['trial_id']}"
    progress = storage.read_text(f"{exp}/progress.csv").strip().splitlines()
    assert len(progress) == 3  # header + one validation report per epoch (two chunks of one epoch)
    history = storage.read_json(f"{layout.trials}/{good['trial_id']}/metrics.json")["history"]
    assert [h["epoch"] for h in history] == [0, 1]  # the second chunk resumed from the first's checkpoint
    assert history[1]["lr"] < history[0]["lr"]  # the inverse lr policy continued over the iterations
    # resuming a finished sweep with another search space is refused
    with pytest.raises(SweepError, match="another search space"):
        run_sweep(cfg, dataclasses.replace(sweep, lrs=[0.01]), resume=True)
    # resuming it unchanged retrains nothing (the failed trial stays failed without retry_failed)
    again = run_sweep(cfg, dataclasses.replace(sweep, retrain_best=False), resume=True)
    assert again.built == [] and {r["trial_id"] for r in again.rows} == {r["trial_id"] for r in res.rows}
    assert np.isclose(again.best["val_mAP"], res.best["val_mAP"])
