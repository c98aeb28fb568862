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
trains in one go and reports once (ASHA then acts only at the en
Modules: :mod:`.config`, :mod:`.split` (validation split, generated prefixes), :mod:`.shared` (the shared
stages), :mod:`.trial` (one trial), :mod:`.search` (the Tuner), :mod:`.results`, :mod:`.driver`
(:func:`run_sweep`).
"""

from ..layout import SweepLayout
from .config import (
    EXPERIMENT_NAME,
    METRIC,
    SEARCHES,
    SweepConfig,
    SweepError,
    SweepResults,
    sweep_config_from,
)
from .driver import run_sweep
from .results import best_config, format_tables, table_cells
from .search import grid_points
from .shared import prepare_shared, shared_seconds
from .split import carve_validation_split, generated_prefix, image_index
from .trial import sweep_trial

__all__ = [
    "EXPERIMENT_NAME", "METRIC", "SEARCHES", "SweepConfig", "SweepError", "SweepLayout", "SweepResults",
    "best_config", "carve_validation_split", "format_tables", "generated_prefix", "grid_points", "image_index",
    "prepare_shared", "run_sweep", "shared_seconds", "sweep_config_from", "sweep_trial", "table_cells",
]
