"""Re-id training with Ray Train (DDP): CE pretraining (step 1 of Algorithm 1) and the final training on
real + generated images with a label strategy (step 6) share one entry point, :func:`run_training`.

Data path: each Ray Train worker reads its shard of the manifests with a torch ``DataLoader``
(``slsr_ray.data.read_image`` for local paths and ``s3://`` URIs, DataLoader worker processes decode
in parallel), wrapped by ``ray.train.torch.prepare_data_loader`` for device placement. Sharding is
done by :class:`EpochSampler`, which also fixes the real:generated mix of every epoch, so it replaces
the ``DistributedSampler`` that ``prepare_data_loader`` would add. Why DataLoader and not Ray Data
``iter_torch_batches``: the per-image work is decode + random augmentation, which has to run per
epoch anyway, the manifests are small tables (paths, not pixels), and the loop keeps the exact
iteration count the inverse lr policy is defined on; ``benchmarks/bench_train.py`` measures the Ray
Train loop against a plain PyTorch loop on the same data.

Fault tolerance: rank 0 reports a checkpoint (model, optimizer, lr scheduler, AMP scaler, epoch, global
iteration, metric history) every ``checkpoint_every`` epochs; a restarted worker group resumes from
``ray.train.get_checkpoint()``, so a resume is idempotent. A non-finite loss on any worker stops every
worker at the same step, keeps the last good checkpoint and makes :func:`run_training` raise
:class:`TrainingDivergedError`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from . import layout, storage
from .config import config_hash, from_known_fields
from .console import SHOW, worker_logging
from .errors import SlsrError
from .labels import STRATEGIES, LabelStrategy, load_membership, make_strategy, slsr_loss
from .losses import batch_hard_triplet_loss, smooth_real_targets, warmup_factor
from .models.reid import ModelConfig, WeightsError, build_model, load_model, save_checkpoint
from .raysetup import init_ray
from .samplers import PKEpochSampler

log = logging.getLogger(__name__)

LR_POLICIES = ("inv", "step", "cosine")
RECIPES = ("paper", "bot")
NOISE_LAYER_ON = ("generated", "all")
MODEL_FILE = layout.MODEL_FILE
STATUS_FILE = "train_status.json"
STATE_FILE = "state.pt"
# test hooks, read on the driver and passed to the workers: "epoch=E,marker=PATH" makes rank 0 exit hard
# at the last step of epoch E (late, so the previous epoch's checkpoint is committed), once (PATH records that it happened), to exercise resume from a
# checkpoint with a real worker death; "nan_epoch=E" turns the loss of epoch E into NaN
FAULT_ENV = "SLSR_TRAIN_FAULT"


class TrainingDivergedError(SlsrError, RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Training settings; the defaults are the paper's step-6 settings (section 5.2) at 256x128 input.

    ``batch_size`` is the global batch (split evenly over ``num_workers``). ``lr_policy``: ``inv`` is
    the paper's lr(i) = lr0 (1 + gamma i)^-power with i the iteration; ``step`` multiplies by
    ``step_gamma`` every ``step_size`` epochs; ``cosine`` anneals to 0 over the run. ``lam`` is lambda
    for generated images (paper 1), ``epsilon`` the ``lsr`` smoothing. ``generated_ratio``: None uses
    every generated image each epoch (the paper); a number r draws r x (number of real images) generated
    images per epoch. ``noise_layer_on``: which images are scored through the noise adaptation layer
    (see :mod:`slsr_ray.models.reid`). ``use_gpu=None`` decides from ``ray.cluster_resources()``.
    ``model`` holds the :class:`ModelConfig` fields; ``num_classes`` is set from the data.

    ``recipe``: ``paper`` (the settings above) or ``bot``, the Bag-of-Tricks baseline on top of them
    (:mod:`slsr_ray.losses`, :mod:`slsr_ray.samplers`): BNNeck head (``model.neck``), label smoothing
    ``label_smoothing`` on the real images, a batch-hard triplet loss (``triplet_margin``, weight
    ``triplet_weight``) on real images only, PK batches of ``pk_instances`` images per identity, and a
    linear warm-up over ``warmup_epochs`` (None: 1/12 of the epochs, BoT's 10 of 120). The label strategy
    still decides the generated images' targets.
    """

    epochs: int = 130
    batch_size: int = 32
    lr: float = 0.01
    lr_policy: str = "inv"
    gamma: float = 0.1
    power: float = 0.025
    step_size: int = 40
    step_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    height: int = 256
    width: int = 128
    crop: str = "pad"
    erasing_p: float = 0.5
    strategy: str = "none"
    lam: float = 1.0
    epsilon: float = 0.1
    noise_layer_on: str = "generated"
    generated_ratio: float | None = None
    num_workers: int = 1
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0
    amp: bool = True
    loader_workers: int = 2
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    max_failures: int = 0
    checkpoint_every: int = 1
    num_to_keep: int = 2
    run_name: str = "ray_train"
    recipe: str = "paper"
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    triplet_weight: float = 1.0
    pk_instances: int = 4
    warmup_epochs: int | None = None

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if self.recipe == "bot":
            self.model.neck = "bnneck"
            if self.warmup_epochs is None:
                self.warmup_epochs = max(1, round(self.epochs / 12))
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}"),
            (self.lr_policy in LR_POLICIES, f"lr_policy must be one of {LR_POLICIES}, got {self.lr_policy!r}"),
            (self.noise_layer_on in NOISE_LAYER_ON, f"noise_layer_on must be one of {NOISE_LAYER_ON}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}"),
            (self.batch_size >= 2 * self.num_workers, "batch_size must give every worker >= 2 images (BatchNorm)"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.generated_ratio is None or self.generated_ratio >= 0, "generated_ratio must be >= 0 or None"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.recipe in RECIPES, f"recipe must be one of {RECIPES}, got {self.recipe!r}"),
            (self.recipe != "bot" or self.batch_size // self.num_workers >= 2 * self.pk_instances,
             f"recipe bot: each worker's batch ({self.batch_size} / {self.num_workers} workers) must hold 2 "
             f"identities x pk_instances ({self.pk_instances}) images"),
            (0 <= self.label_smoothing <= 1, f"label_smoothing must lie in [0, 1], got {self.label_smoothing}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return from_known_fields(cls, d)


@dataclass
class TrainResult:
    """``checkpoint``: URI of the final model (:func:`slsr_ray.models.load_model` format);
    ``metrics``: one dict per epoch; ``wall_s``: driver wall time; ``ray_checkpoint``: the last Ray
    Train checkpoint (with optimizer state); ``resumes``: worker-group restarts from a checkpoint."""

    checkpoint: str
    metrics: list[dict]
    wall_s: float
    ray_checkpoint: str | None = None
    resumes: int = 0


# ----------------------------------------------------------------------------------------- data


class ManifestDataset(torch.utils.data.Dataset):
    """Rows of a manifest as (image tensor, pid, cluster, is_generated)."""

    def __init__(self, paths: list[str], pids, clusters, generated, transform):
        self.paths = list(paths)
        self.pids = np.asarray(pids, dtype=np.int64)
        self.clusters = np.asarray(clusters, dtype=np.int64)
        self.generated = np.asarray(generated, dtype=bool)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .data import read_image

        img = self.transform(read_image(self.paths[i]))
        return img, int(self.pids[i]), int(self.clusters[i]), bool(self.generated[i])


class EpochSampler(torch.utils.data.Sampler):
    """Per-epoch index list: every real image plus generated images, shuffled, sharded over ranks.

    Real indices are ``0..num_real-1``, generated ``num_real..num_real+num_generated-1``.
    ``generated_ratio=None`` takes every generated image; r takes round(r * num_real) per epoch (without
    replacement while there are enough). Every rank gets the same count (the list is padded by wrapping)
    so DDP ranks run the same number of steps. Call :meth:`set_epoch` before each epoch."""

    def __init__(self, num_real, num_generated, generated_ratio=None, rank=0, world_size=1, seed=0):
        self.num_real, self.num_generated = num_real, num_generated
        self.generated_ratio = generated_ratio
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_size(self) -> int:
        if self.num_generated == 0:
            return self.num_real
        if self.generated_ratio is None:
            return self.num_real + self.num_generated
        return self.num_real + int(round(self.generated_ratio * self.num_real))

    def __len__(self) -> int:
        return math.ceil(self.epoch_size() / self.world_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])  # identical on every rank
        idx = [np.arange(self.num_real)]
        n_gen = self.epoch_size() - self.num_real
        if n_gen > 0:
            replace = n_gen > self.num_generated
            idx.append(self.num_real + rng.choice(self.num_generated, size=n_gen, replace=replace))
        order = rng.permutation(np.concatenate(idx))
        total = len(self) * self.world_size
        order = np.resize(order, total)  # wraps around to pad
        return iter(order[self.rank :: self.world_size].tolist())


