"""Figures of the trainings and the evaluation: training curves, CMC curves, a ranked gallery."""

from __future__ import annotations

import logging

import numpy as np

from .. import storage
from ..layout import RunLayout
from .base import (
    GREEN,
    GREY,
    RED,
    Figure,
    FigureInputMissing,
    _framed,
    _plt,
    _png,
    _require,
    _sample,
    _strip,
    _thumb,
    run_config,
    run_strategies,
)

log = logging.getLogger("slsr_ray.figures")

CURVE_KEYS = (("loss", "training loss", 1.0), ("train_acc", "accuracy on real training images (%)", 100.0),
              ("lr", "learning rate", 1.0))


def training_histories(run_root: str, strategies: list[str] | None = None) -> dict[str, list[dict]]:
    """``{"pretrain": [...], strategy: [...]}``: the per-epoch ``history`` of each training's metrics.json."""
    out = {}
    for name, stage in [("pretrain", "pretrain")] + [(s, f"train/{s}") for s in (strategies or run_strategies(run_root))]:
        uri = RunLayout(run_root).stage_metrics(stage)
        if storage.exists(uri):
            history = storage.read_json(uri).get("history", [])
            if history:
                out[name] = history
    return out


def training_curves(run_root: str, strategies: list[str] | None = None) -> Figure:
    """Loss, training accuracy and learning rate per epoch of the step-1 pretraining and of every
    strategy's final training."""
    histories = training_histories(run_root, strategies)
    if not histories:
        raise FigureInputMissing(f"figure 'training_curves' needs pretrain/ or train/<strategy>/metrics.json under {run_root}")
    plt = _plt()
    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4.2 * len(CURVE_KEYS), 3.4))
    data = {}
    for name, history in histories.items():
        epochs = [int(e.get("epoch", i)) + 1 for i, e in enumerate(history)]
        data[name] = {"epoch": epochs}
        for ax, (key, _, scale) in zip(axes, CURVE_KEYS, strict=True):
            values = [e.get(key) for e in history]
            data[name][key] = values
            if any(v is not None for v in values):
                ax.plot(epochs, [scale * v if v is not None else np.nan for v in values], marker=".", label=name)
    from matplotlib.ticker import MaxNLocator

    for ax, (_, label, _) in zip(axes, CURVE_KEYS, strict=True):
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return Figure(
        "training", "Training curves",
        "Per-epoch values from each training's metrics.json (pretrain: step 1, cross-entropy on real images).",
        _png(fig), data,
    )


