"""``slsr evaluate``: CMC/mAP/mINP of query/gallery features stored in a parquet file."""

from __future__ import annotations

import os

import numpy as np
import typer

FEATURE_COLUMNS = ("feature", "pid", "camid", "split")


def load_feature_table(uri: str) -> dict[str, np.ndarray]:
    """Read a features parquet (``feature`` list<float32>, ``pid``, ``camid``, ``split``) into arrays
    ``qf, gf, q_pids, g_pids, q_camids, g_camids``; ValueError naming what is missing or malformed."""
    import pyarrow as pa

    from .. import storage

    table = storage.read_table(uri)
    missing = [c for c in FEATURE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{uri} lacks column(s) {missing}; expected {list(FEATURE_COLUMNS)}")
    col = table.column("feature").combine_chunks()
    if not (pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise ValueError(f"{uri}: column 'feature' must be a list of floats, got {col.type}")
    lengths = set(col.value_lengths().to_numpy(zero_copy_only=False).tolist()) if not pa.types.is_fixed_size_list(col.type) else {col.type.list_size}
    if len(lengths) != 1:
        raise ValueError(f"{uri}: rows of column 'feature' have different lengths {sorted(lengths)[:5]}")
    dim = lengths.pop()
    feats = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), dim)
    split = np.asarray(table.column("split").to_pylist())
    bad = sorted(set(split.tolist()) - {"query", "gallery"})
    if bad:
        raise ValueError(f"{uri}: column 'split' must hold 'query' or 'gallery', got {bad[:5]}")
    pids = table.column("pid").to_numpy()
    cams = table.column("camid").to_numpy()
    q, g = split == "query", split == "gallery"
    if not q.any() or not g.any():
        raise ValueError(f"{uri}: need both query and gallery rows, got {int(q.sum())} query / {int(g.sum())} gallery")
    return {"qf": feats[q], "gf": feats[g], "q_pids": pids[q], "g_pids": pids[g],
            "q_camids": cams[q], "g_camids": cams[g]}


def evaluate_command(
    features: str = typer.Option(..., "--features", "-f", help="parquet with feature, pid, camid, split (query/gallery); local or s3://"),
    metric: str = typer.Option("euclidean", help="euclidean or cosine"),
    rerank: bool = typer.Option(False, "--rerank", help="also report k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3)"),
    k1: int = typer.Option(20, help="re-ranking k1"),
    k2: int = typer.Option(6, help="re-ranking k2"),
    lambda_value: float = typer.Option(0.3, "--lambda", help="re-ranking lambda"),
    max_rank: int = typer.Option(50, help="length of the CMC curve"),
    multi_query: str = typer.Option("", help="also report Market multi-query with 'max' or 'mean' pooling"),
    out: str = typer.Option("", "--out", "-o", help="write results JSON here (local or s3://)"),
    plot: str = typer.Option("", help="write a CMC-curve PNG here (local or s3://)"),
) -> None:
    """Evaluate query vs gallery features (Market-1501 rules) and print R1/R5/R10/R20/mAP/mINP."""
    from .. import storage
    from ..errors import as_config_error, check_option
    from ..evaluate import (
        RankResult,
        evaluate_features,
        evaluate_multi_query,
        evaluate_rank,
        format_table,
        plot_cmc,
        re_ranking_features,
    )

    check_option(metric in ("euclidean", "cosine"), "--metric", "euclidean or cosine", metric)
    check_option(not multi_query or multi_query in ("max", "mean"), "--multi-query", "max or mean", multi_query)
    check_option(max_rank >= 1 and k1 >= 1 and k2 >= 1, "--max-rank/--k1/--k2", "positive integers",
                 (max_rank, k1, k2))
    check_option(0 <= lambda_value <= 1, "--lambda", "a number in [0, 1]", lambda_value)
    for flag, target in (("--out", out), ("--plot", plot)):  # before computing anything
        check_option(not target or storage.is_s3(target) or not os.path.isdir(target), flag,
                     "a file path, not a folder", target)
    with as_config_error("--features"):
        data = load_feature_table(features)
        ids = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
        results = {"single-query": RankResult.from_metrics(
            evaluate_features(data["qf"], data["gf"], *ids, metric=metric, max_rank=max_rank), "single-query")}
        if multi_query:
            label = f"multi-query ({multi_query})"
            results[label] = RankResult.from_metrics(evaluate_multi_query(
                data["qf"], data["gf"], *ids, pool=multi_query, metric=metric, max_rank=max_rank), label)
        if rerank:
            dist = re_ranking_features(data["qf"], data["gf"], k1, k2, lambda_value, metric=metric)
            results["re-ranked"] = RankResult.from_metrics(evaluate_rank(dist, *ids, max_rank=max_rank), "re-ranked")
    typer.echo(f"{len(data['qf'])} queries x {len(data['gf'])} gallery, metric {metric}")
    typer.echo(format_table(results))
    if out:
        storage.write_json(out, {"features": features, "metric": metric,
                                 "results": {k: r.to_dict() for k, r in results.items()}})
        typer.echo(f"wrote {out}")
    if plot:
        plot_cmc(results, plot)
        typer.echo(f"wrote {plot}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
