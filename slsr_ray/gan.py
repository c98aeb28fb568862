"""Step 4 of Algorithm 1: one DCGAN per k-means cluster, trained as one Ray actor per cluster.

Artifacts under ``gan_dir`` (a local path or ``s3://`` URI)::

    gan_dir/gan.json            config and per-cluster results of the last ``train_gans``
    gan_dir/c{c}/ckpt.pt        G, D and both Adam states after the last finished epoch
    gan_dir/c{c}/losses.json    per-epoch D/G losses, D(x), D(G(z)), seconds
    gan_dir/c{c}/samples.png    8x8 grid of the first 64 images ``generate_images`` will write
    gan_dir/c{c}/losses.png     loss curves

Generation from these checkpoints (step 5) is :mod:`slsr_ray.generate`.

Fault tolerance: each actor is created with ``max_restarts`` and ``max_task_retries``; when Ray
restarts one (node loss, ``ray.kill(a, no_restart=False)``), ``__init__`` runs again and loads the
last checkpoint, and the in-flight ``train()`` call is re-executed and continues from that epoch.
Every epoch draws its shuffling and noise from a generator seeded by (seed, cluster, epoch), so a
resumed run repeats no work and sees the same data order it would have seen.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from PIL import Image

from . import layout, storage
from .config import from_known_fields
from .data import ImageReadError, read_image
from .errors import SlsrError
from .models.dcgan import DCGANArch, build_dcgan, sample_noise
from .raysetup import init_ray

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


# samples that vary less than this share of the real images' variation count as mode collapse (samples
# that are near-copies of each other); smooth, blurry but varied samples of a short training score
# about 0.1-0.3 on 16x16 thumbnails, a generator that ignores its noise scores ~0
COLLAPSE_DIVERSITY = 0.05


class GanError(SlsrError, RuntimeError):
    """Base class for errors of the GAN stage."""


class GanDivergedError(GanError):
    """Training produced NaN/inf or exploding losses; the last good checkpoint is kept."""


class GanCheckpointError(GanError):
    """A checkpoint does not match this run (other architecture, other images) or is not a DCGAN checkpoint."""


class GanDataError(GanError, ValueError):
    """A cluster's images are missing, unreadable or too few."""


@dataclass
class GanConfig:
    """Settings of the per-cluster DCGANs (defaults: the paper, section 4.2 and 5.1)."""

    image_size: int = 128  # square side G generates and D sees (multiple of 16; 64 or 32 for CPU demos)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    nz: int = 100
    ngf: int = 64  # G channels at the last hidden layer (paper: 64 -> 512/256/128/64)
    ndf: int = 64
    d_activation: str = "relu"  # paper: BN + ReLU in D; "leaky" = DCGAN's LeakyReLU(0.2)
    num_gpus: float | None = None  # per actor; None: 1 if the Ray cluster has GPUs (shared if fewer than K)
    num_cpus: float | None = None  # per actor; None: the cluster's CPUs split across the K actors (max 8)
    max_restarts: int = 3  # Ray restarts of a crashed/killed actor; the call is retried as often
    seed: int = 0
    min_images: str = "train"  # cluster smaller than one batch: "train" on what there is, or "error"
    on_unreadable: str = "skip"  # unreadable image: "skip" (counted in the result) or "error"
    max_loss: float = 100.0  # an epoch-mean D or G loss above this counts as diverged (as does NaN/inf)
    grid_size: int = 64  # images in samples.png

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm needs 2 samples), got {self.batch_size}")
        if self.min_images not in ("train", "error"):
            raise ValueError(f"min_images must be 'train' or 'error', got {self.min_images!r}")
        if self.on_unreadable not in ("skip", "error"):
            raise ValueError(f"on_unreadable must be 'skip' or 'error', got {self.on_unreadable!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        self.arch()  # validates image_size / nz / ngf / ndf / d_activation

    def arch(self) -> DCGANArch:
        return DCGANArch(self.image_size, self.nz, self.ngf, self.ndf, self.d_activation)

    @classmethod
    def from_dict(cls, d: dict) -> GanConfig:
        return from_known_fields(cls, d)


# ----------------------------------------------------------------------------------------------- seeds


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes and Python versions)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generation_noise(seed: int, cluster: int, indices, nz: int) -> torch.Tensor:
    """z of generated image ``i`` of ``cluster``: depends only on (seed, cluster, i), so the images for a
    count n are a prefix of those for any larger count."""
    z = [np.random.default_rng([seed, cluster, int(i)]).uniform(-1.0, 1.0, nz) for i in indices]
    return torch.from_numpy(np.asarray(z, dtype=np.float32).reshape(len(z), nz))


# ----------------------------------------------------------------------------------------- inputs


