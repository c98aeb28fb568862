"""``slsr gan train`` (one DCGAN actor per cluster) and ``slsr gan generate`` (images + manifest)."""

from __future__ import annotations

import json

import typer

from ..raysetup import init_ray

gan_app = typer.Typer(help="Per-cluster DCGANs (steps 4-5 of Algorithm 1).", no_args_is_help=True)


@gan_app.command("train")
def train(
    clusters: str = typer.Option(..., "--clusters", "-c", help="clustering output: a k{K} folder or its assignments.parquet"),
    output: str = typer.Option(..., "--output", "-o", help="GAN folder (local or s3://); reruns resume from it"),
    epochs: int = typer.Option(30, help="epochs per cluster (paper: 30)"),
    batch_size: int = typer.Option(64),
    image_size: int = typer.Option(128, help="square GAN resolution, a multiple of 16 (paper: 128; 64 for CPU demos)"),
    lr: float = typer.Option(2e-4, help="Adam learning rate (paper: 2e-4)"),
    beta1: float = typer.Option(0.5, help="Adam beta1 (paper: 0.5)"),
    ngf: int = typer.Option(64, help="generator width (paper: 64 -> 512/256/128/64 channels)"),
    ndf: int = typer.Option(64, help="discriminator width"),
    d_activation: str = typer.Option("relu", help="relu (paper) or leaky (DCGAN's LeakyReLU 0.2)"),
    num_gpus: float = typer.Option(None, help="GPUs per actor (default: 1 when the Ray cluster has GPUs)"),
    max_restarts: int = typer.Option(3, help="Ray restarts per actor; training resumes from the checkpoint"),
    seed: int = typer.Option(0),
    min_images: str = typer.Option("train", help="cluster smaller than a batch: train or error"),
    on_unreadable: str = typer.Option("skip", help="unreadable images: skip or error"),
) -> None:
    """Train one DCGAN per cluster, all at once as Ray actors; prints per-cluster results as JSON."""
    from ..errors import as_config_error
    from ..gan import GanConfig, load_assignments, train_gans
    from ..validate import check_folder

    with as_config_error("gan options"):
        cfg = GanConfig(
            image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, beta1=beta1, ngf=ngf, ndf=ndf,
            d_activation=d_activation, num_gpus=num_gpus, max_restarts=max_restarts, seed=seed,
            min_images=min_images, on_unreadable=on_unreadable,
        )
    # OUTPUT holds resumable checkpoints (updated in place, each file atomically): check the inputs first
    check_folder(output, "--output", must_exist=False)
    load_assignments(clusters)
    init_ray()  # joins the cluster under `ray job submit` / RAY_ADDRESS, else starts a local one
    results = train_gans(clusters, output, cfg)
    keep = ("epochs", "num_images", "unreadable", "loss_d", "loss_g", "wall_s", "checkpoint")
    typer.echo(json.dumps({c: {k: r[k] for k in keep} for c, r in results.items()}, indent=2))


@gan_app.command("generate")
def generate(
    gan_dir: str = typer.Option(..., "--gan-dir", "-g", help="folder written by `slsr gan train`"),
    count: int = typer.Option(12000, help="total images over all clusters (paper best: 12000)"),
    output: str = typer.Option(..., "--output", "-o", help="folder for images/ and manifest.parquet"),
    split: str = typer.Option("proportional", help="proportional (to cluster size) or equal"),
    seed: int = typer.Option(0),
    height: int = typer.Option(128, help="height of the written images (re-id shape)"),
    width: int = typer.Option(64, help="width of the written images"),
    batch_size: int = typer.Option(64),
) -> None:
    """Generate COUNT images from the per-cluster GANs; resumable; prints the manifest URI."""
    from .. import storage
    from ..errors import as_config_error, check_option
    from ..generate import SPLITS, find_checkpoints, generate_images
    from ..validate import check_folder

    check_option(count > 0, "--count", "a positive number of images", count)
    check_option(split in SPLITS, "--split", " or ".join(SPLITS), split)
    check_option(height >= 1 and width >= 1 and batch_size >= 1, "--height/--width/--batch-size",
                 "positive numbers", (height, width, batch_size))
    # OUTPUT is resumable (images already there are kept): check the inputs before touching it
    check_folder(output, "--output", must_exist=False)
    storage.require_folder(gan_dir, "--gan-dir", "a folder written by `slsr gan train`")
    find_checkpoints(storage.absolute(gan_dir))  # GanCheckpointError when there are none
    init_ray()  # joins the cluster under `ray job submit` / RAY_ADDRESS, else starts a local one
    with as_config_error("gan generate options"):
        manifest = generate_images(
            gan_dir, output, count, split=split, seed=seed, image_size=(height, width), batch_size=batch_size
        )
    typer.echo(manifest)


def register(app: typer.Typer) -> None:
    app.add_typer(gan_app, name="gan")
