"""Figures of the method's steps: the data, the step-1 features and clusters, the GANs, the sparse labels."""

from __future__ import annotations

import io
import logging

import numpy as np

from .. import storage
from ..layout import RunLayout
from .base import (
    THUMB,
    Figure,
    FigureInputMissing,
    _plt,
    _png,
    _require,
    _sample,
    _strip,
    _thumb,
    chosen_k,
)

log = logging.getLogger("slsr_ray.figures")


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
    cluster centroids projected the same way. The PCA is fitted on (and shows) a seeded sample of at
    most ``max_points`` images, whose features alone are read: a large run's feature matrix is never loaded."""
    from sklearn.decomposition import PCA

    from ..extract import load_feature_rows, load_feature_table

    run = RunLayout(run_root)
    feat_dir = run.features
    _require(run.marker("extract"), "feature_pca", "extract")
    k = chosen_k(run_root) if k is None else int(k)
    assign = storage.read_table(_require(run.assignments(k), "feature_pca", "cluster"), columns=["path", "cluster"])
    table = load_feature_table(feat_dir)
    cluster_of = dict(zip(assign["path"].to_pylist(), assign["cluster"].to_pylist(), strict=True))
    paths = table["path"].to_pylist()
    missing = [p for p in paths if p not in cluster_of]
    if missing:
        raise ValueError(f"{len(missing)} feature rows (e.g. {missing[0]}) have no cluster in {run.assignments(k)}")
    labels = np.array([cluster_of[p] for p in paths])
    rows = _sample(len(paths), max_points, seed)
    feats = load_feature_rows(feat_dir, rows)
    pca = PCA(n_components=2, random_state=seed).fit(feats)
    xy = pca.transform(feats)
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
        f"The step-1 model's {feats.shape[1]}-d features of {len(feats)} of the {len(paths)} training images projected "
        f"on their first two principal components; colours are the K = {k} k-means clusters.",
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

    from ..labels import load_membership, make_strategy

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


