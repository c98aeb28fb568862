"""Feature extraction throughput: our Ray Data pipeline vs a plain torch DataLoader loop.

Same model weights (one checkpoint), same images, same batch size, same preprocessing (the test
transform). The peer is the loop everyone writes: ``DataLoader(num_workers=2)`` decoding with
``build_test_transform`` and the model in the main process (torch's default threads).

Ray Data has a fixed start-up cost (planning, starting the actor processes, loading the model in each),
so every timing is taken at two sizes, N and N/4, and reported both ways:

* ``with start-up``: wall time for all N images (``extract_features`` from call to ``_SUCCESS``);
* ``start-up excluded``: the marginal rate (N - N/4) / (t(N) - t(N/4)), the rate a big dataset sees.

Ours is run in both decode modes (``actor``: decode inside the model actors, the CPU default;
``tasks``: a separate Ray Data decode stage with 0.5 CPU per task). Ray start (``ray.init``) is
excluded. ``throughput_ratio`` = our images/s / the DataLoader's images/s (goal >= 0.8).

Sizes: ``small`` resnet18 at 128x64, 800 images; ``market`` resnet50 at 256x128, 3,200 images.

    python benchmarks/bench_extract.py --size small
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from common import chosen_size, report, size_parser

SIZES = {
    "small": {"backbone": "resnet18", "height": 128, "width": 64, "images": 800, "batch": 64},
    "market": {"backbone": "resnet50", "height": 256, "width": 128, "images": 3200, "batch": 64},
}


def _dataset(tmp: str, images: int):
    """A manifest of ``images`` synthetic images (train + gallery + query of one synthetic set)."""
    import pyarrow as pa

    from slsr_ray.data import load_dataset, make_synthetic

    root = os.path.join(tmp, "synthetic")
    ids = max(10, images // 10 + 10)
    make_synthetic(root, num_ids=ids, cams=6, images_per_id=12, seed=0, num_distractors=0, num_junk=0)
    ds = load_dataset("market1501", root)
    table = pa.concat_tables([ds.train, ds.gallery, ds.query])
    if table.num_rows < images:
        raise RuntimeError(f"synthetic set has {table.num_rows} images, wanted {images}")
    return table.slice(0, images)


class _Images:
    def __init__(self, paths, height, width):
        from slsr_ray.transforms import build_test_transform

        self.paths, self.tf = paths, build_test_transform(height, width)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from slsr_ray.data import read_image

        return self.tf(read_image(self.paths[i]))


def _dataloader_loop(model, paths, height, width, batch) -> tuple[float, np.ndarray]:
    import torch
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    loader = DataLoader(_Images(paths, height, width), batch_size=batch, num_workers=2, shuffle=False)
    out = []
    with torch.inference_mode():
        for x in loader:
            out.append(model.extract(x, feature="pool").numpy())
    return time.perf_counter() - t0, np.concatenate(out)


def _ours(manifest, ckpt, out_dir, spec, decode) -> float:
    from slsr_ray.extract import ExtractConfig, extract_features

    cfg = ExtractConfig(batch_size=spec["batch"], height=spec["height"], width=spec["width"], decode=decode)
    t0 = time.perf_counter()
    extract_features(manifest, ckpt, out_dir, cfg)
    return time.perf_counter() - t0


def run(size: str = "small") -> list[dict]:
    import ray
    import torch

    from slsr_ray.extract import load_features
    from slsr_ray.models import ModelConfig, build_model, save_checkpoint

    spec = SIZES[size]
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _dataset(tmp, spec["images"])
        n, n_small = manifest.num_rows, manifest.num_rows // 4
        torch.manual_seed(0)
        cfg = ModelConfig(num_classes=100, backbone=spec["backbone"])
        model = build_model(cfg, announce=False).eval()
        ckpt = os.path.join(tmp, "model.pt")
        save_checkpoint(ckpt, model, cfg)
        paths = manifest["path"].to_pylist()

        _dataloader_loop(model, paths[: spec["batch"]], spec["height"], spec["width"], spec["batch"])  # warm-up
        peer_full, peer_feats = _dataloader_loop(model, paths, spec["height"], spec["width"], spec["batch"])
        peer_small, _ = _dataloader_loop(model, paths[:n_small], spec["height"], spec["width"], spec["batch"])
        peer_rate_full = n / peer_full
        peer_rate_marginal = (n - n_small) / (peer_full - peer_small) if peer_full > peer_small else None

        for decode in ("tasks", "actor"):
            out_full, out_small = os.path.join(tmp, f"f_{decode}"), os.path.join(tmp, f"s_{decode}")
            ours_full = _ours(manifest, ckpt, out_full, spec, decode)
            ours_small = _ours(manifest.slice(0, n_small), ckpt, out_small, spec, decode)
            _, feats = load_features(out_full)
            diff = float(np.abs(feats - peer_feats).max())
            base = {"size": size, "images": n, "images_small": n_small, "backbone": spec["backbone"],
                    "input": f"{spec['height']}x{spec['width']}", "batch": spec["batch"], "cpus": cpus,
                    "decode": decode, "peer": "torch DataLoader(num_workers=2)", "max_abs_diff": diff}
            # Under heavy machine load t(N) - t(N/4) can come out <= 0: then the marginal rate is unmeasured.
            measurable = ours_full > ours_small and peer_full > peer_small
            ours_rate_marginal = (n - n_small) / (ours_full - ours_small) if measurable else None
            rows.append({**base, "name": f"extract ({decode} decode), with start-up", "ours_s": ours_full,
                         "peer_s": peer_full, "ratio": ours_full / peer_full, "ours_img_s": n / ours_full,
                         "peer_img_s": peer_rate_full, "throughput_ratio": (n / ours_full) / peer_rate_full})
            rows.append({**base, "name": f"extract ({decode} decode), start-up excluded",
                         "ours_s": ours_full - ours_small, "peer_s": peer_full - peer_small,
                         "ratio": (ours_full - ours_small) / (peer_full - peer_small) if measurable else None,
                         "ours_img_s": ours_rate_marginal, "peer_img_s": peer_rate_marginal if measurable else None,
                         "throughput_ratio": ours_rate_marginal / peer_rate_marginal if measurable else None,
                         "ours_startup_s": ours_full - n / ours_rate_marginal if measurable else None,
                         "note": "" if measurable else "t(N) <= t(N/4): machine load swamped the measurement"})
    return rows




def main(argv: list[str] | None = None) -> list[dict]:
    args = size_parser(__doc__, SIZES).parse_args(argv)
    size = chosen_size(args)
    cols = ["name", "ours_s", "peer_s", "ratio", "ours_img_s", "peer_img_s", "throughput_ratio", "max_abs_diff"]
    return report("extract", size, run(size), cols)


if __name__ == "__main__":
    main()