def _as_table(manifest: str | pa.Table | None, what: str) -> pa.Table | None:
    if manifest is None:
        return None
    table = manifest if isinstance(manifest, pa.Table) else storage.read_table(manifest)
    from .data import to_manifest

    try:
        return to_manifest(table)
    except ValueError as e:
        raise ValueError(f"{what} manifest: {e}") from e


def prepare_rows(
    cfg: TrainConfig,
    train_manifest: str | pa.Table,
    generated_manifest: str | pa.Table | None = None,
    membership: dict[int, list[int]] | str | None = None,
) -> tuple[dict, LabelStrategy]:
    """Validate the manifests against the strategy; returns plain row lists for the workers and the
    strategy (built here once so that bad labels fail on the driver, before any worker starts)."""
    train = _as_table(train_manifest, "train")
    is_gen = pc.equal(train["source"], "generated")
    real = train.filter(pc.invert(is_gen))
    gen_parts = [train.filter(is_gen)]
    extra = _as_table(generated_manifest, "generated")
    if extra is not None:
        gen_parts.append(extra.filter(pc.equal(extra["source"], "generated")))
        if gen_parts[-1].num_rows != extra.num_rows:
            raise ValueError("generated manifest has rows whose source is not 'generated'")
    gen = pa.concat_tables([g.select(real.column_names) for g in gen_parts]) if gen_parts else None
    if real.num_rows == 0:
        raise ValueError("train manifest has no real images")
    pids = real["pid"].to_numpy()
    uniq = np.unique(pids)
    if uniq[0] != 0 or uniq[-1] != len(uniq) - 1:
        raise ValueError(
            f"train identities must be relabelled 0..N-1 (load_dataset does this); got {len(uniq)} ids "
            f"ranging {uniq[0]}..{uniq[-1]}"
        )
    num_ids = len(uniq)
    if isinstance(membership, str):
        membership = load_membership(membership)
    strategy = make_strategy(cfg.strategy, num_ids, membership=membership, epsilon=cfg.epsilon, lam=cfg.lam)
    if gen is not None and gen.num_rows and not strategy.uses_generated:
        if extra is not None:
            raise ValueError(
                f"strategy {cfg.strategy!r} trains on real images only; drop the generated manifest or "
                "pick lsro/all_in_one/pseudo/slsr"
            )
        log.info("strategy %s: excluding %d generated rows of the train manifest", cfg.strategy, gen.num_rows)
        gen = None
    if gen is not None and gen.num_rows:
        # every distinct cluster once through the strategy: raises on cluster -1 / unknown clusters
        clusters = np.unique(gen["cluster"].to_numpy())
        n = len(clusters)
        logits = torch.zeros(n, strategy.num_outputs())
        strategy.targets(torch.full((n,), -1), torch.as_tensor(clusters), torch.ones(n, dtype=torch.bool), logits)
    else:
        gen = real.slice(0, 0)
    rows = {
        "paths": real["path"].to_pylist() + gen["path"].to_pylist(),
        "pids": np.concatenate([pids, np.full(gen.num_rows, -1)]).tolist(),
        "clusters": np.concatenate([np.full(real.num_rows, -1), gen["cluster"].to_numpy()]).tolist(),
        "num_real": real.num_rows,
        "num_generated": gen.num_rows,
        "num_ids": num_ids,
        "membership": {int(k): list(v) for k, v in (membership or {}).items()},
    }
    return rows, strategy