def load_assignments(source: str | os.PathLike | pa.Table) -> pa.Table:
    """The clustering stage's assignments: a table, an ``assignments.parquet`` URI, or a ``k{K}`` folder.

    Needs columns ``path`` and ``cluster`` (``pid``/``camid`` are carried along when present). Rows
    with a negative cluster (unassigned) are dropped.
    """
    if isinstance(source, pa.Table):
        table = source
    else:
        uri = str(source)
        if not uri.endswith(".parquet"):
            uri = storage.join(uri, layout.ASSIGNMENTS)
        if not storage.exists(uri):
            raise GanDataError(
                f"cluster assignments {uri} do not exist; pass the clustering stage's k{{K}} folder or its "
                "assignments.parquet (columns path, pid, camid, cluster)"
            )
        table = storage.read_table(uri)
    missing = [c for c in ("path", "cluster") if c not in table.column_names]
    if missing:
        raise GanDataError(
            f"cluster assignments lack columns {missing} (have {table.column_names}); expected path, pid, "
            "camid, cluster"
        )
    table = table.set_column(table.schema.get_field_index("cluster"), "cluster", pc.cast(table["cluster"], pa.int64()))
    table = table.filter(pc.greater_equal(table["cluster"], 0))
    if table.num_rows == 0:
        raise GanDataError("cluster assignments hold no rows with a cluster id >= 0")
    return table


def cluster_paths(table: pa.Table) -> dict[int, list[str]]:
    """Image paths per cluster id, in the table's order."""
    clusters = table["cluster"].to_numpy()
    paths = table["path"].to_pylist()
    out: dict[int, list[str]] = {}
    for c in np.unique(clusters):
        out[int(c)] = [paths[i] for i in np.flatnonzero(clusters == c)]
    return out


def load_cluster_images(
    paths: list[str], image_size: int, on_unreadable: str = "skip", threads: int = 8
) -> tuple[torch.Tensor, list[str]]:
    """Decode and resize ``paths`` to square ``image_size`` crops (LSRO's square DCGAN input).

    Returns (uint8 tensor N x 3 x S x S, the paths that could not be read). With
    ``on_unreadable="error"`` the first unreadable image raises :class:`GanDataError`.
    """

    def load(path: str) -> np.ndarray | None:
        try:
            img = read_image(path)
        except ImageReadError as e:
            if on_unreadable == "error":
                raise GanDataError(f"unreadable training image: {e}") from e
            return None
        return np.asarray(img.resize((image_size, image_size), Image.BICUBIC), dtype=np.uint8)

    with ThreadPoolExecutor(threads) as pool:  # decoding/IO releases the GIL; S3 reads are latency-bound
        arrays = list(pool.map(load, paths))
    bad = [p for p, a in zip(paths, arrays, strict=True) if a is None]
    good = [a for a in arrays if a is not None]
    if not good:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), bad
    return torch.from_numpy(np.stack(good)).permute(0, 3, 1, 2).contiguous(), bad


