"""GAN quality in the step-1 model's feature space, per cluster, for a finished pipeline run root.

The GAN stage's own ``diversity`` / ``realism`` (gan/gan.json) compare 16x16 pixel thumbnails, where a
blurred average looks "realistic". This script asks what SLSR needs from a generated image of cluster
c: that the re-id model sees it as a cluster-c person. With the step-1 model (the one whose pooled
features were clustered), per cluster:

* ``feature_diversity``: mean pairwise feature distance of the generated images / of the cluster's real
  images (near 0: the samples are one point in feature space);
* ``nearest_real``: mean distance from a generated image to its nearest real image of the cluster / the
  same from a real image to its nearest other real image (1: as close to the data as the data to itself);
* ``own_cluster``: share of generated images whose nearest k-means centroid is their own cluster
  (chance: about 1/K; real images: 1 by construction of the assignment);
* ``label_mass`` (generated) and ``label_mass_real``: mean probability the step-1 classifier puts on
  the identities S_c of the cluster; ``label_mass_uniform`` = |S_c| / C is what a featureless image
  would get. SLSR's sparse label says "one of S_c": it is right for a generated image only insofar
  as the model agrees.

Usage: python benchmarks/ablation/gan_quality.py RUN_ROOT [OUT.json]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from slsr_ray import storage
from slsr_ray.data import read_image
from slsr_ray.models.reid import load_model
from slsr_ray.stages import read_record
from slsr_ray.transforms import build_test_transform


def features_and_probs(model, paths: list[str], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    tf = build_test_transform(height, width, norm=model.cfg.input_norm)
    feats, probs = [], []
    with torch.no_grad():
        for i in range(0, len(paths), 64):
            x = torch.stack([tf(read_image(p)) for p in paths[i : i + 64]])
            out = model(x)
            feats.append(out["pool"].numpy())
            probs.append(torch.softmax(out["logits"], 1).numpy())
    return np.concatenate(feats), np.concatenate(probs)


def mean_pairwise(x: np.ndarray) -> float:
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    return float(d.sum() / max(len(x) * (len(x) - 1), 1))


def cluster_quality(run_root: str, per_cluster: int = 100) -> dict:
    model, _, extra = load_model(read_record(run_root, "pretrain").outputs["checkpoint"])
    cluster = read_record(run_root, "cluster").outputs
    members = {c["cluster"]: c["pids"] for c in storage.read_json(cluster["membership"])["clusters"]}
    centroids = np.load(storage.join(run_root, "cluster", f"k{cluster['k']}", "centroids.npy"))
    assign = storage.read_table(cluster["assignments"])
    gen = storage.read_table(read_record(run_root, "generate").outputs["manifest"])
    cfg = storage.read_json(storage.join(run_root, "config.json"))
    h, w = cfg["extract"]["height"], cfg["extract"]["width"]
    num_ids = len(set(assign["pid"].to_pylist()))
    out = {}
    for c, pids in sorted(members.items()):
        real_paths = [p for p, k in zip(assign["path"].to_pylist(), assign["cluster"].to_pylist(), strict=True) if k == c]
        gen_paths = [p for p, k in zip(gen["path"].to_pylist(), gen["cluster"].to_pylist(), strict=True) if k == c]
        real_paths, gen_paths = real_paths[:per_cluster], gen_paths[:per_cluster]
        fr, pr = features_and_probs(model, real_paths, h, w)
        fg, pg = features_and_probs(model, gen_paths, h, w)
        d_gr = np.linalg.norm(fg[:, None] - fr[None], axis=2).min(1).mean()
        d_rr = np.linalg.norm(fr[:, None] - fr[None], axis=2)
        np.fill_diagonal(d_rr, np.inf)
        nearest = np.linalg.norm(fg[:, None] - centroids[None], axis=2).argmin(1)
        out[str(c)] = {
            "identities": len(pids), "real_images": len(real_paths), "generated_images": len(gen_paths),
            "feature_diversity": mean_pairwise(fg) / mean_pairwise(fr),
            "nearest_real": float(d_gr / d_rr.min(1).mean()),
            "own_cluster": float((nearest == c).mean()),
            "label_mass": float(pg[:, pids].sum(1).mean()),
            "label_mass_real": float(pr[:, pids].sum(1).mean()),
            "label_mass_uniform": len(pids) / num_ids,
        }
    return {"run_root": run_root, "k": cluster["k"], "num_ids": num_ids, "clusters": out}


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = cluster_quality(sys.argv[1])
    text = json.dumps(result, indent=2)
    print(text)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(text + "\n")