# ---------------------------------------------------------------------------------- lr policies


def lr_factor(policy: str, iteration: int, iters_per_epoch: int, total_iters: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based global mini-batch index)."""
    if policy == "inv":
        return (1 + cfg.gamma * iteration) ** (-cfg.power)
    if policy == "step":
        return cfg.step_gamma ** ((iteration // max(iters_per_epoch, 1)) // cfg.step_size)
    return 0.5 * (1 + math.cos(math.pi * min(iteration / max(total_iters, 1), 1.0)))


# ---------------------------------------------------------------------------------- the worker


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


def _train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    worker_logging()  # the epoch line below reaches the quiet console of `slsr` (see console.py)
    cfg = TrainConfig.from_dict(config["train_cfg"])
    rows = config["rows"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    from .gpu import device_for

    # a worker Ray gave a GPU on a node without CUDA trains on CPU tensors (and says so once)
    device = device_for(ray.train.torch.get_device().type == "cuda", f"Ray Train worker {rank}")
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)

    strategy = make_strategy(
        cfg.strategy, rows["num_ids"], membership=rows["membership"] or None, epsilon=cfg.epsilon, lam=cfg.lam
    )
    model = build_model(cfg.model, announce=rank == 0)
    if config.get("init_checkpoint"):
        skipped = _load_init_weights(model, config["init_checkpoint"])
        if rank == 0:
            log.info("initialised from %s (fresh: %s)", config["init_checkpoint"], skipped or "nothing")
    raw_model = model
    optimizer = torch.optim.SGD(
        raw_model.parameter_groups(cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=False
    )

    from .transforms import build_train_transform

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
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False, move_to_device=on_gpu)
    iters_per_epoch = len(sampler) // per_worker_batch
    total_iters = iters_per_epoch * cfg.epochs
    warmup_iters = (cfg.warmup_epochs or 0) * iters_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: lr_factor(cfg.lr_policy, i, iters_per_epoch, total_iters, cfg) * warmup_factor(i, warmup_iters),
    )
    use_amp = cfg.amp and on_gpu
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, history, resumes, last_checkpoint_epoch = 0, [], 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history, resumes = state["epoch"] + 1, state["history"], state["resumes"] + 1
        last_checkpoint_epoch = state["epoch"]
        if rank == 0:
            log.info("resumed from the checkpoint of epoch %d (restart %d)", state["epoch"], resumes)
    model = ray.train.torch.prepare_model(raw_model, move_to_device=device)  # DDP across workers (no-op for one)
    fault = _parse_fault(config.get("fault"))
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()

    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        # Augmentation and dropout draw from a stream that depends only on (seed, rank, epoch): ranks
        # see different crops and masks, and a run resumed from a checkpoint continues the same streams.
        torch.manual_seed(epoch_seed(cfg.seed, rank, epoch))
        np.random.seed(epoch_seed(cfg.seed, rank, epoch) % 2**32)
        model.train()
        t0 = time.perf_counter()
        # [loss sum, samples, correct real, real samples, non-finite flag] summed over the epoch
        totals = torch.zeros(4, dtype=torch.float64)
        diverged = False
        for step, (images, pids, clusters, is_gen) in enumerate(loader):
            if fault and epoch == fault["epoch"] and step == iters_per_epoch - 1 and rank == 0 and not os.path.exists(fault["marker"]):
                open(fault["marker"], "w").close()
                log.warning("fault injection: rank 0 exits in epoch %d", epoch)
                os._exit(1)
            with torch.autocast(device.type, enabled=use_amp):
                out = model(images)
            q, lam = strategy.targets(pids, clusters, is_gen, out["logits"])
            if cfg.recipe == "bot":
                q, lam = smooth_real_targets(q, lam, is_gen, rows["num_ids"], cfg.label_smoothing)
            if cfg.noise_layer_on == "all":
                log_probs = out["log_probs"]
            else:  # noisy (generated) rows through the transition matrix, clean rows without it
                log_probs = torch.where(is_gen[:, None], out["log_probs"], out["clean_log_probs"])
            loss = slsr_loss(log_probs, pids, q, lam)
            if cfg.recipe == "bot":  # real images only: generated ones (pid -1) have no identity
                loss = loss + cfg.triplet_weight * batch_hard_triplet_loss(out["pool"], pids, cfg.triplet_margin)
            if fault and epoch == fault["nan_epoch"]:
                loss = loss * float("nan")
            real = ~is_gen
            correct = (out["logits"].detach()[real][:, : rows["num_ids"]].argmax(1) == pids[real]).sum()
            stats = torch.stack(
                [
                    loss.detach().float() * len(pids),
                    torch.tensor(float(len(pids)), device=device),
                    correct.float(),
                    real.sum().float(),
                    (~torch.isfinite(loss.detach())).float(),
                ]
            )
            if dist:  # one small all-reduce per step: global stats and a consistent stop on NaN
                torch.distributed.all_reduce(stats)
            stats = stats.cpu()
            if stats[4] > 0:
                diverged = True
                break
            totals += stats[:4].double()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        elapsed = time.perf_counter() - t0
        if diverged:
            if rank == 0:
                status = {
                    "status": "diverged",
                    "epoch": epoch,
                    "iteration": scheduler.last_epoch,
                    "message": f"loss became NaN/inf at epoch {epoch}, global iteration {scheduler.last_epoch}",
                    "last_good_epoch": last_checkpoint_epoch,
                }
                storage.write_json(config["status_uri"], status)
                log.error("%s; stopping (last good checkpoint kept)", status["message"])
            ray.train.report({"epoch": epoch, "diverged": True})
            return
        metrics = {
            "epoch": epoch,
            "loss": float(totals[0] / max(totals[1], 1)),
            "train_acc": float(totals[2] / max(totals[3], 1)),
            "lr": optimizer.param_groups[0]["lr"],
            "images": int(totals[1]),
            "epoch_s": elapsed,
            "images_per_s": float(totals[1] / max(elapsed, 1e-9)),
            "workers": world,
            "resumes": resumes,
        }
        history = [*history, metrics]
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.4f  train-acc %.3f  lr %.5f  %.1f img/s over %d worker(s)",
                epoch + 1, cfg.epochs, metrics["loss"], metrics["train_acc"], metrics["lr"],
                metrics["images_per_s"], world, extra=SHOW,
            )  # fmt: skip
        last = epoch == cfg.epochs - 1
        if (epoch + 1) % cfg.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    state = {
                        "model": {k: v.detach().cpu() for k, v in raw_model.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "resumes": resumes,
                        "model_config": asdict(cfg.model),
                    }
                    torch.save(state, os.path.join(tmp, STATE_FILE))
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
            last_checkpoint_epoch = epoch
        else:
            ray.train.report(metrics)


# ---------------------------------------------------------------------------------- the driver


# Fields that may change between a run and its resumption: more epochs continue the same run (the sweep
# trains in chunks this way), the others only steer checkpointing and retries.
RESUMABLE_FIELDS = ("epochs", "max_failures", "checkpoint_every", "num_to_keep", "run_name")


def resume_key(cfg: TrainConfig, rows: dict, init_checkpoint: str | None) -> str:
    """Hash of everything a training run's weights depend on: its Ray Train storage is named by it, so
    Ray Train (which restores a finished run from the same name) only ever continues the same config;
    the init checkpoint counts by content, since a retrained step-1 model keeps its URI."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_FIELDS}
    init = None
    if init_checkpoint:
        init = hashlib.sha256(storage.read_bytes(init_checkpoint)).hexdigest()
    return config_hash("train-run", settings, rows, init)


