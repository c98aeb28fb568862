"""``slsr data synth`` and ``slsr data summary``."""

from __future__ import annotations

import json

import typer

data_app = typer.Typer(help="Datasets: build the synthetic set, summarise any supported dataset.", no_args_is_help=True)


@data_app.command("synth")
def synth(
    root: str = typer.Argument(..., help="folder to write the dataset to (Market-1501 layout)"),
    num_ids: int = typer.Option(100, help="identities (half train, half test)"),
    cams: int = typer.Option(6, help="cameras (2..9)"),
    images_per_id: int = typer.Option(12, help="images per identity"),
    seed: int = typer.Option(0),
    height: int = typer.Option(128),
    width: int = typer.Option(64),
    overwrite: bool = typer.Option(False, help="replace an existing dataset at ROOT"),
) -> None:
    """Write a synthetic re-id dataset in the Market-1501 layout."""
    from ..data import make_synthetic

    summary = make_synthetic(
        root, num_ids=num_ids, cams=cams, images_per_id=images_per_id, seed=seed,
        size=(height, width), overwrite=overwrite,
    )
    typer.echo(json.dumps(summary, indent=2))


@data_app.command("summary")
def summary(
    dataset: str = typer.Option(..., "--dataset", "-d", help="market1501, dukemtmcreid, msmt17, cuhk03, viper, folder, synthetic"),
    root: str = typer.Option(..., "--root", "-r", help="dataset root folder"),
) -> None:
    """Identities, images and cameras per split, as a table."""
    from ..data import DatasetError, load_dataset

    try:
        ds = load_dataset(dataset, root)
    except DatasetError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(ds.summary())


@data_app.command("manifest")
def manifest(
    dataset: str = typer.Option(..., "--dataset", "-d", help="dataset name (see `slsr data summary`)"),
    root: str = typer.Option(..., "--root", "-r", help="local dataset root folder"),
    output: str = typer.Option(..., "--output", "-o", help="folder or s3:// URI for train/query/gallery.parquet"),
    upload_images: str = typer.Option(None, "--upload-images", help="copy the images here (e.g. s3://...) first"),
    split_id: int = typer.Option(0, help="protocol split for viper / cuhk03"),
    protocol: str = typer.Option(None, help="the run's data.protocol (default: the dataset's first); "
                                 "multi_query also writes multi_query.parquet (gt_bbox)"),
    split_seed: int = typer.Option(0, help="seed of the VIPeR halves (data.split_seed)"),
    cuhk03_labeled: bool = typer.Option(False, "--cuhk03-labeled", help="CUHK03 labeled boxes (default detected)"),
) -> None:
    """Write a dataset's manifests (optionally uploading its images) for `data.manifests=` runs."""
    from .. import storage
    from ..data import DatasetError
    from ..data.manifests import upload_dataset, write_manifests
    from ..data.protocols import load_protocol

    try:
        ds = load_protocol(dataset, root, protocol, split_id=split_id, split_seed=split_seed,
                           cuhk03_labeled=cuhk03_labeled)
        if upload_images:
            ds = upload_dataset(ds, upload_images)
        uris = write_manifests(ds, output)
    except (DatasetError, storage.StorageError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(ds.summary())
    for split, uri in uris.items():
        typer.echo(f"{split}: {uri}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
