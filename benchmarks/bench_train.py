"""Images/s of the Ray Train loop (``slsr_ray.train.run_training``, 1 worker) vs a plain PyTorch loop on
the same model, data, batch size, loss and thread count, in one process.

Steady-state throughput comes from epochs after the first (warm-up); the Ray numbers are the loop's own
per-epoch ``images_per_s`` metric, and the Ray start-up + checkpoint cost is reported separately
(``ours_wall_s`` vs ``peer_wall_s``). ``ratio`` = ours images/s / peer images/s (target >= 0.85).

Sizes: ``small`` (CPU, resnet18 at 128x64, batch 32, synthetic data; < 2 min), ``market`` (resnet50 at
256x128, batch 32 and 128, AMP when a GPU is there: the paper's setting on synthetic images).

    python benchmarks/bench_train.py [small|market]
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch
from common import chosen_size, report, size_parser

SIZES = {
    "small": dict(num_ids=60, images_per_id=8, backbone="resnet18", height=128, width=64, batches=[32], epochs=3),
    "market": dict(num_ids=200, images_per_id=10, backbone="resnet50", height=256, width=128, batches=[32, 128], epochs=3),
}


def _plain_loop(cfg, rows, strategy, device, epochs: int) -> tuple[list[float], float]:
    """The same training step without Ray: returns per-epoch images/s and the wall time."""
    from slsr_ray.labels import slsr_loss
    from slsr_ray.models import build_model
    from slsr_ray.train import EpochSampler, ManifestDataset, lr_factor
    from slsr_ray.transforms import build_train_transform

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, announce=False).to(device)
    opt = torch.optim.SGD(model.parameter_groups(cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    n = len(rows["paths"])
    dataset = ManifestDataset(
        rows["paths"], rows["pids"], rows["clusters"], [False] * n,
        build_train_transform(cfg.height, cfg.width, erasing_p=cfg.erasing_p, crop=cfg.crop),
    )  # fmt: skip
    sampler = EpochSampler(rows["num_real"], 0, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.loader_workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=cfg.loader_workers > 0,
    )  # fmt: skip
    iters = len(sampler) // cfg.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(cfg.lr_policy, i, iters, iters * epochs, cfg))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    rates = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        start, seen = time.perf_counter(), 0
        for images, pids, clusters, is_gen in loader:
            images, pids = images.to(device, non_blocking=True), pids.to(device)
            with torch.autocast(device.type, enabled=use_amp):
                out = model(images)
            q, lam = strategy.targets(pids, clusters.to(device), is_gen.to(device), out["logits"])
            loss = slsr_loss(out["clean_log_probs"], pids, q, lam)
            loss_value = loss.detach().float().cpu()  # the Ray loop syncs once per step too (NaN check)
            if not torch.isfinite(loss_value):
                raise RuntimeError("NaN loss in the plain loop")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen += len(pids)
        rates.append(seen / (time.perf_counter() - start))
    return rates, time.perf_counter() - t0


def run(size: str = "small") -> list[dict]:
    import ray

    from slsr_ray.data import load_dataset, make_synthetic
    from slsr_ray.models import ModelConfig
    from slsr_ray.train import TrainConfig, prepare_rows, run_training

    spec = SIZES[size]
    gpu = torch.cuda.is_available()
    cpus = os.cpu_count() or 1
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="bench-train-")
    root = os.path.join(work, "data")
    make_synthetic(root, num_ids=spec["num_ids"], images_per_id=spec["images_per_id"], cams=4, seed=0,
                   size=(spec["height"], spec["width"]), num_distractors=0, num_junk=0)  # fmt: skip
    train = load_dataset("synthetic", root).train
    # same threads for both: the Ray worker gets every CPU; DataLoader processes only where cores allow
    loader_workers = min(4, max(cpus - 2, 0)) if gpu else 0
    torch.set_num_threads(cpus)
    rows_out = []
    for batch in spec["batches"]:
        cfg = TrainConfig(
            epochs=spec["epochs"], batch_size=batch, lr=0.01, height=spec["height"], width=spec["width"],
            num_workers=1, use_gpu=gpu, cpus_per_worker=cpus if not gpu else 1, loader_workers=loader_workers,
            amp=True, erasing_p=0.5, strategy="none", model=ModelConfig(backbone=spec["backbone"]),
        )  # fmt: skip
        rows, strategy = prepare_rows(cfg, train)
        from dataclasses import replace

        cfg_plain = replace(cfg, model=replace(cfg.model, num_classes=strategy.num_outputs()))
        device = torch.device("cuda" if gpu else "cpu")
        peer_rates, peer_wall = _plain_loop(cfg_plain, rows, strategy, device, spec["epochs"])
        result = run_training(cfg, train, os.path.join(work, f"ray-b{batch}"))
        ours_rates = [m["images_per_s"] for m in result.metrics]
        ours_ips, peer_ips = float(np.mean(ours_rates[1:])), float(np.mean(peer_rates[1:]))
        images = result.metrics[-1]["images"]
        rows_out.append(
            {
                "name": f"train_{spec['backbone']}_{spec['height']}x{spec['width']}_b{batch}_{'gpu_amp' if gpu else 'cpu'}",
                "ours_s": images / ours_ips,
                "peer": "plain PyTorch loop",
                "peer_s": images / peer_ips,
                "ratio": ours_ips / peer_ips,
                "ours_images_per_s": ours_ips,
                "peer_images_per_s": peer_ips,
                "images_per_epoch": images,
                "ours_wall_s": result.wall_s,
                "peer_wall_s": peer_wall,
                "device": torch.cuda.get_device_name(0) if gpu else f"cpu x{cpus}",
            }
        )
    return rows_out


def main(argv: list[str] | None = None) -> list[dict]:
    args = size_parser(__doc__, SIZES).parse_args(argv)
    size = chosen_size(args)
    cols = ["name", "ours_images_per_s", "peer_images_per_s", "ratio", "ours_wall_s", "peer_wall_s"]
    return report("train", size, run(size), cols)


if __name__ == "__main__":
    main()
