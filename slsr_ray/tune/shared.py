"""The stages every trial shares, run on the driver before any trial (the pipeline's own stage functions,
per K in a sub-run ``sweep/shared/k{K}``)."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from .. import storage
from ..config import config_hash, to_dict
from ..layout import RunLayout, SweepLayout, per_k_stage
from ..pipeline import DataSection, PipelineConfig, stage_hashes
from ..stages import read_record, run_stage
from .config import SweepConfig, SweepError
from .split import carve_validation_split

log = logging.getLogger("slsr_ray.tune")


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
    # Long because the shared stages in dependency order, each a pipeline stage call with its hash.
    from .. import pipeline

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
            h_gen = config_hash("generate", h_gan, max_count, cfg.generate)  # as before the split: old sweeps resume
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
