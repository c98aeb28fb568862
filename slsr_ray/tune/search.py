"""The search: grid / random / Optuna over K, lambda, generated count (and lr), the Tuner and its storage."""

from __future__ import annotations

import itertools
import logging
import os

from .. import storage
from ..layout import SweepLayout
from .config import EXPERIMENT_NAME, METRIC, SweepConfig, SweepError
from .trial import sweep_trial

log = logging.getLogger("slsr_ray.tune")


def lr_values(sweep: SweepConfig) -> list[float | None]:
    return list(sweep.lrs) if sweep.lrs else [None]


def grid_points(sweep: SweepConfig) -> list[dict]:
    """Every grid point; runs without generated images ignore K and lambda, so they appear once per lr."""
    points, seen = [], set()
    for lr, n, k, lam in itertools.product(lr_values(sweep), sorted(set(sweep.generated)),
                                           sorted(set(sweep.ks)), sorted(set(sweep.lams))):
        p = {"k": k, "lam": lam, "generated": n, "lr": lr} if n > 0 else {"k": None, "lam": 0.0, "generated": 0, "lr": lr}
        key = tuple(sorted(p.items(), key=lambda kv: kv[0]))
        if key not in seen:
            seen.add(key)
            points.append(p)
    return points


def param_space_and_search(sweep: SweepConfig):
    from ray import tune

    if sweep.search == "grid":
        space = {"point": tune.grid_search(grid_points(sweep))}
        if sweep.num_samples > 1:  # repeats with different training seeds (num_samples is then 1 for Tune)
            space["repeat"] = tune.grid_search(list(range(sweep.num_samples)))
        return space, None
    space = {"k": tune.choice(sorted(set(sweep.ks))), "lam": tune.choice(sorted(set(sweep.lams))),
             "generated": tune.choice(sorted(set(sweep.generated)))}
    if sweep.lrs:
        space["lr"] = tune.choice(sorted(set(sweep.lrs)))
    if sweep.search == "random":
        return space, None
    try:
        import optuna  # noqa: F401  (OptunaSearch imports it lazily; fail here with a clear message)
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:
        raise SweepError("search 'optuna' needs the optuna package: pip install 'slsr-ray[optuna]' "
                         "(or use grid/random)") from e
    searcher = OptunaSearch(seed=sweep.seed)  # metric and mode come from the TuneConfig
    return space, ConcurrencyLimiter(searcher, max_concurrent=sweep.max_concurrent_trials)


def tune_storage(layout: SweepLayout) -> tuple[str, object, str]:
    """(storage_path, storage_filesystem, experiment path) for the Tune experiment."""
    if storage.is_s3(layout.root):
        path = layout.root[len("s3://"):]
        return path, storage.portable_filesystem(layout.root)[0], f"{path}/{EXPERIMENT_NAME}"
    path = os.path.abspath(layout.root)
    return path, None, os.path.join(path, EXPERIMENT_NAME)


def check_resources(sweep: SweepConfig, train_cfg) -> None:
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    use_gpu = train_cfg.use_gpu if train_cfg.use_gpu is not None else gpus >= 1
    need = sweep.trial_cpus + (0.0 if use_gpu else sweep.train_workers * sweep.cpus_per_worker)
    if need > cpus + 1e-9:
        raise SweepError(
            f"one trial needs {need:g} CPUs (trial_cpus {sweep.trial_cpus:g} + {sweep.train_workers} train "
            f"worker(s) x {sweep.cpus_per_worker:g}) but the Ray cluster has {cpus:g}; lower trial_cpus / "
            "train_workers / cpus_per_worker"
        )
    if use_gpu and gpus < sweep.train_workers:
        raise SweepError(f"{sweep.train_workers} GPU train workers per trial but the cluster has {gpus:g} GPUs")


def _trial_dirname(trial) -> str:
    return trial.trial_id  # the point itself is in params.json; long names hit path limits


def make_tuner(sweep: SweepConfig, context: dict, layout: SweepLayout, resume: bool, echo):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(tune.with_parameters(sweep_trial, context=context), {"CPU": sweep.trial_cpus})
    storage_path, fs, exp_path = tune_storage(layout)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        if not resume:
            raise SweepError(
                f"a sweep experiment already exists at {exp_path}; pass resume=True (--resume) to continue it, "
                "or use another run root"
            )
        echo(f"[sweep] resuming the Tune experiment at {exp_path}")
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=sweep.retry_failed,
                                  storage_filesystem=fs)
    param_space, search_alg = param_space_and_search(sweep)
    scheduler = None
    if sweep.asha:
        max_t = int(context["train"]["epochs"])
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=min(sweep.asha_grace_period, max_t),
                                  reduction_factor=sweep.asha_reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=search_alg, scheduler=scheduler,
            num_samples=1 if sweep.search == "grid" else sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME, storage_path=storage_path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False), verbose=1,
        ),
    )


def rows_from(grid, epochs: int) -> list[dict]:
    rows = []
    for r in grid:
        cfg = r.config or {}
        p = cfg.get("point", cfg)
        m = r.metrics or {}
        err = None
        if r.error is not None:
            err = str(getattr(r.error, "cause", None) or r.error).strip().splitlines()
            err = err[-1] if err else type(r.error).__name__
        status = "failed" if err else ("done" if m.get("epoch", 0) >= epochs else ("stopped" if m else "failed"))
        rows.append({
            "trial_id": m.get("trial_id") or os.path.basename(str(r.path or "")),
            "k": p.get("k"), "lam": float(p.get("lam", 0.0)), "generated": int(p.get("generated", 0)),
            "lr": p.get("lr"), "status": status, "val_rank1": m.get("val_rank1"), "val_mAP": m.get(METRIC),
            "epochs": m.get("epoch"), "seconds": m.get("time_total_s"), "error": err,
            "repeat": int(cfg.get("repeat", 0)),
        })
    return sorted(rows, key=lambda r: (r["lr"] or 0, r["lam"], r["k"] or 0, r["generated"]))
