"""The Ray Train worker loop: setup (model, data, optimizer, resume), one epoch, the checkpoint."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import storage
from ..console import SHOW, worker_logging
from ..labels import make_strategy, slsr_loss
from ..losses import batch_hard_triplet_loss, smooth_real_targets, warmup_factor
from ..models.reid import WeightsError, build_model, load_model
from ..samplers import PKEpochSampler
from .config import STATE_FILE, TrainConfig, lr_factor
from .data import EpochSampler, ManifestDataset

log = logging.getLogger(__name__)



def _parse_fault(spec: str | None) -> dict | None:
    if not spec:
        return None
    parts = dict(p.split("=", 1) for p in spec.split(",") if "=" in p)
    return {
        "epoch": int(parts.get("epoch", -1)),
        "marker": parts.get("marker", ""),
        "nan_epoch": int(parts.get("nan_epoch", -1)),
    }


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A 63-bit seed for one rank's epoch, stable across processes and platforms."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def _load_init_weights(model: torch.nn.Module, uri: str) -> list[str]:
    """Copy weights from a save_checkpoint file; the classifier / noise layer are kept fresh where
    their shapes differ (e.g. CE pretraining -> all_in_one with C+1 outputs). Returns skipped keys."""
    src, _, _ = load_model(uri)
    src_state, own = src.state_dict(), model.state_dict()
    head = ("classifier.", "noise.", "bottleneck.")  # fresh when they do not fit (other C, other neck)
    missing = [k for k in own if k not in src_state and not k.startswith(head)]
    wrong = [k for k in own if k in src_state and src_state[k].shape != own[k].shape]
    wrong_body = [k for k in wrong if not k.startswith(head)]
    if missing or wrong_body:
        raise WeightsError(f"init checkpoint {uri} does not fit this model: missing {missing[:5]}, shapes {wrong_body[:5]}")
    keep = {k: v for k, v in src_state.items() if k in own and k not in wrong}
    model.load_state_dict(keep, strict=False)
    return sorted(set(own) - set(keep))


@dataclass
class _Worker:
    """Everything one Ray Train worker holds across epochs."""

    cfg: TrainConfig
    rows: dict
    rank: int
    world: int
    device: torch.device
    raw_model: torch.nn.Module
    model: torch.nn.Module  # DDP-wrapped (the same module for one worker)
    strategy: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: torch.utils.data.Sampler
    loader: object
    iters_per_epoch: int
    use_amp: bool
    fault: dict | None
    dist: bool
    start_epoch: int = 0
    history: list = field(default_factory=list)
    resumes: int = 0
    last_checkpoint_epoch: int | None = None


def _train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: set up (or resume), then train, report and checkpoint each epoch."""
    worker_logging()  # the epoch line below reaches the quiet console of `slsr` (see console.py)
    w = _setup(config)
    for epoch in range(w.start_epoch, w.cfg.epochs):
        metrics = _run_epoch(w, epoch)
        if metrics is None:
            _report_divergence(w, epoch, config["status_uri"])
            return
        _report_epoch(w, epoch, metrics)


def _setup(config: dict) -> _Worker:
    """Model, label strategy, data loader, optimizer and lr schedule of this rank; restored from Ray
    Train's checkpoint when the worker group restarts."""
    import ray.train
    import ray.train.torch

    from ..gpu import device_for

    cfg = TrainConfig.from_dict(config["train_cfg"])
    rows = config["rows"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # a worker Ray gave a GPU on a node without CUDA trains on CPU tensors (and says so once)
    ray_device = ray.train.torch.get_device()
    device = device_for(ray_device.type == "cuda", f"Ray Train worker {rank}")
    if device.type == "cuda":  # Ray Train's own choice: several ranks on one node share CUDA_VISIBLE_DEVICES
        device = ray_device
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    strategy = make_strategy(
        cfg.strategy, rows["num_ids"], membership=rows["membership"] or None, epsilon=cfg.epsilon, lam=cfg.lam
    )
    model = build_model(cfg.model, announce=rank == 0)
    if config.get("init_checkpoint"):
        skipped = _load_init_weights(model, config["init_checkpoint"])
        if rank == 0:
            log.info("initialised from %s (fresh: %s)", config["init_checkpoint"], skipped or "nothing")
    optimizer = torch.optim.SGD(model.parameter_groups(cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=False)
    sampler, loader = _data(cfg, rows, rank, world, device.type == "cuda")
    iters_per_epoch = len(sampler) // (cfg.batch_size // world)
    total_iters = iters_per_epoch * cfg.epochs
    warmup_iters = (cfg.warmup_epochs or 0) * iters_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: lr_factor(cfg.lr_policy, i, iters_per_epoch, total_iters, cfg) * warmup_factor(i, warmup_iters),
    )
    use_amp = cfg.amp and device.type == "cuda"
    w = _Worker(
        cfg=cfg, rows=rows, rank=rank, world=world, device=device, raw_model=model, model=model,
        strategy=strategy, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp), sampler=sampler, loader=loader,
        iters_per_epoch=iters_per_epoch, use_amp=use_amp, fault=_parse_fault(config.get("fault")),
        dist=torch.distributed.is_available() and torch.distributed.is_initialized(),
    )  # fmt: skip
    _restore(w)
    w.model = ray.train.torch.prepare_model(model, move_to_device=device)  # DDP across workers (no-op for one)
    return w


