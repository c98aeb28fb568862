"""The sweep from start to end: shared stages, trials (resumable), results, the best config retrained."""

from __future__ import annotations

import logging
import time

from .. import storage
from ..config import config_hash, to_dict
from ..layout import SweepLayout
from ..pipeline import PipelineConfig, check_run_root
from ..stages import read_record
from .config import SweepConfig, SweepError, SweepResults
from .results import best_config, write_results
from .search import check_resources, make_tuner, param_space_and_search, rows_from, tune_storage
from .shared import prepare_shared, shared_seconds

log = logging.getLogger("slsr_ray.tune")


def run_sweep(cfg: PipelineConfig, sweep: SweepConfig, resume: bool = False, echo=print) -> SweepResults:
    """Run (or with ``resume`` continue) a sweep: shared stages once, then one Tune trial per point,
    then the results table, plot and best config; with ``sweep.retrain_best`` the best values are
    retrained on the full training set and evaluated on the test split under ``sweep/best``."""
    # Long because the sweep's phases in order (checks, shared stages, Tuner fit or restore, results, best retrain).
    import ray

    from ..train import TrainConfig

    t0 = time.time()
    layout = SweepLayout(cfg.run_root)
    check_run_root(cfg.run_root)
    TrainConfig.from_dict({**to_dict(cfg.train), "num_workers": sweep.train_workers,
                           "cpus_per_worker": sweep.cpus_per_worker})  # bad train settings fail here
    if not ray.is_initialized():
        from ..raysetup import init_ray

        init_ray()
    check_resources(sweep, cfg.train)
    if sweep.search == "optuna":
        param_space_and_search(sweep)  # a missing optuna fails before the shared stages
    space_uri = layout.results("sweep.json")
    space = {"search": sweep.search_space_dict(), "pipeline": config_hash(cfg.data, cfg.pretrain, cfg.extract,
                                                                          cfg.cluster, cfg.gan, cfg.generate, cfg.train,
                                                                          cfg.train_init)}
    _, fs, exp_path = tune_storage(layout)
    from ray import tune

    exists = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if exists and not resume:
        raise SweepError(
            f"a sweep experiment already exists at {layout.root}; pass resume=True (--resume) to continue it, "
            "or use another run root"
        )
    if exists and storage.exists(space_uri):
        previous = storage.read_json(space_uri)
        if previous != space:
            raise SweepError(
                f"--resume with another search space or config than the sweep at {layout.root} "
                f"(was {previous['search']}, now {space['search']}); use the same values or another run root"
            )
    context = prepare_shared(cfg, sweep, echo=echo)
    built = context.pop("built")
    shared_wall = context.pop("shared_wall_s")
    split = context.pop("split")
    storage.write_json(space_uri, space)
    echo(f"[sweep] validation: {split['num_val_ids']} held-out ids ({split['num_query']} query, "
         f"{split['num_gallery']} gallery images); training on {split['num_train_ids']} ids")
    t_trials = time.time()
    tuner = make_tuner(sweep, context, layout, resume, echo)
    grid = tuner.fit()
    trials_wall = time.time() - t_trials
    rows = rows_from(grid, int(cfg.train.epochs))
    shared_s = shared_seconds(cfg.run_root, sweep.ks)
    trials_s = float(sum(r["seconds"] or 0.0 for r in rows))
    timings = {
        "wall_s": time.time() - t0, "shared_s": shared_s, "shared_wall_s_this_run": shared_wall,
        "trials_s": trials_s, "trials_wall_s_this_run": trials_wall,
        "shared_fraction": shared_s / max(shared_s + trials_s, 1e-9),
    }
    results = write_results(cfg, sweep, rows, timings, built, echo=echo)
    if sweep.retrain_best and results.best is not None:
        from ..pipeline import run_pipeline

        best_cfg = best_config(cfg, results.best, sweep)
        echo(f"[sweep] retraining the best point on the full training set under {layout.best}")
        t_best = time.time()
        run_pipeline(best_cfg, echo=echo)
        strategy = best_cfg.train.strategy
        rec = read_record(layout.best, f"evaluate/{strategy}")
        results.test = {"strategy": strategy, **(rec.outputs if rec else {})}
        results.timings["best_s"] = time.time() - t_best
        results.timings["wall_s"] = time.time() - t0
        summary = storage.read_json(results.files["json"])
        summary.update(test=results.test, timings=results.timings)
        storage.write_json(results.files["json"], summary)
        plain = results.test.get("plain", {})
        if plain:
            echo(f"[sweep] best point on the test split: rank-1 {100 * plain['rank1']:.2f}%  mAP {100 * plain['mAP']:.2f}%")
    return results
