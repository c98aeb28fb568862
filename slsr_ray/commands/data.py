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
    from ..data.synthetic import MIN_SIDE
    from ..errors import check_option

    # flags named as the user typed them, before anything is written
    check_option(num_ids >= 2, "--num-ids", "at least 2 identities (train and test need one each)", num_ids)
    check_option(2 <= cams <= 9, "--cams", "2..9 cameras (Market file names hold one camera digit)", cams)
    check_option(images_per_id >= 2, "--images-per-id", "at least 2 (a query needs a gallery match)", images_per_id)
    check_option(seed >= 0, "--seed", "a seed >= 0", seed)
    check_option(height >= MIN_SIDE, "--height", f"at least {MIN_SIDE} pixels", height)
    check_option(width >= MIN_SIDE, "--width", f"at least {MIN_SIDE} pixels", width)
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
    from ..data import load_dataset

    typer.echo(load_dataset(dataset, root).summary())


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
    from ..data.manifests import upload_dataset, write_manifests
    from ..data.protocols import load_protocol
    from ..validate import check_folder

    check_folder(output, "--output", must_exist=False)
    if upload_images:
        check_folder(upload_images, "--upload-images", must_exist=False)
    ds = load_protocol(dataset, root, protocol, split_id=split_id, split_seed=split_seed,
                       cuhk03_labeled=cuhk03_labeled)
    if upload_images:
        ds = upload_dataset(ds, upload_images)
    uris = write_manifests(ds, output)
    typer.echo(ds.summary())
    for split, uri in uris.items():
        typer.echo(f"{split}: {uri}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