def _gpu_workers(cfg: TrainConfig) -> tuple[bool, int, float]:
    """(use_gpu, num_workers, CPUs per worker). ``use_gpu=None``: one GPU per worker when the cluster has
    GPUs, with fewer workers (same global batch) when it has GPUs for fewer than ``num_workers`` (DDP
    ranks cannot share a GPU, and a worker group that does not fit waits forever); ``use_gpu=True`` with
    too few GPUs is a :class:`~slsr_ray.gpu.GpuRequestError`."""
    from . import gpu

    if cfg.use_gpu is False:
        return False, cfg.num_workers, cfg.cpus_per_worker
    nodes = gpu.gpu_nodes()
    places = gpu.slots(1.0, nodes)
    if cfg.use_gpu:
        gpu.check_request(1.0, cfg.num_workers, f"train.use_gpu=true with {cfg.num_workers} worker(s)", together=True)
    elif places == 0:
        return False, cfg.num_workers, cfg.cpus_per_worker
    workers = min(cfg.num_workers, places)
    if workers < cfg.num_workers:
        log.warning("the Ray cluster has whole GPUs for %d of %d train workers: training with %d GPU worker(s), "
                    "same global batch", places, cfg.num_workers, workers)
    return True, workers, max(0.01, gpu.cpus_beside(workers, 1.0, cfg.cpus_per_worker, nodes))