def _data(cfg: TrainConfig, rows: dict, rank: int, world: int, on_gpu: bool):
    """This rank's sampler (its shard of each epoch's real:generated mix; P x K batches for BoT) and loader."""
    import ray.train.torch

    from ..transforms import build_train_transform

    transform = build_train_transform(cfg.height, cfg.width, erasing_p=cfg.erasing_p, crop=cfg.crop,
                                      norm=cfg.model.input_norm)
    generated = [False] * rows["num_real"] + [True] * rows["num_generated"]
    dataset = ManifestDataset(rows["paths"], rows["pids"], rows["clusters"], generated, transform)
    per_worker_batch = cfg.batch_size // world
    if cfg.recipe == "bot":  # P identities x K images per batch for the triplet loss
        sampler = PKEpochSampler(rows["pids"][: rows["num_real"]], rows["num_generated"], per_worker_batch,
                                 cfg.pk_instances, cfg.generated_ratio, rank, world, cfg.seed)
    else:
        sampler = EpochSampler(rows["num_real"], rows["num_generated"], cfg.generated_ratio, rank, world, cfg.seed)
    if len(sampler) < per_worker_batch:
        raise ValueError(
            f"each of {world} workers gets {len(sampler)} images per epoch, fewer than its batch of "
            f"{per_worker_batch}: lower batch_size or num_workers"
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=per_worker_batch,
        sampler=sampler,
        num_workers=cfg.loader_workers,
        drop_last=True,  # BatchNorm needs > 1 sample, and every rank must run the same steps
        pin_memory=on_gpu,
        persistent_workers=cfg.loader_workers > 0,
    )
    return sampler, ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False, move_to_device=on_gpu)


def _restore(w: _Worker) -> None:
    """Continue from Ray Train's checkpoint when the worker group was restarted (or the run resumed)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    w.raw_model.load_state_dict(state["model"])
    w.optimizer.load_state_dict(state["optimizer"])
    w.scheduler.load_state_dict(state["scheduler"])
    w.scaler.load_state_dict(state["scaler"])
    w.start_epoch, w.history, w.resumes = state["epoch"] + 1, state["history"], state["resumes"] + 1
    w.last_checkpoint_epoch = state["epoch"]
    if w.rank == 0:
        # on the console too: a restart after a lost node is something the user should see
        log.info("resumed from the checkpoint of epoch %d (restart %d)", state["epoch"], w.resumes, extra=SHOW)


def _step_loss(w: _Worker, images, pids, clusters, is_gen) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one batch (the label strategy's targets, BoT's extra terms) and its correct real rows."""
    cfg = w.cfg
    with torch.autocast(w.device.type, enabled=w.use_amp):
        out = w.model(images)
    q, lam = w.strategy.targets(pids, clusters, is_gen, out["logits"])
    if cfg.recipe == "bot":
        q, lam = smooth_real_targets(q, lam, is_gen, w.rows["num_ids"], cfg.label_smoothing)
    if cfg.noise_layer_on == "all":
        log_probs = out["log_probs"]
    else:  # noisy (generated) rows through the transition matrix, clean rows without it
        log_probs = torch.where(is_gen[:, None], out["log_probs"], out["clean_log_probs"])
    loss = slsr_loss(log_probs, pids, q, lam)
    if cfg.recipe == "bot":  # real images only: generated ones (pid -1) have no identity
        loss = loss + cfg.triplet_weight * batch_hard_triplet_loss(out["pool"], pids, cfg.triplet_margin)
    real = ~is_gen
    correct = (out["logits"].detach()[real][:, : w.rows["num_ids"]].argmax(1) == pids[real]).sum()
    return loss, correct


