"""The end-to-end SLSR pipeline (Algorithm 1), stage by stage, through artifacts under one run root.

    prepare -> pretrain -> extract -> cluster -> gan -> generate -> train -> evaluate

Each stage reads its inputs from the run root (local folder or ``s3://``), writes its outputs under
``<run_root>/<stage>/`` and finally a ``_STAGE.json`` marker with the hash of every config it depends
on (see :mod:`slsr_ray.stages`). Rerunning skips stages whose marker hash matches; ``from_stage``
forces a stage and everything after it; an interrupted run resumes at the first unfinished stage.
The ``train`` and ``evaluate`` stages run once per label strategy (SLSR and the baselines) with one
marker each, so adding a baseline later trains only that baseline.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile

import pyarrow as pa

from . import storage
from .config import ConfigError, config_hash, from_dict, to_dict
from .layout import RunLayout, split_file
from .pipeline_config import (  # noqa: F401  (re-exported: the pipeline's public names)
    GENERATED_STRATEGIES,
    INPUT_PIPELINES,
    PRESETS,
    USES_GENERATED,
    ClusterSection,
    DataSection,
    EvaluateSection,
    GenerateSection,
    PipelineConfig,
    SyntheticSpec,
    load_config,
)
from .stages import STAGES, read_record, record_state, run_stage, status_table
from .train import TrainConfig
from .validate import validate_config

log = logging.getLogger("slsr_ray.pipeline")

# Training settings that only matter to strategies with generated images (lambda weighs their soft
# labels, the others pick and route them); epsilon is LSR's smoothing. A strategy's hash leaves out
# what it does not use, so changing lambda does not retrain the real-only baseline.
GENERATED_ONLY = ("lam", "generated_ratio", "noise_layer_on")


def _train_settings(train: TrainConfig, strategy: str) -> dict:
    unused = set(GENERATED_ONLY) if strategy not in USES_GENERATED else set()
    if strategy != "lsr":
        unused.add("epsilon")
    return {k: v for k, v in to_dict(train).items() if k not in unused and k != "strategy"}


def stage_hashes(cfg: PipelineConfig) -> dict[str, str]:
    """The config hash each stage's marker must hold; each chains its upstream hashes."""
    h: dict[str, str] = {}
    h["prepare"] = config_hash("prepare", cfg.data)
    h["pretrain"] = config_hash("pretrain", h["prepare"], cfg.pretrain)
    h["extract"] = config_hash("extract", h["pretrain"], cfg.extract)
    h["cluster"] = config_hash("cluster", h["extract"], cfg.cluster)
    h["gan"] = config_hash("gan", h["cluster"], cfg.gan)
    h["generate"] = config_hash("generate", h["gan"], cfg.generate)
    for s in cfg.strategies:
        deps = [h["prepare"], _train_settings(cfg.train, s), s, cfg.train_init]
        if s in USES_GENERATED:
            deps.append(h["generate"])
        if cfg.train_init == "pretrain":
            deps.append(h["pretrain"])
        h[f"train/{s}"] = config_hash("train", *deps)
        h[f"evaluate/{s}"] = config_hash("evaluate", h[f"train/{s}"], cfg.evaluate, cfg.extract)
    return h


# ------------------------------------------------------------------------------------------ stages


def _layout(cfg: PipelineConfig) -> RunLayout:
    return RunLayout(cfg.run_root)