def run_training(
    cfg: TrainConfig,
    train_manifest: str | pa.Table,
    output_dir: str,
    generated_manifest: str | pa.Table | None = None,
    membership: dict[int, list[int]] | str | None = None,
    init_checkpoint: str | None = None,
) -> TrainResult:
    """Train the re-id model with Ray Train DDP; writes ``output_dir/model.pt`` and ``metrics.json``.

    ``train_manifest`` holds the real images (train pids 0..N-1; rows marked ``source=generated`` are
    used as generated images); ``generated_manifest`` adds generated rows (pid -1, ``cluster`` = the
    GAN's cluster); ``membership`` is ``{cluster: [pids]}`` or the URI of the clustering stage's JSON
    (needed by ``slsr``). ``init_checkpoint`` starts from a :func:`save_checkpoint` file, e.g. the CE
    pretraining result. Ray is initialised if needed. Raises :class:`TrainingDivergedError` on a
    NaN/inf loss (the last good Ray checkpoint stays under ``output_dir``)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from . import gpu

    t0 = time.perf_counter()
    output_dir = storage.absolute(output_dir)
    storage.check_writable(output_dir)
    rows, strategy = prepare_rows(cfg, train_manifest, generated_manifest, membership)
    model_cfg = ModelConfig.from_dict({**asdict(cfg.model), "num_classes": strategy.num_outputs()})
    cfg = TrainConfig.from_dict({**asdict(cfg), "model": model_cfg})
    init_ray()
    use_gpu, num_workers, cpus_per_worker = _gpu_workers(cfg)
    if num_workers != cfg.num_workers:
        cfg = TrainConfig.from_dict({**asdict(cfg), "num_workers": num_workers})
    status_uri = storage.join(output_dir, STATUS_FILE)
    storage.remove(status_uri)
    log.info(
        "training %s: %d real + %d generated images, %d identities, %d outputs, %d worker(s) on %s",
        cfg.strategy, rows["num_real"], rows["num_generated"], rows["num_ids"], model_cfg.num_classes,
        cfg.num_workers, "GPU" if use_gpu else "CPU",
    )  # fmt: skip
    loop_config = {
        "train_cfg": asdict(cfg),
        "rows": rows,
        "init_checkpoint": init_checkpoint,
        "status_uri": status_uri,
        "fault": os.environ.get(FAULT_ENV),
    }
    if storage.is_s3(output_dir):
        # a filesystem that carries no credentials: each worker uses its own node's
        storage_fs, storage_path = storage.portable_filesystem(output_dir)
    else:
        storage_path, storage_fs = os.path.abspath(output_dir), None
    resources = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    run_name = f"{cfg.run_name}-{resume_key(cfg, rows, init_checkpoint)}"
    log.info("Ray Train run %s under %s (resumes only a run with this exact config)", run_name, output_dir)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=loop_config,
        # NCCL, or gloo where a GPU node has no CUDA (its workers then train on CPU tensors)
        torch_config=TorchConfig(backend=gpu.ddp_backend()) if use_gpu else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
        ),
    )
    result = trainer.fit()
    ray_ckpt = result.checkpoint
    ray_ckpt_path = (f"s3://{ray_ckpt.path}" if storage.is_s3(output_dir) else ray_ckpt.path) if ray_ckpt else None
    if storage.exists(status_uri):
        status = storage.read_json(status_uri)
        raise TrainingDivergedError(
            f"{status['message']}; training stopped. Last good checkpoint: {ray_ckpt_path or 'none (no epoch finished)'}"
            f" (epoch {status['last_good_epoch']}). Lower the learning rate or check the input data."
        )
    if ray_ckpt is None:
        raise RuntimeError(f"training under {output_dir} finished without a checkpoint")
    with ray_ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    model = build_model(model_cfg, announce=False)
    model.load_state_dict(state["model"])
    history = state["history"]
    model_uri = storage.join(output_dir, MODEL_FILE)
    extra = {
        "strategy": cfg.strategy,
        "epochs": cfg.epochs,
        "num_ids": rows["num_ids"],
        "height": cfg.height,
        "width": cfg.width,
        "history": history,
    }
    save_checkpoint(model_uri, model, model_cfg, extra)
    wall = time.perf_counter() - t0
    storage.write_json(
        storage.join(output_dir, layout.METRICS_FILE),
        {"config": asdict(cfg), "history": history, "wall_s": wall, "checkpoint": model_uri},
    )
    return TrainResult(model_uri, history, wall, ray_ckpt_path, resumes=int(state["resumes"]))


# ---------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    table: pa.Table,
    height: int,
    width: int,
    feature: str = "pool",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Retrieval features of every row of ``table`` (in-process, for small sets), as the extract stage
    computes them (not normalised: the evaluation's ``metric`` decides)."""
    from .data import read_image
    from .transforms import build_test_transform

    transform = build_test_transform(height, width, norm=model.cfg.input_norm)
    paths = table["path"].to_pylist()
    model = model.to(device).eval()
    feats = []
    for i in range(0, len(paths), batch_size):
        batch = torch.stack([transform(read_image(p)) for p in paths[i : i + batch_size]]).to(device)
        feats.append(model.extract(batch, feature=feature).float().cpu())
    return torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32)


