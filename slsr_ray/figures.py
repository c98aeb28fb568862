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

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import storage
from .layout import RunLayout
from .stages import read_record

log = logging.getLogger("slsr_ray.figures")

GREEN = (40, 170, 60)
RED = (210, 40, 40)
GREY = (150, 150, 150)
THUMB = (64, 32)  # (height, width) of the image thumbnails in montages


class FigureInputMissing(FileNotFoundError):
    """The run has no artifact this figure is drawn from (the stage did not run, or not yet)."""


@dataclass
class Figure:
    """A rendered figure: ``name`` (file stem in ``report/``), ``title``, a one-line ``caption``, the
    ``png`` bytes and ``data``, the plotted values (JSON-friendly lists and numbers)."""

    name: str
    title: str
    caption: str
    png: bytes
    data: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, read from the PNG header."""
        return int.from_bytes(self.png[16:20], "big"), int.from_bytes(self.png[20:24], "big")

    def _repr_png_(self) -> bytes:  # Jupyter shows the picture
        return self.png

    def save(self, uri: str) -> str:
        storage.write_bytes(uri, self.png)
        return uri


# ------------------------------------------------------------------------------------------ helpers


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _require(uri: str, figure: str, stage: str) -> str:
    if not storage.exists(uri):
        raise FigureInputMissing(f"figure {figure!r} needs {uri} (written by the {stage} stage); it is not in the run")
    return uri


def run_config(run_root: str) -> dict:
    """The run's saved ``config.json`` (empty when the run has none)."""
    uri = RunLayout(run_root).config
    return storage.read_json(uri) if storage.exists(uri) else {}


def run_strategies(run_root: str) -> list[str]:
    """The run's label strategies, main one first (from its config; else the evaluate/train folders)."""
    cfg = run_config(run_root)
    if cfg.get("train"):
        out = [cfg["train"].get("strategy", "slsr")]
        return out + [s for s in cfg.get("baselines", []) if s not in out]
    found = {s for stage in ("evaluate", "train") for s in storage.listdir(RunLayout(run_root).stage(stage))}
    return sorted(s for s in found if not s.startswith(("_", ".")))


def chosen_k(run_root: str) -> int:
    """K the run's later stages used: the cluster stage's record, else silhouette.json's ``best_k``."""
    rec = read_record(run_root, "cluster")
    if rec is not None:
        return int(rec.outputs["k"])
    uri = _require(RunLayout(run_root).silhouette, "clusters", "cluster")
    return int(storage.read_json(uri)["best_k"])


def _thumb(uri: str, size: tuple[int, int] = THUMB) -> np.ndarray:
    from .data import read_image_array

    return read_image_array(uri, size)


def _framed(img: np.ndarray, color: tuple[int, int, int] | None, width: int = 3) -> np.ndarray:
    """The image with a coloured border of ``width`` pixels drawn inside it."""
    if color is None:
        return img
    out = img.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = color, color, color, color
    return out