def _run_epoch(w: _Worker, epoch: int) -> dict | None:
    """One epoch on this rank; the epoch's metrics summed over every rank, or None when the loss of any
    rank became NaN/inf (every rank stops at the same step)."""
    cfg, fault = w.cfg, w.fault
    w.sampler.set_epoch(epoch)
    # Augmentation and dropout draw from a stream that depends only on (seed, rank, epoch): ranks see
    # different crops and masks, and a run resumed from a checkpoint continues the same streams.
    torch.manual_seed(epoch_seed(cfg.seed, w.rank, epoch))
    np.random.seed(epoch_seed(cfg.seed, w.rank, epoch) % 2**32)
    w.model.train()
    t0 = time.perf_counter()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, samples, correct real, real samples
    for step, (images, pids, clusters, is_gen) in enumerate(w.loader):
        if (fault and epoch == fault["epoch"] and step == w.iters_per_epoch - 1 and w.rank == 0
                and not os.path.exists(fault["marker"])):
            open(fault["marker"], "w").close()
            log.warning("fault injection: rank 0 exits in epoch %d", epoch)
            os._exit(1)
        loss, correct = _step_loss(w, images, pids, clusters, is_gen)
        if fault and epoch == fault["nan_epoch"]:
            loss = loss * float("nan")
        stats = torch.stack([
            loss.detach().float() * len(pids), torch.tensor(float(len(pids)), device=w.device), correct.float(),
            (~is_gen).sum().float(), (~torch.isfinite(loss.detach())).float(),
        ])  # fmt: skip
        if w.dist:  # one small all-reduce per step: global stats and a consistent stop on NaN
            torch.distributed.all_reduce(stats)
        stats = stats.cpu()
        if stats[4] > 0:
            return None
        totals += stats[:4].double()
        w.optimizer.zero_grad(set_to_none=True)
        w.scaler.scale(loss).backward()
        w.scaler.step(w.optimizer)
        w.scaler.update()
        w.scheduler.step()
    elapsed = time.perf_counter() - t0
    return {
        "epoch": epoch,
        "loss": float(totals[0] / max(totals[1], 1)),
        "train_acc": float(totals[2] / max(totals[3], 1)),
        "lr": w.optimizer.param_groups[0]["lr"],
        "images": int(totals[1]),
        "epoch_s": elapsed,
        "images_per_s": float(totals[1] / max(elapsed, 1e-9)),
        "workers": w.world,
        "resumes": w.resumes,
    }


def _report_divergence(w: _Worker, epoch: int, status_uri: str) -> None:
    """Rank 0 records where the loss diverged (the driver raises TrainingDivergedError from it)."""
    import ray.train

    if w.rank == 0:
        status = {
            "status": "diverged",
            "epoch": epoch,
            "iteration": w.scheduler.last_epoch,
            "message": f"loss became NaN/inf at epoch {epoch}, global iteration {w.scheduler.last_epoch}",
            "last_good_epoch": w.last_checkpoint_epoch,
        }
        storage.write_json(status_uri, status)
        log.error("%s; stopping (last good checkpoint kept)", status["message"])
    ray.train.report({"epoch": epoch, "diverged": True})


def _report_epoch(w: _Worker, epoch: int, metrics: dict) -> None:
    """Report the epoch's metrics, with a checkpoint (rank 0's state) every ``checkpoint_every`` epochs
    and after the last one."""
    import ray.train

    cfg = w.cfg
    w.history = [*w.history, metrics]
    if w.rank == 0:
        log.info(
            "epoch %d/%d  loss %.4f  train-acc %.3f  lr %.5f  %.1f img/s over %d worker(s)",
            epoch + 1, cfg.epochs, metrics["loss"], metrics["train_acc"], metrics["lr"],
            metrics["images_per_s"], w.world, extra=SHOW,
        )  # fmt: skip
    if (epoch + 1) % cfg.checkpoint_every != 0 and epoch != cfg.epochs - 1:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0:
            state = {
                "model": {k: v.detach().cpu() for k, v in w.raw_model.state_dict().items()},
                "optimizer": w.optimizer.state_dict(),
                "scheduler": w.scheduler.state_dict(),
                "scaler": w.scaler.state_dict(),
                "epoch": epoch,
                "history": w.history,
                "resumes": w.resumes,
                "model_config": asdict(cfg.model),
            }
            torch.save(state, os.path.join(tmp, STATE_FILE))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
    w.last_checkpoint_epoch = epoch
