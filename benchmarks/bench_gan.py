"""K=3 per-cluster DCGAN trainings: three concurrent Ray actors (ours) vs one after another in one process.

Both sides run the same code (``slsr_ray.gan.GanTrainerCore``) on the same clusters with the same
seeds, so the final losses should agree (``max_abs_loss_diff``; not bit-exact when thread counts
differ). Times include loading each cluster's images; ours also includes starting the actors (not
``ray.init``). The peer gets all CPU threads (``torch.set_num_threads(os.cpu_count())``); each actor
gets its share of the CPUs (or of the GPU when one is present: the three actors share it).

Sizes (synthetic data in the Market-1501 layout, clusters = k-means on the images' mean colour):
  small   192 train images, 32x32 GAN, ngf=ndf=16, 3 epochs, batch 16   (< 2 min on 2 CPUs)
  paper   1,200 train images, the paper's 128x128 GAN (ngf=ndf=64), 2 epochs, batch 64 (for a GPU)

    python benchmarks/bench_gan.py [small|paper]
"""

from __future__ import annotations

import os
import tempfile
import time

from common import chosen_size, report, size_parser

SIZES = {
    "small": dict(num_ids=48, images_per_id=8, gan=dict(image_size=32, ngf=16, ndf=16, epochs=3, batch_size=16)),
    "paper": dict(num_ids=200, images_per_id=12, gan=dict(image_size=128, ngf=64, ndf=64, epochs=2, batch_size=64)),
}
K = 3


def _clusters(root: str, num_ids: int, images_per_id: int):
    import numpy as np
    import pyarrow as pa
    from sklearn.cluster import KMeans

    from slsr_ray.data import load_dataset, make_synthetic, read_image_array

    make_synthetic(root, num_ids=num_ids, cams=4, images_per_id=images_per_id, seed=0)
    train = load_dataset("market1501", root).train
    paths = train["path"].to_pylist()
    colours = np.stack([read_image_array(p, (32, 16)).reshape(-1, 3).mean(0) for p in paths])
    labels = KMeans(K, n_init=10, random_state=0).fit_predict(colours)
    return pa.table({"path": paths, "cluster": pa.array(labels.astype("int64"))})


def run(size: str = "small") -> list[dict]:
    import ray
    import torch

    from slsr_ray.gan import GanConfig, GanTrainerCore, cluster_paths, train_gans

    spec = SIZES[size]
    cfg = GanConfig(seed=0, **spec["gan"])
    with tempfile.TemporaryDirectory() as tmp:
        table = _clusters(os.path.join(tmp, "data"), spec["num_ids"], spec["images_per_id"])
        per_cluster = cluster_paths(table)

        started_ray = not ray.is_initialized()
        if started_ray:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            ours = train_gans(table, os.path.join(tmp, "gan_actors"), cfg, progress=False)
            ours_s = time.perf_counter() - t0
        finally:
            if started_ray:
                ray.shutdown()

        torch.set_num_threads(os.cpu_count())
        t0 = time.perf_counter()
        peer = {}
        for c, paths in per_cluster.items():
            peer[c] = GanTrainerCore(c, paths, os.path.join(tmp, "gan_sequential"), cfg).train()
        peer_s = time.perf_counter() - t0

    diff = max(abs(ours[c][k] - peer[c][k]) for c in ours for k in ("loss_d", "loss_g"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [
        {
            "name": f"gan_train_k{K}_{size}_{device}",
            "ours_s": round(ours_s, 3),
            "peer": "sequential GanTrainerCore in one process",
            "peer_s": round(peer_s, 3),
            "ratio": round(ours_s / peer_s, 3),
            "speedup": round(peer_s / ours_s, 3),
            "images": table.num_rows,
            "cluster_sizes": {str(c): len(p) for c, p in per_cluster.items()},
            "epochs": cfg.epochs,
            "image_size": cfg.image_size,
            "actor_train_s": {str(c): round(r["wall_s"], 3) for c, r in ours.items()},
            "max_abs_loss_diff": round(diff, 6),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        }
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    args = size_parser(__doc__, SIZES).parse_args(argv)
    size = chosen_size(args)
    cols = ["name", "peer", "ours_s", "peer_s", "ratio", "speedup", "images", "max_abs_loss_diff", "device"]
    return report("gan", size, run(size), cols)


if __name__ == "__main__":
    main()