def _strip(images: list[np.ndarray | None], size: tuple[int, int] = THUMB, pad: int = 2) -> np.ndarray:
    """Images side by side (``None`` leaves a blank cell), white padding between them."""
    h, w = size
    n = max(len(images), 1)
    out = np.full((h, n * w + (n - 1) * pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        if img is not None:
            out[:, i * (w + pad) : i * (w + pad) + w] = img
    return out


def _sample(n_total: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


# ------------------------------------------------------------------------------------------ figures


def dataset_samples(run_root: str, split: str = "train", num_ids: int = 6, seed: int = 0) -> Figure:
    """The same few identities seen by every camera (rows: cameras, columns: identities) from the
    ``prepare`` manifest of ``split``: what changes between cameras is what re-id must be robust to."""
    uri = _require(RunLayout(run_root).split(split), "dataset_samples", "prepare")
    t = storage.read_table(uri, columns=["path", "pid", "camid"])
    pids, cams, paths = t["pid"].to_numpy(), t["camid"].to_numpy(), t["path"].to_pylist()
    cameras = sorted(set(cams.tolist()))
    valid = pids >= 0
    ids, first = np.unique(pids[valid], return_index=True)
    # Identities seen by the most cameras first (ties: a seeded shuffle), so the grid has few holes.
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    coverage = np.array([len(set(cams[valid][pids[valid] == p].tolist())) for p in ids])
    chosen = [int(ids[i]) for i in order[np.argsort(-coverage[order], kind="stable")][:num_ids]]
    grid: dict[int, list[str | None]] = {}
    for cam in cameras:
        row = []
        for pid in chosen:
            hits = np.flatnonzero((pids == pid) & (cams == cam))
            row.append(paths[hits[0]] if len(hits) else None)
        grid[cam] = row
    plt = _plt()
    fig, axes = plt.subplots(len(cameras), 1, figsize=(1.1 * len(chosen) + 1, 1.5 * len(cameras)), squeeze=False)
    for ax, cam in zip(axes[:, 0], cameras, strict=True):
        ax.imshow(_strip([_thumb(p) if p else None for p in grid[cam]]))
        ax.set_xticks([(i + 0.5) * (THUMB[1] + 2) for i in range(len(chosen))])
        ax.set_xticklabels([f"id {p}" for p in chosen], fontsize=7)
        ax.set_yticks([])
        ax.set_ylabel(f"cam {cam}", rotation=0, ha="right", va="center")
    fig.suptitle(f"{split}: {t.num_rows} images, {len(ids)} identities, {len(cameras)} cameras")
    counts = {int(c): int((cams == c).sum()) for c in cameras}
    return Figure(
        "dataset_samples", "Dataset: identities across cameras",
        f"Rows are cameras, columns the same {len(chosen)} identities of the {split} split (blank: not seen by "
        "that camera).",
        _png(fig), {"split": split, "pids": chosen, "cameras": cameras, "paths": {str(c): grid[c] for c in cameras},
                    "images_per_camera": counts},
    )


def feature_pca(run_root: str, k: int | None = None, max_points: int = 5000, seed: int = 0) -> Figure:
    """PCA (2-D) of the pretrained model's training features, coloured by k-means cluster, with the
    cluster centroids projected the same way."""
    from sklearn.decomposition import PCA

    from .extract import load_features

    run = RunLayout(run_root)
    feat_dir = run.features
    _require(run.marker("extract"), "feature_pca", "extract")
    k = chosen_k(run_root) if k is None else int(k)
    assign = storage.read_table(_require(run.assignments(k), "feature_pca", "cluster"), columns=["path", "cluster"])
    table, feats = load_features(feat_dir)
    cluster_of = dict(zip(assign["path"].to_pylist(), assign["cluster"].to_pylist(), strict=True))
    paths = table["path"].to_pylist()
    missing = [p for p in paths if p not in cluster_of]
    if missing:
        raise ValueError(f"{len(missing)} feature rows (e.g. {missing[0]}) have no cluster in {run.assignments(k)}")
    labels = np.array([cluster_of[p] for p in paths])
    pca = PCA(n_components=2, random_state=seed).fit(feats)
    rows = _sample(len(feats), max_points, seed)
    xy = pca.transform(feats[rows])
    cen_uri = run.centroids(k)
    centroids = np.load(io.BytesIO(storage.read_bytes(cen_uri))) if storage.exists(cen_uri) else None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    cmap = plt.get_cmap("tab10")
    for c in sorted(set(labels.tolist())):
        sel = labels[rows] == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.6, color=cmap(c % 10), label=f"cluster {c} ({int((labels == c).sum())})")
    cen_xy = None
    if centroids is not None:
        cen_xy = pca.transform(centroids.astype(np.float32))
        ax.scatter(cen_xy[:, 0], cen_xy[:, 1], marker="X", s=120, c="black", label="centroids")
    ev = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f}% of variance)")
    ax.set_title(f"pretrained features, K = {k}")
    ax.legend(fontsize=7, markerscale=1.5)
    ax.grid(alpha=0.3)
    return Figure(
        "feature_pca", "Features coloured by cluster (PCA)",
        f"The step-1 model's {feats.shape[1]}-d features of {len(feats)} training images projected on their first "
        f"two principal components; colours are the K = {k} k-means clusters.",
        _png(fig), {"k": k, "xy": xy.tolist(), "cluster": labels[rows].tolist(), "rows": rows.tolist(),
                    "explained_variance_ratio": ev.tolist(),
                    "centroids_xy": cen_xy.tolist() if cen_xy is not None else None},
    )