def stage_prepare(cfg: PipelineConfig) -> dict:
    """Write ``prepare/{train,query,gallery}.parquet`` for split ``data.split_id`` of ``data.protocol``
    (plus ``multi_query.parquet``, the gt_bbox images, for Market multi-query), building the synthetic
    dataset if asked."""
    from .data import check_unique_paths, load_dataset, make_synthetic, to_manifest
    from .data.manifests import upload_dataset
    from .data.protocols import get_protocol, load_protocol

    d = cfg.data
    protocol = get_protocol(d.dataset, d.protocol)
    splits = ("train", "query", "gallery") + (("multi_query",) if protocol.name == "multi_query" else ())
    out = {}
    if d.manifests:
        folder = d.manifests.replace("{split_id}", str(d.split_id))
        for s in splits:
            if not storage.exists(split_file(folder, s)):
                raise ConfigError(f"data.manifests: {split_file(folder, s)} does not exist; protocol "
                                  f"{protocol.name} needs {', '.join(splits)} (slsr data manifest --protocol ...)")
        tables = {s: storage.read_table(split_file(folder, s)) for s in splits}
    else:
        root = d.root
        if d.dataset == "synthetic":
            spec = d.synthetic
            s3_run = storage.is_s3(cfg.run_root)
            if root is None:
                root = tempfile.mkdtemp(prefix="slsr-synth-") if s3_run else _layout(cfg).data
            if not os.path.isdir(os.path.join(root, "bounding_box_train")):
                make_synthetic(
                    root, num_ids=spec.num_ids, cams=spec.cams, images_per_id=spec.images_per_id, seed=spec.seed,
                    size=(spec.height, spec.width), num_distractors=spec.num_distractors, num_junk=spec.num_junk,
                )
            ds = load_dataset("market1501", root, multi_query=protocol.name == "multi_query")
            if s3_run:  # every node must read the images: put them next to the run's artifacts
                ds = upload_dataset(ds, _layout(cfg).data)
        else:
            if root is None:
                raise ConfigError(f"data.root is required for dataset {d.dataset!r} (or give data.manifests)")
            ds = load_protocol(d.dataset, root, protocol.name, split_id=d.split_id, split_seed=d.split_seed,
                               cuhk03_labeled=d.cuhk03_labeled)
        tables = {s: getattr(ds, s) for s in splits}
    for split, table in tables.items():
        table = to_manifest(table)
        local = [p for p in table["path"].to_pylist() if not storage.is_s3(p)] if job_nodes() > 1 else []
        if local:  # e.g. manifests written without --upload-images
            raise ConfigError(f"{len(local)} {split} images of {d.manifests or d.root} are on the driver's disk "
                              f"(e.g. {local[0]}) but this job runs on several nodes: upload them with "
                              "slsr data manifest --upload-images s3://...")
        check_unique_paths(table, f"{split} manifest of dataset {d.manifests or d.root or d.dataset}")
        if d.check_images:
            from .data import check_images, relabel

            table, bad = check_images(table, on_error=d.on_bad_image)
            if bad and split == "train":
                table, _ = relabel(table)  # a dropped identity must not leave a hole in 0..N-1
        uri = _layout(cfg).split(split)
        storage.write_table(uri, table)
        out[split] = uri
    return out


def stage_pretrain(cfg: PipelineConfig) -> dict:
    """Step 1: cross-entropy training on the real identities."""
    from .train import run_training

    pre = dataclasses.replace(cfg.pretrain, strategy="none")
    result = run_training(pre, _layout(cfg).split("train"), _layout(cfg).stage("pretrain"))
    return {"checkpoint": result.checkpoint, "final": result.metrics[-1] if result.metrics else {}, "wall_s": result.wall_s}


def stage_extract(cfg: PipelineConfig) -> dict:
    """Step 2: pooled features of every training image with the pretrained model (Ray Data)."""
    from .extract import extract_features

    ckpt = read_record(cfg.run_root, "pretrain").outputs["checkpoint"]
    out = extract_features(_layout(cfg).split("train"), ckpt, _layout(cfg).features, cfg.extract)
    return {"features": out}


def stage_cluster(cfg: PipelineConfig) -> dict:
    """Step 3: k-means for each K, silhouette table, the chosen K's membership S_c."""
    from .cluster import run_clustering

    c = cfg.cluster
    ks = sorted(set(c.ks) | ({c.k} if c.k is not None else set()))
    summary = run_clustering(
        _layout(cfg).features, _layout(cfg).stage("cluster"), ks=ks, rule=c.rule,
        min_share=c.min_share, n_init=c.n_init, max_iter=c.max_iter, seed=c.seed, sample_size=c.silhouette_sample,
    )
    k = c.k if c.k is not None else summary["best_k"]
    return {
        "k": k,
        "silhouette": summary["silhouette"],
        "assignments": _layout(cfg).assignments(k),
        "membership": _layout(cfg).membership(k),
    }


def stage_gan(cfg: PipelineConfig, assignments: str | None = None) -> dict:
    """Step 4: one DCGAN Ray actor per cluster (of the cluster stage's chosen K, or of ``assignments``:
    the sweep trains one set of GANs per K)."""
    from .gan import train_gans

    assignments = assignments or read_record(cfg.run_root, "cluster").outputs["assignments"]
    result = train_gans(assignments, _layout(cfg).gan, cfg.gan)
    return {"gan_dir": _layout(cfg).gan, "clusters": result}


def stage_generate(cfg: PipelineConfig) -> dict:
    """Step 5: generated images with their cluster id (their labels come from the strategy); ``sizes``:
    the real images each cluster's GAN learnt from (the count per cluster follows them)."""
    from .gan import load_checkpoint
    from .generate import find_checkpoints, generate_images

    g = cfg.generate
    gan_dir = _layout(cfg).gan
    manifest = generate_images(gan_dir, _layout(cfg).generate, g.count,
                               split=g.split, seed=g.seed, image_size=(g.height, g.width))
    sizes = {str(c): int(load_checkpoint(u)["num_images"]) for c, u in find_checkpoints(gan_dir).items()}
    return {"manifest": manifest, "count": g.count, "sizes": sizes, "split": g.split}