def evaluate_checkpoint(
    checkpoint_uri: str,
    query_table: pa.Table,
    gallery_table: pa.Table,
    feature: str = "pool",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    max_rank: int = 50,
    metric: str = "euclidean",
) -> dict:
    """Rank-k / mAP / mINP of a trained checkpoint on query/gallery manifests, with the same features
    and distance (``metric``, default the pipeline's ``evaluate.metric``) as the pipeline's evaluation.
    Returns rank1/5/10/20, mAP, mINP, num_valid_queries and the full cmc list."""
    from .evaluate import evaluate_features  # the evaluation layer; imported lazily

    model, _, extra = load_model(checkpoint_uri, map_location=device)
    height, width = int(extra.get("height", 256)), int(extra.get("width", 128))
    qf = extract_features(model, query_table, height, width, feature, batch_size, device)
    gf = extract_features(model, gallery_table, height, width, feature, batch_size, device)
    res = evaluate_features(
        qf, gf,
        query_table["pid"].to_numpy(), gallery_table["pid"].to_numpy(),
        query_table["camid"].to_numpy(), gallery_table["camid"].to_numpy(),
        metric=metric, max_rank=min(max_rank, gallery_table.num_rows),
    )  # fmt: skip
    cmc = np.asarray(res["cmc"])
    out = {f"rank{r}": float(cmc[min(r, len(cmc)) - 1]) for r in (1, 5, 10, 20)}
    out.update(
        mAP=float(res["mAP"]),
        mINP=float(res["mINP"]),
        num_valid_queries=int(res["num_valid_queries"]),
        cmc=cmc.tolist(),
        feature=feature,
        metric=metric,
    )
    return out
