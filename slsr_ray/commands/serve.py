"""Using a trained model: ``slsr export`` (ONNX / TorchScript + model card), ``slsr embed`` (a folder or
manifest of images -> one feature parquet, with Ray Data) and ``slsr search`` (top-k gallery images of
a query, faiss, optional re-ranking, a table, JSON and PNG strips).

Bad input raises the project's errors (:class:`slsr_ray.errors.SlsrError` subclasses naming the file);
the ``slsr`` group turns them into one ``error: ...`` line and exit status 2."""

from __future__ import annotations

import json

import typer

MODEL_HELP = "a run root (its train.strategy model), a training folder or a model.pt (local or s3://)"
STRATEGY_HELP = "with a run root: the model of this strategy (default: the run's train.strategy)"


def export(
    model: str = typer.Argument(..., help=MODEL_HELP),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript"),
    output: str = typer.Option(..., "--output", "-o", help="the exported file (local or s3://); the model card "
                               "goes beside it as <output>.card.json"),
    feature: str = typer.Option("pool", help="pool (the pooled backbone feature) or bottleneck"),
    strategy: str = typer.Option(None, help=STRATEGY_HELP),
) -> None:
    """Export the retrieval feature path (no classifier, no noise layer) with a dynamic batch size."""
    from ..export import export_model

    out, card = export_model(model, fmt, output, feature=feature, strategy=strategy)
    typer.echo(f"exported to {out}\nmodel card {card}")


def embed(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    images: str = typer.Option(..., "--images", "-i", help="an image folder (recursive), one image, or a manifest "
                               ".parquet with a path column (local or s3://)"),
    output: str = typer.Option(..., "--output", "-o", help="the feature parquet to write (local or s3://)"),
    feature: str = typer.Option("pool", help="pool or bottleneck"),
    strategy: str = typer.Option(None, help=STRATEGY_HELP),
    batch_size: int = typer.Option(64),
    num_actors: int = typer.Option(None, help="model actors (default: one per GPU, or per CPU without GPUs)"),
    address: str = typer.Option(None, "--address", help="Ray address (default: start a local Ray or use RAY_ADDRESS)"),
) -> None:
    """One feature per image with Ray Data (the extract stage's code), gathered into one parquet."""
    from ..embed import embed_images

    out = embed_images(model, images, output, feature=feature, batch_size=batch_size, num_actors=num_actors,
                       strategy=strategy, address=address)
    typer.echo(f"features written to {out}")


def search(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    gallery: str = typer.Option(..., "--gallery", "-g", help="a feature parquet written by slsr embed"),
    query: str = typer.Option(..., "--query", "-q", help="a query image, an image folder, or a manifest .parquet"),
    top: int = typer.Option(10, "--top", "-k", help="hits per query"),
    rerank: bool = typer.Option(False, "--rerank", help="k-reciprocal re-ranking"),
    k1: int = typer.Option(20, help="re-ranking k1"),
    k2: int = typer.Option(6, help="re-ranking k2"),
    lambda_value: float = typer.Option(0.3, "--lambda", help="re-ranking lambda"),
    metric: str = typer.Option("euclidean", help="euclidean (faiss L2) or cosine (faiss inner product)"),
    skip_same_camera: bool = typer.Option(False, "--skip-same-camera", help="leave out gallery images of the "
                                          "query's identity from the query's camera (the evaluation's rule; needs "
                                          "a query manifest with pid/camid)"),
    output: str = typer.Option("search_results", "--output", "-o", help="folder for results.json and the PNG strips"),
    strategy: str = typer.Option(None, help=STRATEGY_HELP),
    nprobe: int = typer.Option(None, help="IVF lists searched per query (galleries over 100k images)"),
) -> None:
    """Nearest gallery images of each query: a table, results.json and one PNG strip per query."""
    from ..export import load_reference
    from ..search import SearchSettings, format_hits, load_gallery, read_queries, search, write_results

    settings = SearchSettings(top=top, metric=metric, rerank=rerank, k1=k1, k2=k2, lambda_value=lambda_value,
                              skip_same_camera=skip_same_camera, nprobe=nprobe)
    loaded = load_reference(model, strategy)
    gal = load_gallery(gallery)
    queries = read_queries(query)
    hits, index = search(loaded, gal, queries, settings)
    info = {"model": loaded.source.checkpoint, "gallery": gal.uri, "gallery_size": len(gal.features),
            "index": index.kind, "metric": metric, "rerank": rerank, "top": top, "skip_same_camera": skip_same_camera,
            "distance": f"k-reciprocal re-ranked {metric} (k1 {k1}, k2 {k2}, lambda {lambda_value})"
            if rerank else metric}
    doc = write_results(output, queries, hits, info)
    typer.echo(f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'} against {len(gal.features)} gallery "
               f"images, index {index.kind}, distance {info['distance']}")
    for q, row in zip(queries, hits, strict=True):
        typer.echo(format_hits(q, row))
    typer.echo(json.dumps({"results": f"{output.rstrip('/')}/results.json",
                           "strips": [d["strip"] for d in doc["queries"]][:3]}))


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("embed")(embed)
    app.command("search")(search)