def stage_train(cfg: PipelineConfig, strategy: str) -> dict:
    """Step 6: ResNet + bottleneck + extra linear layer on real (+ generated) images."""
    from .train import run_training

    tcfg = dataclasses.replace(cfg.train, strategy=strategy)
    generated = membership = None
    if strategy in USES_GENERATED:
        generated = read_record(cfg.run_root, "generate").outputs["manifest"]
        membership = read_record(cfg.run_root, "cluster").outputs["membership"]
    init = read_record(cfg.run_root, "pretrain").outputs["checkpoint"] if cfg.train_init == "pretrain" else None
    result = run_training(
        tcfg, _layout(cfg).split("train"), _layout(cfg).train(strategy),
        generated_manifest=generated, membership=membership, init_checkpoint=init,
    )
    return {"checkpoint": result.checkpoint, "final": result.metrics[-1] if result.metrics else {}, "wall_s": result.wall_s}


def stage_evaluate(cfg: PipelineConfig, strategy: str) -> dict:
    """Query/gallery (and gt_bbox) features with Ray Data, then the metrics of ``data.protocol`` on this
    split with and without re-ranking; each JSON names the protocol, the split and ``num_trials`` 1."""
    import numpy as np

    from .data.protocols import get_protocol
    from .evaluate import evaluate_split
    from .extract import extract_features, load_features

    protocol = get_protocol(cfg.data.dataset, cfg.data.protocol)
    ckpt = read_record(cfg.run_root, f"train/{strategy}").outputs["checkpoint"]
    splits = ("query", "gallery") + (("multi_query",) if protocol.evaluation == "multi_query" else ())
    tables = []
    for split in splits:
        t = storage.read_table(_layout(cfg).split(split))
        tables.append(t.append_column("split", pa.array([split] * t.num_rows, pa.string())))
    feat_dir = extract_features(pa.concat_tables(tables), ckpt, _layout(cfg).evaluation_features(strategy),
                                cfg.extract)
    table, feats = load_features(feat_dir)
    split = np.asarray(table["split"].to_pylist())
    pids, cams = table["pid"].to_numpy(), table["camid"].to_numpy()
    q, g, m = (split == "query"), (split == "gallery"), (split == "multi_query")
    ev = cfg.evaluate
    results = evaluate_split(
        protocol.evaluation, feats[q], feats[g], pids[q], pids[g], cams[q], cams[g], metric=ev.metric,
        max_rank=ev.max_rank, multi_query=(feats[m], pids[m], cams[m]) if m.any() else None,
        rerank={"k1": ev.k1, "k2": ev.k2, "lambda_value": ev.lambda_value} if ev.rerank else None,
        seed=cfg.data.split_id,
    )
    about = {"protocol": protocol.name, "dataset": cfg.data.dataset, "split_id": cfg.data.split_id, "num_trials": 1}
    out = {}
    for kind, res in results.items():
        out[kind] = {**_metrics_dict(res), **about}
        storage.write_json(_layout(cfg).metrics(strategy, kind), out[kind])
    return out


def _metrics_dict(res: dict) -> dict:
    cmc = [float(x) for x in res["cmc"]]
    return {
        "rank1": cmc[0], "rank5": cmc[min(4, len(cmc) - 1)], "rank10": cmc[min(9, len(cmc) - 1)],
        "rank20": cmc[min(19, len(cmc) - 1)], "mAP": float(res["mAP"]), "mINP": float(res["mINP"]),
        "num_valid_queries": int(res["num_valid_queries"]), "cmc": cmc,
    }


# ------------------------------------------------------------------------------------------ driver


def plan(cfg: PipelineConfig, until: str | None = None) -> list[tuple[str, callable]]:
    """(stage key, function) in order, the stages this config needs; train/evaluate once per strategy;
    ``until``: only the stages up to and including that one.

    The step-1 model embeds the images that are clustered, and the clusters only feed the GANs: a run
    of real-image strategies alone (``none``, ``lsr``) needs none of it, and needs the step-1 model
    only to start its training from (``train_init: pretrain``)."""
    generated = any(s in USES_GENERATED for s in cfg.strategies)
    steps: list[tuple[str, callable]] = [("prepare", stage_prepare)]
    if generated or cfg.train_init == "pretrain":
        steps.append(("pretrain", stage_pretrain))
    if generated:
        steps += [("extract", stage_extract), ("cluster", stage_cluster), ("gan", stage_gan),
                  ("generate", stage_generate)]
    for s in cfg.strategies:
        steps.append((f"train/{s}", lambda c, s=s: stage_train(c, s)))
    for s in cfg.strategies:
        steps.append((f"evaluate/{s}", lambda c, s=s: stage_evaluate(c, s)))
    if until is not None:
        steps = [step for step in steps if STAGES.index(_stage_family(step[0])) <= STAGES.index(until)]
    return steps