def cmc_curves(run_root: str, strategies: list[str] | None = None, max_rank: int = 20) -> Figure:
    """CMC curves of every strategy (SLSR vs the baselines), with and without re-ranking."""
    curves: dict[str, list[float]] = {}
    for s in strategies or run_strategies(run_root):
        for mode, suffix in (("plain", ""), ("rerank", " + re-rank")):
            uri = RunLayout(run_root).metrics(s, mode)
            if storage.exists(uri):
                curves[s + suffix] = [float(v) for v in storage.read_json(uri)["cmc"][:max_rank]]
    if not curves:
        raise FigureInputMissing(f"figure 'cmc' needs evaluate/<strategy>/plain.json under {run_root}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    cmap = plt.get_cmap("tab10")
    names = list(dict.fromkeys(label.replace(" + re-rank", "") for label in curves))
    for label, cmc in curves.items():
        base = label.replace(" + re-rank", "")
        ax.plot(range(1, len(cmc) + 1), [100 * v for v in cmc], "--" if label != base else "-", marker=".",
                color=cmap(names.index(base) % 10), label=f"{label} (R1 {100 * cmc[0]:.1f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title("CMC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return Figure(
        "cmc", "CMC curves",
        "Fraction of queries whose first correct match is within the first r gallery images; dashed: after "
        "k-reciprocal re-ranking.",
        _png(fig), {"max_rank": max_rank, "cmc": curves},
    )


def _ranked(dist_row: np.ndarray, keep: np.ndarray, topk: int) -> np.ndarray:
    idx = np.flatnonzero(keep)
    return idx[np.argsort(dist_row[idx], kind="stable")[:topk]]


def ranked_gallery(run_root: str, strategy: str | None = None, query_index: int | None = None, topk: int = 10,
                   max_queries: int = 300, max_gallery: int = 5000, seed: int = 0) -> Figure:
    """A query and its top-``topk`` gallery images (green border: same identity, red: another) before
    and after k-reciprocal re-ranking, from ``evaluate/<strategy>/features``.

    Gallery images of the query's identity taken by the query's camera are left out, as the Market-1501
    evaluation ignores them. Re-ranking uses the run's ``evaluate`` settings, over at most
    ``max_queries`` queries (a seeded sample that holds the shown query) and the whole gallery, or, for a
    gallery over ``max_gallery`` images (re-ranking costs gallery^2), its ``max_gallery`` images nearest to
    those queries. Without ``query_index`` the shown query is the one whose top-``topk`` gains the most
    correct matches. The evaluation's own numbers are in ``evaluate/<strategy>/rerank.json``."""
    # Long because distances, the query's ranked row and the montage are one figure's steps and share every array.
    from ..evaluate import compute_distance_matrix, re_ranking_features
    from ..extract import iter_feature_shards, load_feature_rows, load_feature_table

    strategy = strategy or run_strategies(run_root)[0]
    feat_dir = RunLayout(run_root).evaluation_features(strategy)
    _require(RunLayout(run_root).marker(f"evaluate/{strategy}"), "ranked_gallery", f"evaluate/{strategy}")
    table = load_feature_table(feat_dir)  # every row but no features: a large run's matrix is never loaded
    split = np.asarray(table["split"].to_pylist())
    q_rows, g_rows = np.flatnonzero(split == "query"), np.flatnonzero(split == "gallery")
    pids, cams, paths = table["pid"].to_numpy(), table["camid"].to_numpy(), table["path"].to_pylist()
    ev = {"metric": "euclidean", "k1": 20, "k2": 6, "lambda_value": 0.3, **run_config(run_root).get("evaluate", {})}
    if query_index is not None and not 0 <= query_index < len(q_rows):
        raise ValueError(f"query_index must be in 0..{len(q_rows) - 1} (queries of {strategy}), got {query_index}")
    chosen = _sample(len(q_rows), max_queries, seed)
    if query_index is not None and query_index not in chosen:
        chosen = np.sort(np.append(chosen[:-1] if len(chosen) >= max_queries else chosen, query_index))
    qf = load_feature_rows(feat_dir, q_rows[chosen])
    # the sampled queries' distances to the whole gallery, one feature shard at a time
    g_pos = np.full(table.num_rows, -1, np.int64)
    g_pos[g_rows] = np.arange(len(g_rows))
    plain = np.empty((len(chosen), len(g_rows)), np.float32)
    for idx, X in iter_feature_shards(feat_dir):
        sel = g_pos[idx] >= 0
        if sel.any():
            plain[:, g_pos[idx[sel]]] = compute_distance_matrix(qf, X[sel], metric=ev["metric"])
    near = np.arange(len(g_rows))
    if len(near) > max_gallery:  # the gallery images nearest to any sampled query; the rest ranks last
        near = np.sort(np.argsort(plain.min(0), kind="stable")[:max_gallery])
    rerank = np.full_like(plain, np.inf)
    rerank[:, near] = re_ranking_features(qf, load_feature_rows(feat_dir, g_rows[near]), k1=int(ev["k1"]),
                                          k2=int(ev["k2"]), lambda_value=float(ev["lambda_value"]),
                                          metric=ev["metric"])
    g_pids, g_cams = pids[g_rows], cams[g_rows]

    def top(i: int, dist: np.ndarray) -> np.ndarray:
        qp, qc = pids[q_rows[chosen[i]]], cams[q_rows[chosen[i]]]
        return _ranked(dist[i], ~((g_pids == qp) & (g_cams == qc)), topk)

    if query_index is None:
        gains = []
        for i in range(len(chosen)):
            qp = pids[q_rows[chosen[i]]]
            has_match = np.any((g_pids == qp) & (g_cams != cams[q_rows[chosen[i]]]))
            hits = [(g_pids[top(i, d)] == qp).sum() for d in (plain, rerank)]
            gains.append((has_match, hits[1] - hits[0], hits[1]))
        i_show = max(range(len(chosen)), key=lambda i: (gains[i], -i))
    else:
        i_show = int(np.flatnonzero(chosen == query_index)[0])
    q_row = q_rows[chosen[i_show]]
    data = {"strategy": strategy, "query_index": int(chosen[i_show]), "query_path": paths[q_row],
            "query_pid": int(pids[q_row]), "query_camid": int(cams[q_row]), "topk": topk,
            "reranked_queries": len(chosen), "reranked_gallery": len(near)}
    strips = {}
    for mode, dist in (("plain", plain), ("rerank", rerank)):
        ranked = top(i_show, dist)
        correct = (g_pids[ranked] == pids[q_row]).tolist()
        data[mode] = {"gallery_index": ranked.tolist(), "pid": g_pids[ranked].tolist(), "correct": correct,
                      "distance": dist[i_show, ranked].astype(float).tolist(),
                      "path": [paths[g_rows[j]] for j in ranked]}
        strips[mode] = _strip([_framed(_thumb(paths[g_rows[j]], (128, 64)), GREEN if ok else RED)
                               for j, ok in zip(ranked, correct, strict=True)], (128, 64))
    plt = _plt()
    fig = plt.figure(figsize=(1.0 * topk + 2.2, 4.6))
    grid = fig.add_gridspec(2, 2, width_ratios=[1, topk + 0.5])
    ax_q = fig.add_subplot(grid[:, 0])
    ax_q.imshow(_framed(_thumb(paths[q_row], (128, 64)), GREY))
    ax_q.set_title(f"query\nid {pids[q_row]}, cam {cams[q_row]}", fontsize=9)
    ax_q.axis("off")
    for r, (mode, title) in enumerate((("plain", "ranking"), ("rerank", "after re-ranking"))):
        ax = fig.add_subplot(grid[r, 1])
        ax.imshow(strips[mode])
        hits = sum(data[mode]["correct"])
        ax.set_title(f"{strategy}: top-{topk} {title} ({hits} correct)", fontsize=9)
        ax.axis("off")
    return Figure(
        "ranked_gallery", "A query and its top-10 before and after re-ranking",
        f"Green border: the same identity as the query, red: another identity ({strategy} model).",
        _png(fig), data,
    )
