"""``slsr extract`` (features for every image of a manifest) and ``slsr cluster`` (k-means, silhouette
table, identity membership)."""

from __future__ import annotations

import json

import typer


def _init_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()  # joins the cluster under `ray job submit` / RAY_ADDRESS, else starts a local one


def extract(
    output: str = typer.Option(..., "--output", "-o", help="output folder (local or s3://) for the parquet shards"),
    manifest: str = typer.Option(None, "--manifest", "-m", help="manifest parquet (local or s3://)"),
    dataset: str = typer.Option(None, "--dataset", "-d", help="dataset name instead of --manifest (with --root)"),
    root: str = typer.Option(None, "--root", "-r", help="dataset root folder (with --dataset)"),
    split: str = typer.Option("train", help="split of --dataset: train, query or gallery"),
    checkpoint: str = typer.Option(None, "--checkpoint", "-c", help="model checkpoint (local or s3://)"),
    random_init: bool = typer.Option(False, help="no checkpoint: use a randomly initialised model (demos only)"),
    backbone: str = typer.Option("resnet50", help="backbone for --random-init"),
    feature: str = typer.Option("pool", help="pool (2048-d, what the paper clusters) or bottleneck"),
    batch_size: int = typer.Option(64),
    num_actors: int = typer.Option(None, help="model actors (default: one per GPU, or per CPU without GPUs)"),
    num_gpus: float = typer.Option(None, help="GPUs per actor (default: 1 if the cluster has GPUs, else 0)"),
    height: int = typer.Option(256),
    width: int = typer.Option(128),
    decode: str = typer.Option("auto", help="where images are decoded: auto, tasks or actor"),
) -> None:
    """Extract one feature per image with Ray Data and a pool of model actors."""
    from ..data import DatasetError, load_dataset
    from ..extract import ExtractConfig, ExtractError, extract_features
    from ..models import ModelConfig
    from ..storage import StorageError

    if (manifest is None) == (dataset is None):
        raise typer.BadParameter("give exactly one of --manifest or --dataset (with --root)")
    if (checkpoint is None) == (not random_init):
        raise typer.BadParameter("give exactly one of --checkpoint or --random-init")
    try:
        cfg = ExtractConfig(batch_size=batch_size, num_actors=num_actors, num_gpus=num_gpus, feature=feature,
                            height=height, width=width, decode=decode)
        source = manifest
        if dataset is not None:
            if root is None:
                raise typer.BadParameter("--dataset needs --root")
            ds = load_dataset(dataset, root)
            if split not in ("train", "query", "gallery"):
                raise typer.BadParameter(f"--split must be train, query or gallery, got {split!r}")
            source = getattr(ds, split)
        model = checkpoint if checkpoint is not None else ModelConfig(backbone=backbone)
        _init_ray()
        out = extract_features(source, model, output, cfg)
    except (ExtractError, DatasetError, StorageError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"features written to {out}")


def cluster(
    ctx: typer.Context,
    features: str = typer.Option(..., "--features", "-f", help="feature folder written by `slsr extract`"),
    output: str = typer.Option(..., "--output", "-o", help="output folder (local or s3://)"),
    k: list[int] = typer.Option([2, 3, 4, 5], "--k", help="numbers of clusters to try: --k 2 3 4 5"),
    rule: str = typer.Option("majority", help="identity membership: majority (the paper: each identity in the cluster holding most of its images), any (an image in the cluster) or min_share"),
    min_share: float = typer.Option(0.2, help="share of an identity's images for rule=min_share"),
    n_init: int = typer.Option(3, help="k-means restarts (the best inertia is kept)"),
    max_iter: int = typer.Option(100),
    seed: int = typer.Option(0),
    sample_size: int = typer.Option(10_000, help="silhouette sample size (0: all points)"),
) -> None:
    """k-means for each K, the silhouette table (paper's Table 2) and the S_c membership artifact."""
    from ..cluster import ClusteringError, run_clustering
    from ..storage import StorageError

    try:
        k = [*k, *(int(a) for a in ctx.args)]
    except ValueError as e:
        raise typer.BadParameter(f"--k takes integers, got extra arguments {ctx.args}") from e
    try:
        _init_ray()
        summary = run_clustering(features, output, ks=k, rule=rule, min_share=min_share, n_init=n_init,
                                 max_iter=max_iter, seed=seed, sample_size=sample_size or None)
    except (ClusteringError, StorageError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(summary["table"])
    typer.echo(json.dumps({"best_k": summary["best_k"], "output": output}))


def register(app) -> None:
    app.command("extract")(extract)
    # `--k 2 3 4 5`: typer options take one value, so the extra values arrive as extra arguments.
    app.command("cluster", context_settings={"allow_extra_args": True})(cluster)