def _stage_family(key: str) -> str:
    return key.split("/", 1)[0]


def is_forced(key: str, from_stage: str | None) -> bool:
    """Whether ``--from from_stage`` reruns the stage ``key`` (that stage and every later one, also when
    this config does not run ``from_stage`` itself)."""
    return from_stage is not None and STAGES.index(_stage_family(key)) >= STAGES.index(from_stage)


def run_pipeline(cfg: PipelineConfig, from_stage: str | None = None, until: str | None = None,
                 echo=print, report: bool = True) -> dict:
    """Run (or resume) the pipeline; returns the run summary (also written under ``report/``).
    ``report=False`` skips the report and returns the stage timings (``slsr experiment`` runs many
    small pipelines and writes one report of its own)."""
    # Everything is checked before anything under the run root changes (config.json, markers).
    validate_config(cfg, check_inputs=True, from_stage=from_stage, until=until)
    check_run_root(cfg.run_root, _node_local_inputs(cfg))
    storage.write_json(_layout(cfg).config, to_dict(cfg))
    hashes = stage_hashes(cfg)
    timings: dict[str, float] = {}
    for key, fn in plan(cfg, until):
        rec, _ = run_stage(cfg.run_root, key, hashes[key], lambda fn=fn: fn(cfg), force=is_forced(key, from_stage),
                           echo=echo)
        timings[key] = rec.seconds
    if not report:
        return {"timings": timings}
    from .report import write_report

    return write_report(cfg, echo=echo)


def job_nodes() -> int:
    """How many alive nodes this process's Ray job runs on (0 outside a Ray job or without Ray)."""
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return 0
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")]) if ray.is_initialized() else 0


def check_run_root(run_root: str, inputs: dict[str, str | None] | None = None) -> None:
    """The run root must be writable; on a multi-node job it and every input path (``inputs``:
    ``{config key: path}``) must be shared storage, not the driver's disk."""
    nodes = job_nodes()
    if nodes > 1:
        if not storage.is_s3(run_root):
            raise ConfigError(
                f"run root {run_root!r} is a local path but this job runs on a {nodes}-node cluster: "
                "other nodes cannot read it; use an s3:// run root"
            )
        local = {k: v for k, v in (inputs or {}).items() if v and not storage.is_s3(v)}
        if local:
            key, path = next(iter(local.items()))
            raise ConfigError(
                f"{key} {path!r} is on the driver's disk but this job runs on a {nodes}-node cluster: other "
                "nodes cannot read it; put it on S3 (a dataset: slsr data manifest --upload-images s3://...)"
            )
    storage.check_writable(run_root)


def _node_local_inputs(cfg: PipelineConfig) -> dict[str, str | None]:
    """Input paths the Ray workers read: a dataset root whose images are used in place (the manifests
    are read by the driver; the image paths in them are checked by the prepare stage), the weights."""
    d = cfg.data
    in_place = d.dataset != "synthetic" and not d.manifests
    return {"data.root": d.root if in_place else None, "pretrain.model.pretrained": cfg.pretrain.model.pretrained,
            "train.model.pretrained": cfg.train.model.pretrained}


def pipeline_status(run_root: str) -> list[dict]:
    """Stage states for ``slsr status`` (reads the run's saved config to spot stale stages)."""
    storage.require_folder(run_root, "run root", "the run root of a pipeline run")
    expected = None
    rows_extra = []
    if storage.exists(RunLayout(run_root).config):
        expected = stage_hashes(read_run_config(run_root))
        rows_extra = [k for k in expected if "/" in k]
    rows = [r for r in status_table(run_root, expected) if r["stage"] not in ("train", "evaluate")]
    for key in rows_extra:
        state, rec = record_state(run_root, key, expected[key])
        rows.append({"stage": key, "state": state, "seconds": rec.seconds if rec else None,
                     "finished": rec.finished if rec else None})
    return rows


def read_run_config(run_root: str) -> PipelineConfig:
    """The config a run saved (``config.json``); errors name the file."""
    uri = RunLayout(run_root).config
    try:
        cfg = from_dict(PipelineConfig, storage.read_json(uri))
    except ConfigError as e:
        raise ConfigError(f"{uri} is not a valid run config ({e})",
                          expected="the config.json `slsr run` wrote (from this version of slsr-ray)") from e
    cfg.run_root = run_root
    return cfg
