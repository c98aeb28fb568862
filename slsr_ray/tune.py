"""Hyperparameter sweeps with Ray Tune over K (clusters), lambda (for generated images), the number of
generated images and optionally the learning rate: the paper's Tables 2-4 on your own data.

Layout under ``<run_root>/sweep/``::

    source/            the full dataset's manifests (``prepare`` stage of the configured dataset)
    split/             the sweep's data: train ids minus a validation share (relabelled 0..N-1), and
                       ``query``/``gallery`` made of the held-out train ids; the test split is never read
    shared/            stages every trial reuses, each with a ``_STAGE.json`` marker written last:
                       prepare, pretrain, extract, cluster (all Ks in one k-means run), and per K
                       ``k{K}/gan`` (one DCGAN set) and ``k{K}/generate`` (images for the LARGEST count)
    tune/              the Ray Tune experiment (``Tuner.restore`` resumes it)
    trials/<trial_id>/ each trial's Ray Train run, model and metrics
    results.{csv,md,json}, heatmap.png, best.yaml
    best/              the best values retrained on the full training set and evaluated on the test split
                       (the normal pipeline, with the best values as overrides)

Sharing: the shared stages run on the driver before any trial starts, so concurrent trials never train
the same GAN twice and a resumed sweep skips every stage whose marker hash matches. A trial with
generated count n uses the first n images of its K's generated set: per cluster the first
``split_count(n)[c]`` images, which never exceed those of the largest count (the split is
house-monotone and image i of cluster c depends only on (seed, c, i)).

Reporting: :func:`slsr_ray.train.run_training` builds its own ``TorchTrainer`` and takes no Train
callbacks, so ``TuneReportCallback`` cannot be attached and the train loop computes no validation
metric. Instead a trial trains in chunks of ``report_every`` epochs: each chunk is a ``run_training``
call into the same output folder, which Ray Train V2 resumes from the previous chunk's checkpoint
(model, optimizer, lr schedule, iteration count), then the trial evaluates validation rank-1/mAP and
calls ``ray.tune.report``. ASHA therefore acts every ``report_every`` epochs. The ``inv`` and ``step``
lr policies are exact under chunking; ``cosine`` depends on the total length, so with it a trial
trains in one go and reports once (ASHA then acts only at the end).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import storage
from .config import ConfigError, config_hash, from_dict, to_dict
from .layout import RunLayout, SweepLayout, per_k_stage
from .pipeline import USES_GENERATED, DataSection, PipelineConfig, check_run_root, stage_hashes
from .stages import read_record, run_stage

log = logging.getLogger("slsr_ray.tune")

SEARCHES = ("grid", "random", "optuna")
METRIC = "val_mAP"
EXPERIMENT_NAME = "tune"


class SweepError(ConfigError):
    """A sweep's search space or data cannot work (raised before any trial starts)."""