def _fingerprint(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- checkpoints


def checkpoint_uri(gan_dir: str, cluster: int) -> str:
    return layout.gan_checkpoint(gan_dir, cluster)


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu", data: bytes | None = None) -> dict:
    """Read a GAN checkpoint (``weights_only=True``: no code is unpickled) and check its format."""
    data = storage.read_bytes(uri) if data is None else data
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        raise GanCheckpointError(f"{uri} is not a readable DCGAN checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "arch" not in ckpt:
        raise GanCheckpointError(f"{uri} is not a slsr-ray DCGAN checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def _check_arch(uri: str, ckpt: dict, arch: DCGANArch) -> None:
    if ckpt["arch"] != arch.to_dict():
        theirs = ", ".join(f"{k}={v}" for k, v in sorted(ckpt["arch"].items()))
        ours = ", ".join(f"{k}={v}" for k, v in sorted(arch.to_dict().items()))
        raise GanCheckpointError(
            f"{uri} was trained with a different DCGAN architecture ({theirs}) than this run asks for "
            f"({ours}); use the same settings to resume, or a new GAN folder"
        )


# ------------------------------------------------------------------------------------------ training


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


def actor_resources(cfg: GanConfig, num_clusters: int) -> tuple[float, float]:
    """(num_cpus, num_gpus) per actor so that all ``num_clusters`` actors fit on the cluster at once.

    GPUs are only requested when the cluster has GPU nodes (asking for a GPU on a CPU-only cluster
    would hang); with fewer GPUs than clusters the actors share them fractionally, in shares that fit
    each node's GPUs (two 1-GPU nodes hold three actors at 1/2, not at 2/3), and GPU actors ask for no
    more CPUs than the GPU nodes have beside their GPUs.
    """
    from . import gpu

    res = ray.cluster_resources()
    cpus = float(res.get("CPU", 1))
    nodes = gpu.gpu_nodes()
    if cfg.num_gpus is not None:
        num_gpus = float(cfg.num_gpus)
        try:
            gpu.check_request(num_gpus, num_clusters, f"gan.num_gpus={num_gpus:g} per GAN actor")
        except gpu.GpuRequestError as e:
            raise GanError(str(e)) from e
    else:
        num_gpus = gpu.share(num_clusters, nodes)
    if cfg.num_cpus is not None:
        num_cpus = float(cfg.num_cpus)
    else:
        num_cpus = max(0.01, min(8.0, math.floor(cpus / num_clusters * 100) / 100))
        if num_gpus > 0:
            num_cpus = max(0.01, gpu.cpus_beside(num_clusters, num_gpus, num_cpus, nodes))
    return num_cpus, num_gpus


def make_trainer(cluster: int, paths: list[str], gan_dir: str, cfg: GanConfig, num_clusters: int = 1):
    """Start the restartable ``GanTrainer`` actor of one cluster (returns the actor handle)."""
    num_cpus, num_gpus = actor_resources(cfg, num_clusters)
    retries = cfg.max_restarts if cfg.max_restarts >= 0 else -1
    return GanTrainer.options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=cfg.max_restarts,
        max_task_retries=retries,
    ).remote(cluster, paths, str(gan_dir), cfg, max(1, int(num_cpus)))


def _epochs_done(gan_dir: str, cluster: int) -> int:
    uri = layout.gan_losses(gan_dir, cluster)
    try:
        return len(storage.read_json(uri))
    except (storage.StorageError, json.JSONDecodeError):
        return 0


def _error_line(e: Exception) -> str:
    """The original error of a failed actor call (Ray wraps it with the remote traceback)."""
    return str(getattr(e, "cause", None) or e).strip().splitlines()[-1]


def train_gans(
    assignments: str | os.PathLike | pa.Table, gan_dir: str | os.PathLike, cfg: GanConfig | None = None,
    progress: bool = True,
) -> dict[int, dict]:
    """Train one DCGAN per cluster, all clusters at once as Ray actors; returns results per cluster id.

    ``assignments`` is the clustering stage's table (or its URI / ``k{K}`` folder). Reruns resume from
    the checkpoints under ``gan_dir``. When some clusters fail (divergence, bad data), the others still
    finish and a :class:`GanError` lists the failures afterwards.
    """
    from tqdm.auto import tqdm

    cfg = cfg or GanConfig()
    gan_dir = storage.absolute(gan_dir)
    per_cluster = cluster_paths(load_assignments(assignments))
    storage.makedirs(gan_dir)
    init_ray()
    k = len(per_cluster)
    actors = {c: make_trainer(c, paths, gan_dir, cfg, k) for c, paths in per_cluster.items()}
    results: dict[int, dict] = {}
    failures: dict[int, str] = {}
    # Wait until every actor has loaded its images and checkpoint, then start all trainings together:
    # a bad cluster fails fast, and the K trainings really overlap instead of trailing actor start-up.
    bar = tqdm(total=k * cfg.epochs, desc=f"DCGAN x{k}", unit="epoch", disable=not progress)
    try:
        ready = {actors[c].progress.remote(): c for c in actors}
        for ref, c in ready.items():
            try:
                ray.get(ref)
            except Exception as e:
                failures[c] = _error_line(e)
        refs = {actors[c].train.remote(cfg.epochs): c for c in actors if c not in failures}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            for ref in done:
                c = refs[ref]
                try:
                    results[c] = ray.get(ref)
                except Exception as e:  # keep the other clusters going; report all failures at the end
                    failures[c] = _error_line(e)
            bar.n = sum(
                results[c]["epochs"] if c in results else _epochs_done(gan_dir, c) for c in per_cluster
            )
            bar.refresh()
    finally:
        bar.close()
        for actor in actors.values():
            ray.kill(actor)
    for c, r in sorted(results.items()):
        if r["diversity"] < COLLAPSE_DIVERSITY:
            log.warning(
                "DCGAN of cluster %d looks mode-collapsed: its samples vary %.2fx as much as its real images "
                "(realism %.2f); train longer or lower gan.lr (samples: %s)", c, r["diversity"], r["realism"],
                layout.gan_samples(gan_dir, c),
            )
    summary = {
        "config": asdict(cfg),
        "clusters": {str(c): r for c, r in sorted(results.items())},
        "failures": {str(c): m for c, m in failures.items()},
    }
    storage.write_json(storage.join(gan_dir, layout.GAN_SUMMARY), summary)
    if failures:
        lines = "\n".join(f"  cluster {c}: {m}" for c, m in sorted(failures.items()))
        raise GanError(f"{len(failures)} of {k} cluster GAN(s) failed (finished: {sorted(results)}):\n{lines}")
    return dict(sorted(results.items()))
