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
from .models.dcgan import DCGANArch
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
    from .gan_trainer import GanTrainer  # the actor's module imports this one

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


# How long a cluster's training call is re-sent while its actor is unreachable: a lost node is declared
# dead after a few missed health checks, then Ray restarts the actor elsewhere; Ray's own task retries
# are spent within a second on connection errors before that (seen on a 3-node cluster).
UNAVAILABLE_GRACE_S = 180.0
RESEND_EVERY_S = 3.0


def _await_trainings(actors: dict, clusters: list[int], cfg: GanConfig, results: dict, failures: dict,
                     restart, show_progress) -> None:
    """Run ``train`` on each cluster's actor and wait for all of them, filling ``results`` / ``failures``.

    A call that fails because its actor is unreachable (its node died) is sent again every few seconds
    for up to ``UNAVAILABLE_GRACE_S``; an actor that died for good (restarts used up) is replaced by a
    new one (``restart``) up to ``cfg.max_restarts`` times. Both resume from the last epoch checkpoint."""
    import time

    from ray.exceptions import ActorDiedError, ActorUnavailableError

    refs = {actors[c].train.remote(cfg.epochs): c for c in clusters}
    unreachable_since: dict[int, float] = {}
    resend_at: dict[int, float] = {}
    replaced = dict.fromkeys(clusters, 0)
    while refs or resend_at:
        now = time.monotonic()
        for c in [c for c, t in resend_at.items() if t <= now]:
            del resend_at[c]
            refs[actors[c].train.remote(cfg.epochs)] = c
        if refs:
            done, _ = ray.wait(list(refs), num_returns=1, timeout=2.0)
        else:  # only re-sends are due: wait for the first of them
            done = []
            time.sleep(0.5)
        for ref in done:
            c = refs.pop(ref)
            try:
                results[c] = ray.get(ref)
                unreachable_since.pop(c, None)
            except ActorUnavailableError as e:
                first = unreachable_since.setdefault(c, time.monotonic())
                if time.monotonic() - first > UNAVAILABLE_GRACE_S:
                    failures[c] = f"actor unreachable for {UNAVAILABLE_GRACE_S:.0f} s: {_error_line(e)}"
                else:
                    resend_at[c] = time.monotonic() + RESEND_EVERY_S
            except ActorDiedError as e:
                if replaced[c] < max(cfg.max_restarts, 0):
                    replaced[c] += 1
                    log.warning("GAN actor of cluster %d died (%s); starting a new one from its last checkpoint "
                                "(%d of %d)", c, _error_line(e), replaced[c], cfg.max_restarts)
                    restart(c)
                    resend_at[c] = time.monotonic()
                else:
                    failures[c] = _error_line(e)
            except Exception as e:  # keep the other clusters going; report all failures at the end
                failures[c] = _error_line(e)
        show_progress()


def train_gans(
    assignments: str | os.PathLike | pa.Table, gan_dir: str | os.PathLike, cfg: GanConfig | None = None,
    progress: bool = True,
) -> dict[int, dict]:
    """Train one DCGAN per cluster, all clusters at once as Ray actors; returns results per cluster id.

    ``assignments`` is the clustering stage's table (or its URI / ``k{K}`` folder). Reruns resume from
    the checkpoints under ``gan_dir``. When some clusters fail (divergence, bad data), the others still
    finish and a :class:`GanError` lists the failures afterwards.
    """
    # Long because actor start, the wait loop with restarts and failures, and the summary share the per-cluster state.
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
        def show_progress() -> None:
            bar.n = sum(results[c]["epochs"] if c in results else _epochs_done(gan_dir, c) for c in per_cluster)
            bar.refresh()

        def restart(c: int) -> None:  # a fresh actor resumes from the cluster's last epoch checkpoint
            ray.kill(actors[c])
            actors[c] = make_trainer(c, per_cluster[c], gan_dir, cfg, k)

        _await_trainings(actors, [c for c in actors if c not in failures], cfg, results, failures,
                         restart, show_progress)
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


def __getattr__(name: str):
    """``GanTrainerCore`` / ``GanTrainer`` / ``plot_losses`` live in :mod:`slsr_ray.gan_trainer` (imported on
    first use: that module imports this one)."""
    if name in ("GanTrainerCore", "GanTrainer", "plot_losses"):
        from . import gan_trainer

        return getattr(gan_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