@dataclass
class SweepConfig:
    """What to search and how.

    ``ks`` / ``lams`` / ``generated`` / ``lrs``: the values searched (``lrs`` None keeps
    ``train.lr``). ``search``: ``grid`` runs every combination ``num_samples`` times, with training seeds
    ``train.seed + 0 .. num_samples-1`` (runs with 0
    generated images do not depend on K or lambda, so the grid trains that baseline once per lr and the
    table repeats it in every K row); ``random`` draws ``num_samples`` points; ``optuna`` lets Optuna
    (``pip install 'slsr-ray[optuna]'``; Ray Tune's ``OptunaSearch``, TPE) pick ``num_samples`` points. ``asha``: stop weak trials early on the
    validation mAP, checked every ``report_every`` epochs (None: 1 with ASHA, else only at the end).
    Resources: each trial holds ``trial_cpus`` and runs ``train_workers`` Ray Train workers of
    ``cpus_per_worker`` CPUs (or a GPU each when the cluster has GPUs); the defaults fit a 2-CPU laptop.
    ``val_fraction`` of the training identities are held out for validation (seeded by ``seed``).
    ``retrain_best``: retrain the best values on the full training set and evaluate on the test split.
    ``retry_failed``: on resume, rerun trials that failed before."""

    ks: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    lams: list[float] = field(default_factory=lambda: [1.0])
    generated: list[int] = field(default_factory=lambda: [0, 4000, 8000, 12000])
    lrs: list[float] | None = None
    search: str = "grid"
    num_samples: int = 1
    asha: bool = False
    asha_grace_period: int = 1
    asha_reduction_factor: float = 2.0
    report_every: int | None = None
    max_concurrent_trials: int = 1
    trial_cpus: float = 1.0
    train_workers: int = 1
    cpus_per_worker: float = 0.5
    val_fraction: float = 0.2
    seed: int = 0
    retrain_best: bool = True
    retry_failed: bool = False

    def __post_init__(self):
        self.ks = [int(k) for k in (self.ks or [])]
        self.lams = [float(x) for x in (self.lams or [])]
        self.generated = [int(n) for n in (self.generated or [])]
        self.lrs = [float(x) for x in self.lrs] if self.lrs else None
        empty = [name for name, v in (("ks", self.ks), ("lams", self.lams), ("generated", self.generated)) if not v]
        if empty:
            raise SweepError(f"empty search space: give at least one value for {', '.join(empty)}")
        checks = [
            (self.search in SEARCHES, f"search must be one of {SEARCHES}, got {self.search!r}"),
            (all(k >= 1 for k in self.ks), f"ks must be >= 1, got {self.ks}"),
            (all(0.0 <= x <= 1.0 for x in self.lams), f"lams (lambda for generated images) must lie in [0, 1], got {self.lams}"),
            (all(n >= 0 for n in self.generated), f"generated counts must be >= 0, got {self.generated}"),
            (self.lrs is None or all(x > 0 for x in self.lrs), f"lrs must be > 0, got {self.lrs}"),
            (self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.report_every is None or self.report_every >= 1, "report_every must be >= 1 or None"),
            (self.max_concurrent_trials >= 1, "max_concurrent_trials must be >= 1"),
            (self.train_workers >= 1, "train_workers must be >= 1"),
            (self.trial_cpus > 0 and self.cpus_per_worker > 0, "trial_cpus and cpus_per_worker must be > 0"),
            (0.0 < self.val_fraction < 1.0, f"val_fraction must lie in (0, 1), got {self.val_fraction}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SweepError(msg)

    def search_space_dict(self) -> dict:
        """The fields that define the trials (a resumed sweep must keep them)."""
        keys = ("ks", "lams", "generated", "lrs", "search", "num_samples", "asha", "asha_grace_period",
                "asha_reduction_factor", "report_every", "val_fraction", "seed")
        return {k: getattr(self, k) for k in keys}


@dataclass
class SweepResults:
    """``rows``: one dict per trial (k, lam, generated, lr, status, val_rank1, val_mAP, epochs,
    seconds, error, trial_id); ``best``: the best row; ``table``: the Markdown table; ``files``: written
    URIs; ``timings``: shared-stage and trial seconds; ``test``: the best config's test metrics."""

    rows: list[dict]
    best: dict | None
    table: str
    files: dict[str, str]
    timings: dict
    built: list[str]
    test: dict | None = None


# ------------------------------------------------------------------------------- validation split


def carve_validation_split(train: pa.Table, val_fraction: float, seed: int = 0) -> dict[str, pa.Table]:
    """Hold out ``val_fraction`` of the training identities for validation.

    Returns ``train`` (the remaining ids, relabelled 0..N-1), ``query`` (one image per camera of each
    held-out id) and ``gallery`` (the held-out ids' other images). Only ids seen by at least two cameras
    are held out, so every query has a cross-camera match."""
    from .data import to_manifest

    train = to_manifest(train)
    real = train.filter(pc.not_equal(train["source"], "generated"))
    pids = real["pid"].to_numpy()
    cams = real["camid"].to_numpy()
    uniq = np.unique(pids)
    multi_cam = np.array([p for p in uniq if len(np.unique(cams[pids == p])) >= 2])
    n_val = max(1, int(round(val_fraction * len(uniq))))
    if len(multi_cam) < n_val or len(uniq) - n_val < 1:
        raise SweepError(
            f"cannot hold out {n_val} of {len(uniq)} training identities for validation "
            f"({len(multi_cam)} are seen by >= 2 cameras); lower val_fraction or use more identities"
        )
    rng = np.random.default_rng(seed)
    val_ids = np.sort(rng.choice(multi_cam, size=n_val, replace=False))
    is_val = np.isin(pids, val_ids)
    order = rng.permutation(len(pids))  # which image of an (id, camera) becomes the query
    query_rows: set[int] = set()
    seen: set[tuple[int, int]] = set()
    for i in order:
        if is_val[i] and (int(pids[i]), int(cams[i])) not in seen:
            seen.add((int(pids[i]), int(cams[i])))
            query_rows.add(int(i))
    q_mask = np.zeros(len(pids), bool)
    q_mask[list(query_rows)] = True
    from .data.base import relabel

    new_train, _ = relabel(real.filter(pa.array(~is_val)))
    return {
        "train": new_train,
        "query": real.filter(pa.array(q_mask)),
        "gallery": real.filter(pa.array(is_val & ~q_mask)),
    }


# ----------------------------------------------------------------------------- generated prefixes


_INDEX_RE = re.compile(r"(\d+)\.[A-Za-z]+$")


def image_index(path: str) -> int:
    """Index i of a generated image (its file is ``images/c{c}/{i:06d}.jpg``)."""
    m = _INDEX_RE.search(path)
    if not m:
        raise ValueError(f"generated image {path!r} is not named <index>.<ext>")
    return int(m.group(1))


def generated_prefix(manifest: pa.Table, count: int, sizes: dict[int, int], split: str = "proportional") -> pa.Table:
    """The rows of a larger generated set that make up a set of ``count`` images: per cluster c the
    images with index < ``split_count(count, sizes, split)[c]`` (what ``generate_images`` would have
    written for ``count``). Raises when the manifest holds fewer than that in some cluster."""
    from .generate import split_count

    if count <= 0:
        return manifest.slice(0, 0)
    want = split_count(count, sizes, split)
    clusters = manifest["cluster"].to_numpy()
    index = np.fromiter((image_index(p) for p in manifest["path"].to_pylist()), np.int64, manifest.num_rows)
    have = {int(c): int(np.sum(clusters == c)) for c in np.unique(clusters)}
    short = {c: (n, have.get(c, 0)) for c, n in want.items() if n > have.get(c, 0)}
    if short:
        raise SweepError(
            f"the shared generated set has too few images for count {count}: cluster -> (needed, have) {short}"
        )
    limit = np.array([want.get(int(c), 0) for c in clusters], np.int64)
    return manifest.filter(pa.array(index < limit))


# ------------------------------------------------------------------------------- shared stages


def _run_stage(run_root: str, key: str, stage_hash: str, fn, built: list[str], echo, label: str | None = None) -> dict:
    """Run ``fn()`` unless ``key``'s marker under ``run_root`` holds ``stage_hash``; returns its outputs."""
    rec, ran = run_stage(run_root, key, stage_hash, fn, echo=echo, tag="sweep", label=label)
    if ran:
        built.append(label or key)
    return rec.outputs


def _shared_config(cfg: PipelineConfig, layout: SweepLayout, sweep: SweepConfig) -> PipelineConfig:
    """The pipeline config of the shared stages: the split's train ids, every K of the sweep."""
    shared = dataclasses.replace(
        cfg,
        run_root=layout.shared,
        data=DataSection(dataset=cfg.data.dataset, manifests=layout.split),
        cluster=dataclasses.replace(cfg.cluster, ks=sorted(set(sweep.ks)), k=None),
        baselines=[],
    )
    return shared


def prepare_shared(cfg: PipelineConfig, sweep: SweepConfig, echo=print) -> dict:
    """Everything trials reuse, built once on the driver (skipped where markers match): the source
    manifests, the validation split, pretraining, features, k-means for every K, and per K one GAN
    set plus the images of the largest generated count. Returns the trials' context."""
    from . import pipeline

    layout = SweepLayout(cfg.run_root)
    built: list[str] = []
    t0 = time.time()
    src_cfg = dataclasses.replace(cfg, run_root=layout.source)
    h_src = stage_hashes(src_cfg)["prepare"]
    _run_stage(layout.source, "prepare", h_src, lambda: pipeline.stage_prepare(src_cfg), built, echo)

    h_split = config_hash("sweep-split", h_src, sweep.val_fraction, sweep.seed)

    def make_split() -> dict:
        parts = carve_validation_split(storage.read_table(RunLayout(layout.source).split("train")),
                                       sweep.val_fraction, sweep.seed)
        for name, table in parts.items():
            storage.write_table(layout.split_file(name), table)
        return {"num_train_ids": len(np.unique(parts["train"]["pid"].to_numpy())),
                "num_val_ids": len(np.unique(parts["query"]["pid"].to_numpy())),
                **{f"num_{n}": t.num_rows for n, t in parts.items()}}

    split = _run_stage(layout.split, "split", h_split, make_split, built, echo)
    too_big = [k for k in sweep.ks if k > split["num_train_ids"]]
    if too_big:
        raise SweepError(
            f"K={too_big} is larger than the {split['num_train_ids']} training identities left after holding "
            f"out {split['num_val_ids']} for validation; each cluster needs identities of its own"
        )

    shared = _shared_config(cfg, layout, sweep)
    # chain the split's hash in: the split folder's path alone does not change with val_fraction / seed
    h = {"prepare": config_hash("sweep-prepare", h_split, shared.data)}
    h["pretrain"] = config_hash("pretrain", h["prepare"], shared.pretrain)
    h["extract"] = config_hash("extract", h["pretrain"], shared.extract)
    h["cluster"] = config_hash("cluster", h["extract"], shared.cluster)
    max_count = max(sweep.generated)
    needs_clusters = max_count > 0
    root = layout.shared
    _run_stage(root, "prepare", h["prepare"], lambda: pipeline.stage_prepare(shared), built, echo)
    if needs_clusters or cfg.train_init == "pretrain":
        _run_stage(root, "pretrain", h["pretrain"], lambda: pipeline.stage_pretrain(shared), built, echo)
    per_k: dict[int, dict] = {}
    if needs_clusters:
        _run_stage(root, "extract", h["extract"], lambda: pipeline.stage_extract(shared), built, echo)
        _run_stage(root, "cluster", h["cluster"], lambda: pipeline.stage_cluster(shared), built, echo)
        # per K a sub-run (shared/k{K}) of the pipeline's own GAN and generate stages, at the largest count
        g = dataclasses.replace(cfg.generate, count=max_count)
        for k in sorted(set(sweep.ks)):
            kcfg = dataclasses.replace(shared, run_root=layout.per_k(k).root, generate=g)
            h_gan = config_hash("gan", h["cluster"], k, shared.gan)
            h_gen = config_hash("generate", h_gan, max_count, g)
            assignments = RunLayout(root).assignments(k)
            _run_stage(kcfg.run_root, "gan", h_gan, lambda c=kcfg, a=assignments: pipeline.stage_gan(c, a),
                       built, echo, label=per_k_stage(k, "gan"))
            gen = _run_stage(kcfg.run_root, "generate", h_gen, lambda c=kcfg: pipeline.stage_generate(c),
                             built, echo, label=per_k_stage(k, "generate"))
            per_k[k] = {
                "manifest": gen["manifest"],
                "sizes": {int(c): n for c, n in gen["sizes"].items()},
                "split": gen["split"],
                "membership": RunLayout(root).membership(k),
            }
    pre = read_record(root, "pretrain")
    init = pre.outputs["checkpoint"] if (pre is not None and cfg.train_init == "pretrain") else None
    return {
        "train_manifest": layout.split_file("train"),
        "query_manifest": layout.split_file("query"),
        "gallery_manifest": layout.split_file("gallery"),
        "trials_root": layout.trials,
        "init_checkpoint": init,
        "per_k": per_k,
        "train": to_dict(cfg.train),
        "metric": cfg.evaluate.metric,  # validation ranks with the pipeline's evaluation distance
        "sweep": to_dict(sweep),
        "built": built,
        "shared_wall_s": time.time() - t0,
        "split": split,
    }


def shared_seconds(run_root: str, ks: list[int]) -> float:
    """Seconds the shared stages took when they were built (from their markers)."""
    layout = SweepLayout(run_root)
    keys = [(layout.source, "prepare"), (layout.split, "split")]
    keys += [(layout.shared, s) for s in ("prepare", "pretrain", "extract", "cluster")]
    keys += [(layout.per_k(k).root, s) for k in ks for s in ("gan", "generate")]
    total = 0.0
    for root, key in keys:
        rec = read_record(root, key)
        total += rec.seconds if rec else 0.0
    return total


# ------------------------------------------------------------------------------------- the trial


def _chunk_epochs(sweep: dict, train: dict) -> int:
    epochs = int(train["epochs"])
    every = sweep.get("report_every")
    if every is None:
        every = 1 if sweep.get("asha") else epochs
    if train.get("lr_policy") == "cosine" and every < epochs:
        log.warning("lr_policy cosine depends on the run length: training in one go and reporting once")
        every = epochs
    return max(1, min(int(every), epochs))


def sweep_trial(config: dict, context: dict) -> None:
    """A Ray Tune function trainable: train with this point's K / lambda / count / lr on the split's
    train ids (Ray Train inside the trial), report validation rank-1/mAP after every chunk of epochs."""
    import ray.tune

    from .train import TrainConfig, evaluate_checkpoint, run_training

    point = config.get("point", config)
    k, lam, count = point.get("k"), float(point["lam"]), int(point["generated"])
    sweep = context["sweep"]
    train_d = dict(context["train"])
    tcfg = TrainConfig.from_dict(train_d)
    changes = {"lam": lam, "num_workers": int(sweep["train_workers"]), "cpus_per_worker": float(sweep["cpus_per_worker"])}
    if point.get("lr") is not None:
        changes["lr"] = float(point["lr"])
    if config.get("repeat"):
        changes["seed"] = tcfg.seed + int(config["repeat"])
    generated = membership = None
    if count > 0:
        shared = context["per_k"][int(k)]
        full = storage.read_table(shared["manifest"])
        generated = generated_prefix(full, count, shared["sizes"], shared["split"])
        membership = shared["membership"]
    elif tcfg.strategy in USES_GENERATED:
        changes["strategy"] = "none"  # no generated images: the same as plain cross-entropy
    tcfg = dataclasses.replace(tcfg, **changes)
    trial_id = ray.tune.get_context().get_trial_id()
    out_dir = storage.join(context["trials_root"], trial_id)
    query = storage.read_table(context["query_manifest"])
    gallery = storage.read_table(context["gallery_manifest"])
    step = _chunk_epochs(sweep, train_d)
    done = 0
    while done < tcfg.epochs:
        target = min(done + step, tcfg.epochs)
        # the same output folder each chunk: Ray Train V2 resumes from the previous chunk's checkpoint
        result = run_training(dataclasses.replace(tcfg, epochs=target), context["train_manifest"], out_dir,
                              generated_manifest=generated, membership=membership,
                              init_checkpoint=context["init_checkpoint"])
        done = max(len(result.metrics), target)
        val = evaluate_checkpoint(result.checkpoint, query, gallery, metric=context["metric"])
        last = result.metrics[-1] if result.metrics else {}
        ray.tune.report({
            METRIC: val["mAP"], "val_rank1": val["rank1"], "val_rank5": val["rank5"], "epoch": done,
            "loss": last.get("loss"), "train_acc": last.get("train_acc"), "num_generated": count,
            "checkpoint_uri": result.checkpoint,
        })


# ------------------------------------------------------------------------------------- the search


def _lr_values(sweep: SweepConfig) -> list[float | None]:
    return list(sweep.lrs) if sweep.lrs else [None]


def grid_points(sweep: SweepConfig) -> list[dict]:
    """Every grid point; runs without generated images ignore K and lambda, so they appear once per lr."""
    points, seen = [], set()
    for lr, n, k, lam in itertools.product(_lr_values(sweep), sorted(set(sweep.generated)),
                                           sorted(set(sweep.ks)), sorted(set(sweep.lams))):
        p = {"k": k, "lam": lam, "generated": n, "lr": lr} if n > 0 else {"k": None, "lam": 0.0, "generated": 0, "lr": lr}
        key = tuple(sorted(p.items(), key=lambda kv: kv[0]))
        if key not in seen:
            seen.add(key)
            points.append(p)
    return points


def _param_space_and_search(sweep: SweepConfig):
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


def _storage(layout: SweepLayout) -> tuple[str, object, str]:
    """(storage_path, storage_filesystem, experiment path) for the Tune experiment."""
    if storage.is_s3(layout.root):
        path = layout.root[len("s3://"):]
        return path, storage.portable_filesystem(layout.root)[0], f"{path}/{EXPERIMENT_NAME}"
    path = os.path.abspath(layout.root)
    return path, None, os.path.join(path, EXPERIMENT_NAME)


def _check_resources(sweep: SweepConfig, train_cfg) -> None:
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


def _make_tuner(sweep: SweepConfig, context: dict, layout: SweepLayout, resume: bool, echo):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(tune.with_parameters(sweep_trial, context=context), {"CPU": sweep.trial_cpus})
    storage_path, fs, exp_path = _storage(layout)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        if not resume:
            raise SweepError(
                f"a sweep experiment already exists at {exp_path}; pass resume=True (--resume) to continue it, "
                "or use another run root"
            )
        echo(f"[sweep] resuming the Tune experiment at {exp_path}")
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=sweep.retry_failed,
                                  storage_filesystem=fs)
    param_space, search_alg = _param_space_and_search(sweep)
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


def _rows_from(grid, epochs: int) -> list[dict]:
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


# ---------------------------------------------------------------------------------- the results


def table_cells(rows: list[dict], sweep: SweepConfig) -> dict[tuple, dict]:
    """(lr, lam, K, count) -> {rank1, mAP, n, status}: repeated points averaged; the 0-image baseline
    (independent of K and lambda) fills the count-0 column of every K and lambda."""
    cells: dict[tuple, dict] = {}
    for lr, lam, k, n in itertools.product(_lr_values(sweep), sorted(set(sweep.lams)), sorted(set(sweep.ks)),
                                           sorted(set(sweep.generated))):
        match = [r for r in rows if r["generated"] == n and (r["lr"] == lr)
                 and (n == 0 or (r["k"] == k and math.isclose(r["lam"], lam)))]
        ok = [r for r in match if r["status"] != "failed" and r["val_mAP"] is not None]
        if ok:
            cells[(lr, lam, k, n)] = {
                "rank1": float(np.mean([r["val_rank1"] for r in ok])), "mAP": float(np.mean([r["val_mAP"] for r in ok])),
                "n": len(ok), "status": "stopped" if all(r["status"] == "stopped" for r in ok) else "done",
            }
        elif match:
            cells[(lr, lam, k, n)] = {"rank1": None, "mAP": None, "n": 0, "status": "failed"}
        else:
            cells[(lr, lam, k, n)] = {"rank1": None, "mAP": None, "n": 0, "status": "not run"}
    return cells


def format_tables(cells: dict[tuple, dict], sweep: SweepConfig) -> str:
    """Markdown tables like the paper's Table 4: rows K, columns generated count, cells R1 / mAP (%),
    one table per lambda (and lr)."""
    out = []
    counts = sorted(set(sweep.generated))
    for lr in _lr_values(sweep):
        for lam in sorted(set(sweep.lams)):
            title = f"lambda = {lam:g}" + (f", lr = {lr:g}" if lr is not None else "")
            out.append(f"**{title}** (validation rank-1 / mAP, %)\n")
            out.append("| K | " + " | ".join(str(n) for n in counts) + " |")
            out.append("|---|" + "---|" * len(counts))
            for k in sorted(set(sweep.ks)):
                vals = []
                for n in counts:
                    c = cells[(lr, lam, k, n)]
                    if c["mAP"] is None:
                        vals.append(c["status"])
                    else:
                        mark = " (stopped early)" if c["status"] == "stopped" else ""
                        vals.append(f"{100 * c['rank1']:.2f} / {100 * c['mAP']:.2f}{mark}")
                out.append(f"| {k} | " + " | ".join(vals) + " |")
            out.append("")
    return "\n".join(out)


def plot_heatmaps(cells: dict[tuple, dict], sweep: SweepConfig) -> bytes:
    """PNG: one heatmap of validation mAP per (lambda, lr), K x generated count; failed cells blank."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(lr, lam) for lr in _lr_values(sweep) for lam in sorted(set(sweep.lams))]
    ks, counts = sorted(set(sweep.ks)), sorted(set(sweep.generated))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 1.4 * len(counts) * len(panels), 1.2 + 0.7 * len(ks)),
                             squeeze=False)
    for ax, (lr, lam) in zip(axes[0], panels, strict=True):
        grid = np.full((len(ks), len(counts)), np.nan)
        for i, k in enumerate(ks):
            for j, n in enumerate(counts):
                c = cells[(lr, lam, k, n)]
                if c["mAP"] is not None:
                    grid[i, j] = 100 * c["mAP"]
                ax.text(j, i, "failed" if c["status"] == "failed" else
                        ("" if c["mAP"] is None else f"{100 * c['rank1']:.1f}\n{100 * c['mAP']:.1f}"),
                        ha="center", va="center", fontsize=8)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(counts)), [str(n) for n in counts])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("generated images")
        ax.set_ylabel("K")
        ax.set_title(f"val R1/mAP, lambda {lam:g}" + (f", lr {lr:g}" if lr is not None else ""), fontsize=9)
        fig.colorbar(im, ax=ax, label="mAP %")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _write_csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    cols = ["trial_id", "k", "lam", "generated", "lr", "repeat", "status", "val_rank1", "val_mAP", "epochs", "seconds", "error"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in cols})
    return buf.getvalue()


def best_row(rows: list[dict]) -> dict | None:
    """The finished trial with the highest validation mAP (ties: rank-1)."""
    ok = [r for r in rows if r["status"] == "done" and r["val_mAP"] is not None] or \
         [r for r in rows if r["status"] == "stopped" and r["val_mAP"] is not None]
    return max(ok, key=lambda r: (r["val_mAP"], r["val_rank1"])) if ok else None


def best_config(cfg: PipelineConfig, best: dict, sweep: SweepConfig) -> PipelineConfig:
    """The pipeline config that retrains ``best`` on the full training set under ``sweep/best``."""
    layout = SweepLayout(cfg.run_root)
    raw = to_dict(cfg)
    raw["run_root"] = layout.best
    raw["data"]["manifests"] = RunLayout(layout.source).stage("prepare")  # the full train + the real test split
    raw["train"]["lam"] = best["lam"]
    if best["lr"] is not None:
        raw["train"]["lr"] = best["lr"]
    if best["generated"] > 0:
        raw["cluster"]["k"] = best["k"]
        raw["cluster"]["ks"] = [best["k"]]
        raw["generate"]["count"] = best["generated"]
    else:  # the best is the real-images-only baseline
        if raw["train"]["strategy"] in USES_GENERATED:
            raw["train"]["strategy"] = "none"
        raw["baselines"] = [b for b in raw["baselines"] if b not in USES_GENERATED]
    return from_dict(PipelineConfig, raw)


def _best_yaml(best_cfg: PipelineConfig, best: dict) -> str:
    import yaml

    head = (f"# best point of the sweep: K={best['k']} lambda={best['lam']:g} generated={best['generated']}"
            + (f" lr={best['lr']:g}" if best["lr"] is not None else "")
            + f"\n# validation rank-1 {100 * best['val_rank1']:.2f}%  mAP {100 * best['val_mAP']:.2f}%"
            + "\n# rerun with: slsr run --config <this file>\n")
    return head + yaml.safe_dump(to_dict(best_cfg), sort_keys=False)


def write_results(cfg: PipelineConfig, sweep: SweepConfig, rows: list[dict], timings: dict, built: list[str],
                  echo=print) -> SweepResults:
    """Write results.csv / results.md / results.json / heatmap.png / best.yaml under ``sweep/``."""
    layout = SweepLayout(cfg.run_root)
    cells = table_cells(rows, sweep)
    table = format_tables(cells, sweep)
    best = best_row(rows)
    failed = [r for r in rows if r["status"] == "failed"]
    md = ["# SLSR sweep", "", table]
    if failed:
        md += ["## Failed trials", ""] + [f"- {r['trial_id']} K={r['k']} lambda={r['lam']:g} n={r['generated']}"
                                          f" lr={r['lr']}: {r['error']}" for r in failed] + [""]
    if best:
        md += [f"Best: K={best['k']} lambda={best['lam']:g} generated={best['generated']}"
               + (f" lr={best['lr']:g}" if best["lr"] is not None else "")
               + f" (val mAP {100 * best['val_mAP']:.2f}%)", ""]
    md += [f"Shared stages {timings['shared_s']:.1f}s, trials {timings['trials_s']:.1f}s "
           f"({100 * timings['shared_fraction']:.0f}% shared)", ""]
    files = {
        "csv": layout.results("results.csv"),
        "markdown": layout.results("results.md"),
        "json": layout.results("results.json"),
        "heatmap": layout.results("heatmap.png"),
    }
    storage.write_text(files["csv"], _write_csv(rows))
    storage.write_text(files["markdown"], "\n".join(md))
    cell_list = [{"lr": lr, "lam": lam, "k": k, "generated": n, **c} for (lr, lam, k, n), c in cells.items()]
    storage.write_json(files["json"], {"rows": rows, "cells": cell_list, "best": best, "timings": timings,
                                       "built": built, "sweep": to_dict(sweep)})
    storage.write_bytes(files["heatmap"], plot_heatmaps(cells, sweep))
    if best:
        files["best"] = layout.results("best.yaml")
        storage.write_text(files["best"], _best_yaml(best_config(cfg, best, sweep), best))
    echo(table)
    if failed:
        echo(f"[sweep] {len(failed)} trial(s) failed: " + "; ".join(f"{r['trial_id']}: {r['error']}" for r in failed))
    return SweepResults(rows=rows, best=best, table=table, files=files, timings=timings, built=built)


# ---------------------------------------------------------------------------------------- driver


def run_sweep(cfg: PipelineConfig, sweep: SweepConfig, resume: bool = False, echo=print) -> SweepResults:
    """Run (or with ``resume`` continue) a sweep: shared stages once, then one Tune trial per point,
    then the results table, plot and best config; with ``sweep.retrain_best`` the best values are
    retrained on the full training set and evaluated on the test split under ``sweep/best``."""
    import ray

    from .train import TrainConfig

    t0 = time.time()
    layout = SweepLayout(cfg.run_root)
    check_run_root(cfg.run_root)
    TrainConfig.from_dict({**to_dict(cfg.train), "num_workers": sweep.train_workers,
                           "cpus_per_worker": sweep.cpus_per_worker})  # bad train settings fail here
    if not ray.is_initialized():
        from .raysetup import init_ray

        init_ray()
    _check_resources(sweep, cfg.train)
    if sweep.search == "optuna":
        _param_space_and_search(sweep)  # a missing optuna fails before the shared stages
    space_uri = layout.results("sweep.json")
    space = {"search": sweep.search_space_dict(), "pipeline": config_hash(cfg.data, cfg.pretrain, cfg.extract,
                                                                          cfg.cluster, cfg.gan, cfg.generate, cfg.train,
                                                                          cfg.train_init)}
    _, fs, exp_path = _storage(layout)
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
    tuner = _make_tuner(sweep, context, layout, resume, echo)
    grid = tuner.fit()
    trials_wall = time.time() - t_trials
    rows = _rows_from(grid, int(cfg.train.epochs))
    shared_s = shared_seconds(cfg.run_root, sweep.ks)
    trials_s = float(sum(r["seconds"] or 0.0 for r in rows))
    timings = {
        "wall_s": time.time() - t0, "shared_s": shared_s, "shared_wall_s_this_run": shared_wall,
        "trials_s": trials_s, "trials_wall_s_this_run": trials_wall,
        "shared_fraction": shared_s / max(shared_s + trials_s, 1e-9),
    }
    results = write_results(cfg, sweep, rows, timings, built, echo=echo)
    if sweep.retrain_best and results.best is not None:
        from .pipeline import run_pipeline

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


def sweep_config_from(values: dict) -> SweepConfig:
    """Build a :class:`SweepConfig` from a plain mapping (unknown keys and wrong types raise)."""
    return from_dict(SweepConfig, {k: v for k, v in values.items() if v is not None})


__all__ = [
    "SweepConfig", "SweepError", "SweepLayout", "SweepResults", "best_config", "carve_validation_split",
    "generated_prefix", "grid_points", "prepare_shared", "run_sweep", "sweep_config_from", "sweep_trial",
    "table_cells", "format_tables",
]