def silhouette_vs_k(run_root: str) -> Figure:
    """Average silhouette of the k-means clustering for every K tried (the paper's Table 2)."""
    doc = storage.read_json(_require(RunLayout(run_root).silhouette, "silhouette_vs_k", "cluster"))
    scores = {int(k): float(v) for k, v in doc.items() if k != "best_k"}
    ks = sorted(scores)
    k_used = chosen_k(run_root)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [100 * scores[k] for k in ks], marker="o")
    ax.axvline(k_used, color="grey", ls=":", label=f"K used = {k_used}")
    ax.set_xticks(ks)
    ax.set_xlabel("K")
    ax.set_ylabel("average silhouette (%)")
    ax.set_title("k-means on the pretrained features")
    ax.legend()
    ax.grid(alpha=0.3)
    return Figure(
        "silhouette", "Silhouette vs K",
        "Higher is better separated clusters; the run uses the best K unless cluster.k fixes it.",
        _png(fig), {"k": ks, "silhouette": [scores[k] for k in ks], "best_k": int(doc["best_k"]), "k_used": k_used},
    )


def gan_vs_real(run_root: str, per_cluster: int = 6, seed: int = 0) -> Figure:
    """For each cluster: real training images of the cluster (left) next to images its DCGAN generated
    (right; from the generate stage, or the GAN's own sample grid when nothing was generated yet)."""
    from PIL import Image

    run = RunLayout(run_root)
    k = chosen_k(run_root)
    assign = storage.read_table(_require(run.assignments(k), "gan_vs_real", "cluster"), columns=["path", "cluster"])
    gen_uri = run.generated_manifest
    generated = storage.read_table(gen_uri, columns=["path", "cluster"]) if storage.exists(gen_uri) else None
    gan_dir = run.gan
    if generated is None and not any(storage.exists(run.gan_samples(c)) for c in range(k)):
        raise FigureInputMissing(f"figure 'gan_vs_real' needs {gen_uri} or {gan_dir}/c*/samples.png (gan/generate stages)")
    a_paths, a_clusters = assign["path"].to_pylist(), assign["cluster"].to_numpy()
    rows, data = [], {"k": k, "real": {}, "generated": {}}
    for c in range(k):
        members = np.flatnonzero(a_clusters == c)
        real = [a_paths[i] for i in members[_sample(len(members), per_cluster, seed + c)]]
        if generated is not None:
            g_paths = [p for p, cc in zip(generated["path"].to_pylist(), generated["cluster"].to_pylist(), strict=True)
                       if cc == c][:per_cluster]
            gen_img = _strip([_thumb(p) for p in g_paths])
        else:
            uri = run.gan_samples(c)
            g_paths = [uri] if storage.exists(uri) else []
            gen_img = np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")) if g_paths else None
        data["real"][str(c)], data["generated"][str(c)] = real, g_paths
        rows.append((c, len(members), _strip([_thumb(p) for p in real]), gen_img))
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 2, figsize=(2 * 1.0 * per_cluster + 1, 1.45 * len(rows) + 0.4), squeeze=False)
    for (c, n, real_img, gen_img), (ax_r, ax_g) in zip(rows, axes, strict=True):
        ax_r.imshow(real_img)
        ax_r.set_ylabel(f"cluster {c}\n{n} images", rotation=0, ha="right", va="center", fontsize=8)
        if gen_img is not None:
            ax_g.imshow(gen_img)
        for ax in (ax_r, ax_g):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("real images of the cluster", fontsize=9)
    axes[0, 1].set_title("generated by the cluster's DCGAN", fontsize=9)
    return Figure(
        "gan_vs_real", "GAN samples per cluster next to real images",
        "Each cluster's DCGAN learns the look of its cluster (colours, layout), not identities: "
        "its images get the cluster's sparse label.",
        _png(fig), data,
    )


