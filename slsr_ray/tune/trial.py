"""One Ray Tune trial: train in chunks of ``report_every`` epochs, report validation rank-1/mAP after each."""

from __future__ import annotations

import dataclasses
import logging

from .. import storage
from ..pipeline import USES_GENERATED
from .config import METRIC
from .split import generated_prefix

log = logging.getLogger("slsr_ray.tune")


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

    from ..train import TrainConfig, evaluate_checkpoint, run_training

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
