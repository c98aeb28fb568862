"""The pictures of a run, drawn from its artifacts: one function per figure, shared by the run report
(:mod:`slsr_ray.report`) and the notebooks.

Every function takes the run root (a local folder or ``s3://`` URI) and returns a :class:`Figure`: the
PNG bytes plus ``data``, the exact values that were plotted (so tests and users can check a picture
against the run's JSON). In Jupyter a :class:`Figure` displays itself. A figure whose inputs are not in
the run (no GAN stage in a ``none``-only run, an unfinished stage) raises :class:`FigureInputMissing`;
:func:`all_figures` skips those.

=====================  ===========================================================================
function               reads
=====================  ===========================================================================
dataset_samples        prepare/{split}.parquet and the images
feature_pca            extract/features, cluster/k{K}/{assignments.parquet,centroids.npy}
silhouette_vs_k        cluster/silhouette.json
gan_vs_real            cluster/k{K}/assignments.parquet, generate/manifest.parquet (or gan/c{c}/samples.png)
label_distributions    prepare/train.parquet, cluster/k{K}/membership.json, generate/manifest.parquet
training_curves        pretrain/metrics.json, train/<strategy>/metrics.json ("history")
cmc_curves             evaluate/<strategy>/{plain,rerank}.json
ranked_gallery         evaluate/<strategy>/features (query + gallery features with a ``split`` column)
=====================  ===========================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .base import Figure, FigureInputMissing, chosen_k, run_config, run_strategies
from .method import dataset_samples, feature_pca, gan_vs_real, label_distributions, silhouette_vs_k
from .results import cmc_curves, ranked_gallery, training_curves, training_histories

log = logging.getLogger("slsr_ray.figures")

FIGURES: dict[str, Callable[..., Figure]] = {
    "dataset_samples": dataset_samples,
    "feature_pca": feature_pca,
    "silhouette": silhouette_vs_k,
    "gan_vs_real": gan_vs_real,
    "label_distributions": label_distributions,
    "training": training_curves,
    "cmc": cmc_curves,
    "ranked_gallery": ranked_gallery,
}


def all_figures(run_root: str, options: dict[str, dict] | None = None) -> list[Figure]:
    """Every figure the run's artifacts allow, in the order of the method; ``options`` passes keyword
    arguments per figure name (e.g. ``{"ranked_gallery": {"strategy": "none"}}``). Figures whose inputs
    are missing are skipped (logged), other errors propagate."""
    options = options or {}
    out = []
    for name, fn in FIGURES.items():
        try:
            out.append(fn(run_root, **options.get(name, {})))
        except FigureInputMissing as e:
            log.info("skipping figure %s: %s", name, e)
    return out


__all__ = [
    "FIGURES", "Figure", "FigureInputMissing", "all_figures", "chosen_k", "cmc_curves", "dataset_samples",
    "feature_pca", "gan_vs_real", "label_distributions", "ranked_gallery", "run_config", "run_strategies",
    "silhouette_vs_k", "training_curves", "training_histories",
]