def label_distributions(run_root: str, image_index: int | None = None, lam: float = 1.0) -> Figure:
    """LSRO vs SLSR target distribution over the training identities for one generated image: LSRO
    spreads it over every identity, SLSR only over the identities S_c of the image's cluster. Without
    ``image_index`` the image is the first one of the cluster with the fewest identities (the sparsest
    label)."""
    import torch

    from .labels import load_membership, make_strategy

    gen_uri = _require(RunLayout(run_root).generated_manifest, "label_distributions", "generate")
    generated = storage.read_table(gen_uri, columns=["path", "cluster"])
    k = chosen_k(run_root)
    membership = load_membership(
        _require(RunLayout(run_root).membership(k), "label_distributions", "cluster"))
    if image_index is None:
        gen_clusters = generated["cluster"].to_numpy()
        sparsest = min(set(gen_clusters.tolist()), key=lambda c: (len(membership.get(c, ())), c))
        image_index = int(np.flatnonzero(gen_clusters == sparsest)[0])
    if not 0 <= image_index < generated.num_rows:
        raise ValueError(f"image_index must be in 0..{generated.num_rows - 1} (generated images), got {image_index}")
    train = storage.read_table(_require(RunLayout(run_root).split("train"), "label_distributions",
                                        "prepare"), columns=["pid"])
    num_classes = int(train["pid"].to_numpy().max()) + 1
    path, cluster = generated["path"][image_index].as_py(), int(generated["cluster"][image_index].as_py())
    args = (torch.tensor([-1]), torch.tensor([cluster]), torch.tensor([True]))
    q_lsro = make_strategy("lsro", num_classes, lam=lam).targets(*args)[0][0].numpy()
    q_slsr = make_strategy("slsr", num_classes, membership=membership, lam=lam).targets(*args)[0][0].numpy()
    members = sorted(membership[cluster])
    plt = _plt()
    fig = plt.figure(figsize=(11, 3.2))
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 5, 5], wspace=0.3)
    ax_img = fig.add_subplot(grid[0])
    ax_img.imshow(_thumb(path, (128, 64)))
    ax_img.set_title(f"generated\n(cluster {cluster})", fontsize=9)
    ax_img.axis("off")
    ids = np.arange(num_classes)
    in_c = np.isin(ids, members)
    for slot, (name, q) in enumerate((("LSRO: uniform over all identities", q_lsro),
                                      (f"SLSR: uniform over S_{cluster} ({len(members)} identities)", q_slsr)), start=1):
        ax = fig.add_subplot(grid[slot])
        ax.bar(ids, q, width=1.0, color=np.where(in_c, "tab:blue", "tab:grey"), edgecolor="white", linewidth=0.3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training identity")
        ax.set_ylim(0, max(q_slsr.max(), q_lsro.max()) * 1.1)
        ax.set_xlim(-0.5, num_classes - 0.5)
    fig.axes[1].set_ylabel("target probability q(k)")
    caption = (f"Blue bars: the identities of cluster {cluster} (S_{cluster}); LSRO gives every identity "
               f"1/{num_classes}, SLSR gives S_{cluster} 1/{len(members)} each and the rest 0.")
    if len(members) == num_classes:
        caption += (f" Here cluster {cluster} holds images of every identity, so both are the same: with few images "
                    "per identity, the cluster.rule=majority membership partitions the identities.")
    return Figure(
        "label_distributions", "Label distribution of a generated image: LSRO vs SLSR", caption,
        _png(fig), {"path": path, "cluster": cluster, "num_classes": num_classes, "members": members,
                    "lsro": q_lsro.tolist(), "slsr": q_slsr.tolist()},
    )


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
    from .evaluate import compute_distance_matrix, re_ranking_features
    from .extract import load_features

    strategy = strategy or run_strategies(run_root)[0]
    feat_dir = RunLayout(run_root).evaluation_features(strategy)
    _require(RunLayout(run_root).marker(f"evaluate/{strategy}"), "ranked_gallery", f"evaluate/{strategy}")
    table, feats = load_features(feat_dir)
    split = np.asarray(table["split"].to_pylist())
    q_rows, g_rows = np.flatnonzero(split == "query"), np.flatnonzero(split == "gallery")
    pids, cams, paths = table["pid"].to_numpy(), table["camid"].to_numpy(), table["path"].to_pylist()
    ev = {"metric": "euclidean", "k1": 20, "k2": 6, "lambda_value": 0.3, **run_config(run_root).get("evaluate", {})}
    if query_index is not None and not 0 <= query_index < len(q_rows):
        raise ValueError(f"query_index must be in 0..{len(q_rows) - 1} (queries of {strategy}), got {query_index}")
    chosen = _sample(len(q_rows), max_queries, seed)
    if query_index is not None and query_index not in chosen:
        chosen = np.sort(np.append(chosen[:-1] if len(chosen) >= max_queries else chosen, query_index))
    qf, gf = feats[q_rows[chosen]], feats[g_rows]
    plain = compute_distance_matrix(qf, gf, metric=ev["metric"])
    near = np.arange(len(g_rows))
    if len(near) > max_gallery:  # the gallery images nearest to any sampled query; the rest ranks last
        near = np.sort(np.argsort(plain.min(0), kind="stable")[:max_gallery])
    rerank = np.full_like(plain, np.inf)
    rerank[:, near] = re_ranking_features(qf, gf[near], k1=int(ev["k1"]), k2=int(ev["k2"]),
                                          lambda_value=float(ev["lambda_value"]), metric=ev["metric"])
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


# ------------------------------------------------------------------------------------------ all of them

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
