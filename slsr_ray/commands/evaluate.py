"""``slsr evaluate``: CMC/mAP/mINP of query/gallery features stored in parquet files, under a
dataset protocol, averaged over trials (one file per trial)."""

from __future__ import annotations

import os

import numpy as np
import typer

FEATURE_COLUMNS = ("feature", "pid", "camid", "split")
SPLITS = ("query", "gallery", "multi_query")


def load_feature_table(uri: str) -> dict[str, np.ndarray]:
    """Read a features parquet (``feature`` list<float32>, ``pid``, ``camid``, ``split``) into arrays
    ``qf, gf, mf, q_pids, g_pids, m_pids, q_camids, g_camids, m_camids`` (``m``: rows with split
    ``multi_query``, Market's gt_bbox images, possibly none); ValueError naming what is missing or malformed.
    ``uri`` may also be a pipeline run's ``evaluate/<strategy>/features`` extraction folder."""
    from ..extract import is_complete, load_features

    if is_complete(uri):
        table, feats = load_features(uri)
        missing = [c for c in FEATURE_COLUMNS[1:] if c not in table.column_names]
        if missing:
            raise ValueError(f"{uri} lacks column(s) {missing}; expected {list(FEATURE_COLUMNS)}")
    else:
        table, feats = _read_feature_file(uri)
    split = np.asarray(table.column("split").to_pylist())
    bad = sorted(set(split.tolist()) - set(SPLITS))
    if bad:
        raise ValueError(f"{uri}: column 'split' must hold {', '.join(SPLITS)}, got {bad[:5]}")
    pids = table.column("pid").to_numpy()
    cams = table.column("camid").to_numpy()
    q, g, m = split == "query", split == "gallery", split == "multi_query"
    if not q.any() or not g.any():
        raise ValueError(f"{uri}: need both query and gallery rows, got {int(q.sum())} query / {int(g.sum())} gallery")
    return {"qf": feats[q], "gf": feats[g], "mf": feats[m], "q_pids": pids[q], "g_pids": pids[g],
            "m_pids": pids[m], "q_camids": cams[q], "g_camids": cams[g], "m_camids": cams[m]}


def _read_feature_file(uri: str):
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
    return table, feats


LABELS = {"market": "single-query", "multi_query": "multi-query (mean)", "single_shot": "single-shot"}


def _evaluate_file(uri: str, evaluation: str, metric: str, max_rank: int, rerank: dict | None,
                   multi_query: str, seed: int) -> tuple[dict, int, int]:
    """{label: metrics} of one features file (one trial), and its query / gallery counts."""
    from ..evaluate import evaluate_multi_query, evaluate_split

    data = load_feature_table(uri)
    ids = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    extra = (data["mf"], data["m_pids"], data["m_camids"])
    res = evaluate_split(evaluation, data["qf"], data["gf"], *ids, metric=metric, max_rank=max_rank,
                         multi_query=extra, rerank=rerank, seed=seed)
    names = {"plain": LABELS[evaluation], "rerank": "re-ranked", "single_query": "single-query",
             "single_query_rerank": "single-query re-ranked"}
    out = {names[k]: v for k, v in res.items()}
    if multi_query:
        out[f"multi-query ({multi_query})"] = evaluate_multi_query(
            data["qf"], data["gf"], *ids, pool=multi_query, metric=metric, max_rank=max_rank, extra=extra)
    return out, len(data["qf"]), len(data["gf"])


def evaluate_command(
    features: list[str] = typer.Option(..., "--features", "-f", help="parquet with feature, pid, camid, split "
                                       "(query/gallery, optional multi_query rows: gt_bbox images); local or "
                                       "s3://. Repeat it once per trial (each from a model trained on that "
                                       "trial's split) to get the mean±std over trials"),
    protocol: str = typer.Option("single_query", help="single_query / standard / new_767_700 / ten_trials "
                                 "(Market rules), multi_query (mean-pooled per query id and camera with the "
                                 "multi_query rows), classic (CUHK03 single-shot)"),
    metric: str = typer.Option("euclidean", help="euclidean or cosine"),
    rerank: bool = typer.Option(False, "--rerank", help="also report k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3)"),
    k1: int = typer.Option(20, help="re-ranking k1"),
    k2: int = typer.Option(6, help="re-ranking k2"),
    lambda_value: float = typer.Option(0.3, "--lambda", help="re-ranking lambda"),
    max_rank: int = typer.Option(50, help="length of the CMC curve"),
    multi_query: str = typer.Option("", help="also report Market multi-query with 'max' or 'mean' pooling"),
    seed: int = typer.Option(0, help="seed of the single-shot gallery draws (protocol classic)"),
    out: str = typer.Option("", "--out", "-o", help="write results JSON here (local or s3://)"),
    plot: str = typer.Option("", help="write a CMC-curve PNG here (local or s3://)"),
) -> None:
    """Evaluate query vs gallery features under a protocol and print R1/R5/R10/R20/mAP/mINP
    (mean±std when several --features files, one per trial, are given)."""
    from .. import storage
    from ..data.protocols import evaluation_of
    from ..errors import as_config_error, check_option
    from ..evaluate import RankResult, aggregate_trials, format_table, plot_cmc

    check_option(metric in ("euclidean", "cosine"), "--metric", "euclidean or cosine", metric)
    check_option(not multi_query or multi_query in ("max", "mean"), "--multi-query", "max or mean", multi_query)
    check_option(max_rank >= 1 and k1 >= 1 and k2 >= 1, "--max-rank/--k1/--k2", "positive integers",
                 (max_rank, k1, k2))
    check_option(0 <= lambda_value <= 1, "--lambda", "a number in [0, 1]", lambda_value)
    for flag, target in (("--out", out), ("--plot", plot)):  # before computing anything
        check_option(not target or storage.is_s3(target) or not os.path.isdir(target), flag,
                     "a file path, not a folder", target)
    with as_config_error("--protocol"):
        evaluation = evaluation_of(protocol)
    with as_config_error("--features"):
        rr = {"k1": k1, "k2": k2, "lambda_value": lambda_value} if rerank else None
        trials = [_evaluate_file(f, evaluation, metric, max_rank, rr, multi_query, seed) for f in features]
        results = {label: RankResult.from_metrics(
            aggregate_trials([t[0][label] for t in trials]) if len(trials) > 1 else trials[0][0][label], label)
            for label in trials[0][0]}
    counts = ", ".join(f"{q} queries x {g} gallery" for _, q, g in trials)
    typer.echo(f"protocol {protocol}, {len(trials)} trial(s): {counts}, metric {metric}")
    typer.echo(format_table(results))
    if out:
        storage.write_json(out, {"features": list(features), "protocol": protocol, "num_trials": len(trials),
                                 "metric": metric, "results": {k: r.to_dict() for k, r in results.items()}})
        typer.echo(f"wrote {out}")
    if plot:
        plot_cmc(results, plot)
        typer.echo(f"wrote {plot}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
