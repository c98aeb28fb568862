"""The DCGAN trainer of one cluster (:class:`GanTrainerCore`, wrapped as the Ray actor :data:`GanTrainer`):
resumable epochs, checkpoints that refuse other training settings, samples and loss curves."""

from __future__ import annotations

import io
import logging
import math
import os
import time

import numpy as np
import ray
import torch
from PIL import Image

from . import layout, storage
from .gan import (
    CHECKPOINT_FORMAT,
    GanCheckpointError,
    GanConfig,
    GanDataError,
    GanDivergedError,
    _check_arch,
    _derive_seed,
    _fingerprint,
    checkpoint_uri,
    generation_noise,
    load_checkpoint,
    load_cluster_images,
)
from .models.dcgan import build_dcgan, sample_noise

log = logging.getLogger("slsr_ray.gan")


class GanTrainerCore:
    """Trains the DCGAN of one cluster; plain class (usable in-process), wrapped as the actor :data:`GanTrainer`.

    ``__init__`` loads the cluster's images and, when ``gan_dir/c{c}/ckpt.pt`` exists, the last
    checkpoint, so a restarted actor (or a rerun) continues where the previous one stopped.
    """

    def __init__(self, cluster: int, paths: list[str], gan_dir: str, cfg: GanConfig, num_threads: int | None = None):
        self.cluster = int(cluster)
        self.cfg = cfg
        self.gan_dir = str(gan_dir)
        self.dir = layout.gan_cluster_dir(self.gan_dir, self.cluster)
        self.ckpt_uri = checkpoint_uri(self.gan_dir, self.cluster)
        if num_threads:
            torch.set_num_threads(num_threads)
        from .gpu import device_for, gpu_assigned

        self.device = device_for(gpu_assigned(), f"GAN actor of cluster {self.cluster}")
        self.arch = cfg.arch()
        self.fingerprint = _fingerprint(paths)
        self.num_assigned = len(paths)

        self.images, self.unreadable = load_cluster_images(paths, cfg.image_size, cfg.on_unreadable)
        n = len(self.images)
        if n < 2:
            raise GanDataError(
                f"cluster {self.cluster} has {n} readable image(s) of {len(paths)} assigned "
                f"({len(self.unreadable)} unreadable); a DCGAN needs at least 2"
            )
        if n < cfg.batch_size and cfg.min_images == "error":
            raise GanDataError(
                f"cluster {self.cluster} has {n} readable images, fewer than one batch ({cfg.batch_size}); "
                "lower batch_size, use fewer clusters, or set min_images='train' to train on what there is"
            )
        self._init_models()
        self.epoch = 0
        self.losses: list[dict] = []
        if storage.exists(self.ckpt_uri):
            self._load(self.ckpt_uri)
        self.loaded_epoch = self.epoch
        self.ready_at = time.time()

    # -- state
    def _init_models(self) -> None:
        torch.manual_seed(_derive_seed(self.cfg.seed, self.cluster, 1 << 30))
        self.G, self.D = (m.to(self.device) for m in build_dcgan(self.arch))
        betas = (self.cfg.beta1, 0.999)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=self.cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=self.cfg.lr, betas=betas)

    def _load(self, uri: str) -> None:
        ckpt = load_checkpoint(uri, self.device)
        _check_arch(uri, ckpt, self.arch)
        saved = ckpt.get("training", {})
        changed = {k: (saved.get(k), v) for k, v in self._training_settings().items() if saved.get(k) != v}
        if changed:
            what = ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in sorted(changed.items()))
            raise GanCheckpointError(
                f"{uri} was trained with other settings ({what}); a resume only continues the same "
                "config: use a new GAN folder, or remove this one to retrain"
            )
        if ckpt.get("fingerprint") != self.fingerprint:
            raise GanCheckpointError(
                f"{uri} was trained on another image set for cluster {self.cluster} "
                f"({ckpt.get('num_assigned')} images then, {self.num_assigned} now); "
                "the clustering changed: use a new GAN folder"
            )
        try:
            self.G.load_state_dict(ckpt["G"])
            self.D.load_state_dict(ckpt["D"])
            self.opt_g.load_state_dict(ckpt["opt_g"])
            self.opt_d.load_state_dict(ckpt["opt_d"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise GanCheckpointError(f"{uri} does not fit this DCGAN: {e}") from e
        self.epoch = int(ckpt["epoch"])
        self.losses = list(ckpt["losses"])[: self.epoch]

    def _training_settings(self) -> dict:
        """What the weights depend on besides the architecture and the images (epochs may grow)."""
        c = self.cfg
        return {"lr": c.lr, "beta1": c.beta1, "batch_size": c.batch_size, "seed": c.seed}

    def _save(self) -> None:
        state = {
            "training": self._training_settings(),
            "format": CHECKPOINT_FORMAT,
            "arch": self.arch.to_dict(),
            "cluster": self.cluster,
            "epoch": self.epoch,
            "num_images": len(self.images),
            "num_assigned": self.num_assigned,
            "fingerprint": self.fingerprint,
            "seed": self.cfg.seed,
            "losses": self.losses,
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        storage.write_bytes(self.ckpt_uri, buf.getvalue())  # atomic: a kill mid-write keeps the old one
        storage.write_json(layout.gan_losses(self.gan_dir, self.cluster), self.losses)

    def _restore_last_good(self) -> None:
        self._init_models()
        self.epoch, self.losses = 0, []
        if storage.exists(self.ckpt_uri):
            self._load(self.ckpt_uri)

    # -- training
    def _train_epoch(self, epoch: int) -> dict:
        cfg, n = self.cfg, len(self.images)
        rng = torch.Generator().manual_seed(_derive_seed(cfg.seed, self.cluster, epoch))
        order = torch.randperm(n, generator=rng)
        bs = min(cfg.batch_size, n)
        batches = [order[i : i + bs] for i in range(0, n, bs)]
        if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm cannot normalise a batch of one
            batches.pop()
        bce = torch.nn.BCEWithLogitsLoss()
        self.G.train()
        self.D.train()
        sums = np.zeros(4)
        t0 = time.perf_counter()
        for step, idx in enumerate(batches):
            real = self.images[idx].to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
            z = sample_noise(len(idx), cfg.nz, rng).to(self.device)
            ones = torch.ones(len(idx), device=self.device)
            zeros = torch.zeros(len(idx), device=self.device)
            fake = self.G(z)
            # D: real -> 1, fake -> 0
            self.opt_d.zero_grad(set_to_none=True)
            logit_real = self.D(real)
            logit_fake = self.D(fake.detach())
            loss_d = bce(logit_real, ones) + bce(logit_fake, zeros)
            loss_d.backward()
            self.opt_d.step()
            # G: non-saturating loss, -log D(G(z))
            self.opt_g.zero_grad(set_to_none=True)
            loss_g = bce(self.D(fake), ones)
            loss_g.backward()
            self.opt_g.step()
            values = (
                loss_d.item(), loss_g.item(),
                torch.sigmoid(logit_real).mean().item(), torch.sigmoid(logit_fake).mean().item(),
            )
            if not all(math.isfinite(v) for v in values[:2]):
                raise self._diverged(epoch, step, f"loss_d={values[0]} loss_g={values[1]}")
            sums += values
        mean = sums / len(batches)
        stats = {
            "epoch": epoch + 1,
            "loss_d": float(mean[0]),
            "loss_g": float(mean[1]),
            "d_real": float(mean[2]),
            "d_fake": float(mean[3]),
            "steps": len(batches),
            "seconds": time.perf_counter() - t0,
        }
        if max(stats["loss_d"], stats["loss_g"]) > cfg.max_loss:
            raise self._diverged(
                epoch, len(batches) - 1,
                f"epoch-mean loss_d={stats['loss_d']:.3g} loss_g={stats['loss_g']:.3g} above max_loss={cfg.max_loss}",
            )
        return stats

    def _diverged(self, epoch: int, step: int, what: str) -> GanDivergedError:
        kept = f"the last good checkpoint (epoch {self.epoch}) is kept at {self.ckpt_uri}" if self.epoch else (
            "no checkpoint was written yet"
        )
        self._restore_last_good()
        return GanDivergedError(
            f"DCGAN of cluster {self.cluster} diverged at epoch {epoch + 1}, step {step + 1}: {what}; {kept}. "
            f"Lower the learning rate (lr={self.cfg.lr}) or try d_activation='leaky'"
        )

    def train(self, epochs: int | None = None) -> dict:
        """Train up to ``epochs`` (default ``cfg.epochs``) total epochs, checkpointing after each one.

        Idempotent: epochs already in the checkpoint are not repeated, so a retried call (after an
        actor restart) or a rerun just continues. Returns a summary of this cluster's training.
        """
        epochs = self.cfg.epochs if epochs is None else int(epochs)
        started_at, start_epoch = time.time(), self.epoch
        for epoch in range(self.epoch, epochs):
            self.losses.append(self._train_epoch(epoch))
            self.epoch = epoch + 1
            self._save()
        if self.epoch > start_epoch or not storage.exists(layout.gan_samples(self.gan_dir, self.cluster)):
            self.write_plots()
        last = self.losses[-1] if self.losses else {}
        return {
            **self.quality(),
            "cluster": self.cluster,
            "epochs": self.epoch,
            "resumed_from_epoch": start_epoch,
            "num_images": len(self.images),
            "unreadable": len(self.unreadable),
            "unreadable_examples": self.unreadable[:5],
            "loss_d": last.get("loss_d"),
            "loss_g": last.get("loss_g"),
            "d_real": last.get("d_real"),
            "d_fake": last.get("d_fake"),
            "checkpoint": self.ckpt_uri,
            "ready_at": self.ready_at,
            "started_at": started_at,
            "finished_at": time.time(),
            "wall_s": time.time() - started_at,
            "device": str(self.device),
            "pid": os.getpid(),
        }

    def progress(self) -> int:
        return self.epoch

    # -- pictures for a person to look at
    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """The first ``n`` images :func:`generate_images` writes for this cluster (eval-mode G, [-1, 1])."""
        self.G.eval()
        return self.G(generation_noise(self.cfg.seed, self.cluster, range(n), self.cfg.nz).to(self.device)).cpu()

    @torch.no_grad()
    def quality(self, n: int = 64) -> dict:
        """Sample quality against this cluster's real images, on 16x16 thumbnails in [-1, 1]:
        ``diversity`` = mean pairwise distance of n samples / that of n real images (near 0: mode
        collapse, the samples are copies of each other) and ``realism`` = mean distance from a sample to
        its nearest real image / the same from a real image to its nearest other real image (1: samples
        sit as close to the data as the data to itself; large: they look like nothing in the cluster)."""
        n = min(n, len(self.images))
        pool = torch.nn.AdaptiveAvgPool2d(16)
        fake = pool(self.sample(n)).flatten(1)
        idx = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.cluster))[:n]
        real = pool(self.images[idx].float().div(127.5).sub(1.0)).flatten(1)

        def mean_pairwise(x: torch.Tensor) -> float:
            d = torch.cdist(x, x)
            return float(d.sum() / max(len(x) * (len(x) - 1), 1))

        rr = torch.cdist(real, real).fill_diagonal_(float("inf")).min(1).values.mean()
        fr = torch.cdist(fake, real).min(1).values.mean()
        return {"diversity": mean_pairwise(fake) / max(mean_pairwise(real), 1e-12),
                "realism": float(fr / max(rr, 1e-12)), "samples": n}

    def write_plots(self) -> None:
        """``samples.png`` (grid of generated images) and ``losses.png`` (curves per epoch)."""
        from torchvision.utils import make_grid

        grid = make_grid(self.sample(self.cfg.grid_size), nrow=8, normalize=True, value_range=(-1, 1))
        buf = io.BytesIO()
        Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()).save(buf, format="PNG")
        storage.write_bytes(layout.gan_samples(self.gan_dir, self.cluster), buf.getvalue())
        storage.write_bytes(storage.join(self.dir, layout.GAN_LOSS_PLOT), plot_losses(self.losses, self.cluster))


GanTrainer = ray.remote(GanTrainerCore)
"""The Ray actor: ``GanTrainer.options(num_gpus=g, max_restarts=r, max_task_retries=r).remote(...)``."""


def plot_losses(losses: list[dict], cluster: int) -> bytes:
    """PNG bytes of the D/G loss curves and D's mean outputs per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in losses]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(epochs, [r["loss_d"] for r in losses], marker=".", label="D loss")
    ax1.plot(epochs, [r["loss_g"] for r in losses], marker=".", label="G loss")
    ax1.set_xlabel("epoch")
    ax1.set_title(f"cluster {cluster}: losses")
    ax1.legend()
    ax2.plot(epochs, [r["d_real"] for r in losses], marker=".", label="D(x)")
    ax2.plot(epochs, [r["d_fake"] for r in losses], marker=".", label="D(G(z))")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("epoch")
    ax2.set_title("discriminator outputs")
    ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
