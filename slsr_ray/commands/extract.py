"""``slsr extract`` (features for every image of a manifest) and ``slsr cluster`` (k-means, silhouette
table, identity membership)."""

from __future__ import annotations

import json

import typer

from .. import layout, storage
from ..errors import check_option
from ..raysetup import init_ray


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
    from ..data import load_dataset
    from ..errors import as_config_error
    from ..extract import ExtractConfig, extract_features, read_manifest
    from ..models import ModelConfig
    from ..validate import check_folder, check_model_checkpoint

    if (manifest is None) == (dataset is None):
        raise typer.BadParameter("give exactly one of --manifest or --dataset (with --root)")
    if (checkpoint is None) == (not random_init):
        raise typer.BadParameter("give exactly one of --checkpoint or --random-init")
    if dataset is not None and root is None:
        raise typer.BadParameter("--dataset needs --root")
    check_option(split in ("train", "query", "gallery"), "--split", "train, query or gallery", split)
    with as_config_error("extract options"):
        cfg = ExtractConfig(batch_size=batch_size, num_actors=num_actors, num_gpus=num_gpus, feature=feature,
                            height=height, width=width, decode=decode)
        model = checkpoint if checkpoint is not None else ModelConfig(backbone=backbone)
    # every input is checked on the driver before Ray starts and before the output folder is touched
    check_folder(output, "--output", must_exist=False)
    source = read_manifest(manifest) if manifest is not None else getattr(load_dataset(dataset, root), split)
    if checkpoint is not None:
        check_model_checkpoint(checkpoint, "--checkpoint")
    init_ray()  # joins the cluster under `ray job submit` / RAY_ADDRESS, else starts a local one
    out = extract_features(source, model, output, cfg)
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
    from ..staging import staged_folder
    from ..validate import MEMBERSHIP_RULES, check_folder

    try:
        k = [*k, *(int(a) for a in ctx.args)]
    except ValueError as e:
        raise typer.BadParameter(f"--k takes integers, got extra arguments {ctx.args}") from e
    check_option(all(v >= 2 for v in k), "--k", "cluster counts >= 2", k)
    check_option(rule in MEMBERSHIP_RULES, "--rule", "one of " + ", ".join(MEMBERSHIP_RULES), rule)
    check_option(0 < min_share <= 1, "--min-share", "a share in (0, 1]", min_share)
    check_option(n_init >= 1 and max_iter >= 1, "--n-init/--max-iter", "at least 1", (n_init, max_iter))
    check_option(sample_size == 0 or sample_size >= 2, "--sample-size", "0 (all points) or at least 2", sample_size)
    check_folder(output, "--output", must_exist=False)
    if not storage.exists(storage.join(features, "_SUCCESS")):
        raise ClusteringError(f"{features} is not a finished feature extraction (no _SUCCESS marker)",
                              where="--features", expected="a folder written by `slsr extract`")
    init_ray()  # joins the cluster under `ray job submit` / RAY_ADDRESS, else starts a local one
    # the result is swapped in when complete: a failure never costs an earlier clustering in OUTPUT
    with staged_folder(output, owned=_is_cluster_entry) as stage:
        summary = run_clustering(features, stage, ks=k, rule=rule, min_share=min_share, n_init=n_init,
                                 max_iter=max_iter, seed=seed, sample_size=sample_size or None)
    typer.echo(summary["table"])
    typer.echo(json.dumps({"best_k": summary["best_k"], "output": output}))


def _is_cluster_entry(name: str) -> bool:
    return name in (layout.CLUSTER_SUMMARY, layout.SILHOUETTE) or (name[:1] == "k" and name[1:].isdigit())


def register(app) -> None:
    app.command("extract")(extract)
    # `--k 2 3 4 5`: typer options take one value, so the extra values arrive as extra arguments.
    app.command("cluster", context_settings={"allow_extra_args": True})(cluster)
