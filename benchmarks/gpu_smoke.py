"""GPU smoke run: every GPU path of slsr-ray once, timed against a CPU run of the same work.

    python benchmarks/gpu_smoke.py                       # one CUDA GPU, under 8 minutes (size "gpu")
    python benchmarks/gpu_smoke.py --allow-cpu --size tiny   # anywhere: the same steps with a GPU
                                                             # advertised to Ray but no CUDA (CPU tensors)

Steps, each timed and each passed / fallback / failed:

1. ``extract``: Ray Data extraction with ``num_gpus=1`` per actor, vs the same images with ``num_gpus=0``.
2. ``train``: Ray Train DDP with ``use_gpu=True`` and AMP, vs one CPU worker on the same images.
3. ``kmeans_search``: distributed k-means with faiss GPU indexes (``use_gpu=True``) and a faiss GPU
   nearest-neighbour search, checked against the CPU results; without faiss-gpu both run on CPU and the
   step says ``fallback`` (``pip install 'slsr-ray[gpu]'``).
4. ``gan``: three DCGAN actors sharing the one GPU (1/3 each).
5. ``pipeline``: a short synthetic run of the whole pipeline on the same Ray.

Writes ``benchmarks/results/gpu_smoke.json`` (``--output``): device name, per-step seconds, images/s
of the GPU and the CPU run and their ratio, and the status of every step. Exits 1 when a step failed,
2 when there is no CUDA GPU and ``--allow-cpu`` was not given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

# images: extraction set; train_images / epochs: DDP training; kmeans_rows: random 2048-d rows
SIZES = {
    "gpu": {"backbone": "resnet50", "height": 256, "width": 128, "images": 2400, "cpu_images": 240,
            "train_images": 1200, "cpu_train_images": 96, "epochs": 2, "batch": 64, "kmeans_rows": 50_000,
            "gan_size": 64, "gan_epochs": 5, "pipeline": ["data.synthetic.num_ids=40", "pretrain.epochs=2",
                                                         "train.epochs=2", "gan.epochs=5", "generate.count=200"]},
    "tiny": {"backbone": "resnet18", "height": 64, "width": 32, "images": 48, "cpu_images": 24,
             "train_images": 48, "cpu_train_images": 32, "epochs": 1, "batch": 16, "kmeans_rows": 2000,
             "gan_size": 32, "gan_epochs": 1, "pipeline": None},
}
STEPS = ("extract", "train", "kmeans_search", "gan", "pipeline")
TINY_PIPELINE = [
    "data.synthetic.num_ids=16", "data.synthetic.cams=3", "data.synthetic.images_per_id=6",
    "data.synthetic.height=64", "data.synthetic.width=32", "pretrain.epochs=1", "pretrain.height=64",
    "pretrain.width=32", "pretrain.batch_size=16", "train.epochs=1", "train.height=64", "train.width=32",
    "train.batch_size=16", "extract.height=64", "extract.width=32", "cluster.ks=[2]", "cluster.n_init=1",
    "gan.epochs=1", "gan.image_size=32", "gan.ngf=8", "gan.ndf=8", "gan.batch_size=16", "generate.count=24",
    "generate.height=64", "generate.width=32", "baselines=[]", "evaluate.rerank=false",
]


def _dataset(tmp: str, images: int):
    """A manifest of at least ``images`` synthetic images (train ids relabelled 0..N-1 first)."""
    import pyarrow as pa

    from slsr_ray.data import load_dataset, make_synthetic

    root = os.path.join(tmp, "synthetic")
    make_synthetic(root, num_ids=max(8, images // 8), cams=4, images_per_id=12, seed=0, num_distractors=0,
                   num_junk=0, size=(64, 32) if images < 200 else (128, 64))
    ds = load_dataset("market1501", root)
    return ds.train, pa.concat_tables([ds.train, ds.query, ds.gallery]).slice(0, images)


def step_extract(size: dict, tmp: str, table) -> dict:
    from slsr_ray.extract import ExtractConfig, extract_features
    from slsr_ray.models import ModelConfig

    model = ModelConfig(num_classes=10, backbone=size["backbone"])
    rates = {}
    for name, num_gpus, n in (("gpu", 1, size["images"]), ("cpu", 0, size["cpu_images"])):
        cfg = ExtractConfig(batch_size=size["batch"], num_gpus=num_gpus, height=size["height"],
                            width=size["width"], check_images=False, **({} if num_gpus else {"num_actors": 1}))
        out = extract_features(table.slice(0, n), model, os.path.join(tmp, f"feat-{name}"), cfg)
        meta = json.loads(Path(out, "meta.json").read_text())
        assert meta["num_rows"] == n and meta["num_gpus_per_actor"] == num_gpus, meta
        rates[name] = meta["images_per_s"]
    return {"images_per_s": rates["gpu"], "cpu_images_per_s": rates["cpu"]}


def step_train(size: dict, tmp: str, train) -> dict:
    from slsr_ray.data import relabel
    from slsr_ray.models import ModelConfig
    from slsr_ray.train import TrainConfig, run_training

    rates = {}
    for name, use_gpu, n, epochs in (("gpu", True, size["train_images"], size["epochs"]),
                                     ("cpu", False, size["cpu_train_images"], 1)):
        cfg = TrainConfig(epochs=epochs, batch_size=size["batch"], height=size["height"], width=size["width"],
                          num_workers=1, use_gpu=use_gpu, amp=True, loader_workers=2, erasing_p=0.0,
                          model=ModelConfig(backbone=size["backbone"], noise_layer=False), run_name=f"smoke-{name}")
        result = run_training(cfg, relabel(train.slice(0, n))[0], os.path.join(tmp, f"train-{name}"))
        assert len(result.metrics) == epochs and all(m["loss"] == m["loss"] for m in result.metrics), result.metrics
        rates[name] = result.metrics[-1]["images_per_s"]  # the last epoch: warm, no start-up
    return {"images_per_s": rates["gpu"], "cpu_images_per_s": rates["cpu"]}


def step_kmeans_search(size: dict) -> dict:
    import faiss
    import numpy as np

    from slsr_ray.cluster import kmeans

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 2048)).astype(np.float32) * 4
    X = (centers[rng.integers(4, size=size["kmeans_rows"])] + rng.normal(size=(size["kmeans_rows"], 2048))).astype(np.float32)
    gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    t0 = time.perf_counter()
    res = kmeans(X, 4, n_init=1, seed=0, use_gpu=True)
    seconds = time.perf_counter() - t0
    ref = kmeans(X, 4, n_init=1, seed=0, use_gpu=False)
    assert abs(res.inertia - ref.inertia) <= 1e-3 * ref.inertia, (res.inertia, ref.inertia)
    queries, gallery = X[:500], X[500:]
    cpu_index = faiss.IndexFlatL2(X.shape[1])
    cpu_index.add(gallery)
    _, cpu_nn = cpu_index.search(queries, 10)
    out = {"kmeans_s": seconds, "kmeans_rows_per_s": len(X) * res.n_iter / seconds, "faiss_gpu": gpu_faiss}
    if gpu_faiss:
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), X.shape[1])
        index.add(gallery)
        t0 = time.perf_counter()
        _, gpu_nn = index.search(queries, 10)
        out["search_queries_per_s"] = len(queries) / (time.perf_counter() - t0)
        assert (gpu_nn[:, 0] == cpu_nn[:, 0]).mean() > 0.99
    else:
        out["status"] = "fallback"
        out["note"] = "faiss has no GPU support here (pip install 'slsr-ray[gpu]'): k-means and search ran on CPU"
        print(f"  {out['note']}")
    return out


def step_gan(size: dict, tmp: str, train) -> dict:
    import pyarrow as pa

    from slsr_ray.gan import GanConfig, actor_resources, train_gans

    table = train.slice(0, min(train.num_rows, 96))
    # the manifest schema has a "cluster" column (-1, not yet clustered): overwrite it with 3 clusters
    clusters = pa.array([i % 3 for i in range(table.num_rows)], pa.int64())
    table = table.set_column(table.schema.get_field_index("cluster"), "cluster", clusters)
    cfg = GanConfig(image_size=size["gan_size"], epochs=size["gan_epochs"], batch_size=16, ngf=16, ndf=16)
    cpus, gpus = actor_resources(cfg, 3)
    assert abs(gpus - 1 / 3) < 1e-6, f"3 GAN actors should share the GPU (1/3 each), got {gpus}"
    results = train_gans(table, os.path.join(tmp, "gan"), cfg, progress=False)
    devices = sorted({r["device"] for r in results.values()})
    return {"gpu_per_actor": gpus, "cpus_per_actor": cpus, "actors": len(results), "devices": devices}


def step_pipeline(size: dict, tmp: str) -> dict:
    from slsr_ray.pipeline import load_config, run_pipeline

    overrides = TINY_PIPELINE if size["pipeline"] is None else [*size["pipeline"], "baselines=[]"]
    summary = run_pipeline(load_config("synthetic", overrides, run_root=os.path.join(tmp, "run")), echo=print)
    metrics = summary["metrics"]["slsr"]["plain"]
    return {"rank1": metrics["rank1"], "mAP": metrics["mAP"]}


def _write(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="gpu")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA: Ray is told of one GPU that "
                   "every step falls back from (tests the script, not a GPU)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gpu_smoke.json"))
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    args = p.parse_args(argv)
    chosen = args.steps.split(",")
    if not chosen or set(chosen) - set(STEPS):
        p.error(f"--steps takes a comma-separated subset of {','.join(STEPS)}, got {args.steps!r}")

    import ray
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("error: no CUDA GPU here (torch.cuda.is_available() is False); pass --allow-cpu to run the same "
              "steps on CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, num_gpus=None if cuda else 1, configure_logging=False,
             object_store_memory=None if cuda else 300 * 1024 * 1024)
    size = SIZES[args.size]
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA; --allow-cpu, 1 GPU advertised)",
              "cuda": cuda, "torch": torch.__version__, "ray": ray.__version__, "size": args.size,
              "load_avg_1m": os.getloadavg()[0], "steps": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slsr-gpu-smoke-") as tmp:
        train, table = _dataset(tmp, max(size["images"], size["train_images"]))
        steps = {
            "extract": lambda: step_extract(size, tmp, table),
            "train": lambda: step_train(size, tmp, train),
            "kmeans_search": lambda: step_kmeans_search(size),
            "gan": lambda: step_gan(size, tmp, train),
            "pipeline": lambda: step_pipeline(size, tmp),
        }
        for name in chosen:
            fn = steps[name]
            print(f"[gpu-smoke] {name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                row = {"status": "ok", **fn()}
            except Exception as e:  # keep going: every step's outcome goes into the report
                traceback.print_exc()
                row = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
            row["seconds"] = time.perf_counter() - t0
            if row.get("cpu_images_per_s"):
                row["gpu_vs_cpu"] = row["images_per_s"] / row["cpu_images_per_s"]
            report["steps"][name] = row
            print(f"[gpu-smoke] {name}: {row['status']} in {row['seconds']:.1f}s", flush=True)
            _write(args.output, report)  # after every step: a run cut short still leaves its numbers
    report["total_s"] = time.perf_counter() - t_all
    ray.shutdown()
    _write(args.output, report)
    print(f"wrote {args.output} ({report['total_s']:.0f} s)")
    failed = [n for n, r in report["steps"].items() if r["status"] == "failed"]
    if failed:
        print(f"error: failed steps: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
