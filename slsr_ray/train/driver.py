"""The driver side: :func:`run_training` builds the ``TorchTrainer``, names its storage by the config's
hash (:func:`resume_key`), and writes ``model.pt`` and ``metrics.json``."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict

import pyarrow as pa
import torch

from .. import layout, storage
from ..config import config_hash
from ..models.reid import ModelConfig, build_model, save_checkpoint
from ..raysetup import init_ray
from .config import (
    FAULT_ENV,
    MODEL_FILE,
    STATE_FILE,
    STATUS_FILE,
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
)
from .data import prepare_rows
from .worker import _train_loop_per_worker

log = logging.getLogger(__name__)



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
    from .. import gpu

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
    trainer = _trainer(cfg, loop_config, output_dir, use_gpu, cpus_per_worker,
                       f"{cfg.run_name}-{resume_key(cfg, rows, init_checkpoint)}")
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
    model_uri = _save_model(cfg, model_cfg, rows, state, output_dir)
    wall = time.perf_counter() - t0
    storage.write_json(
        storage.join(output_dir, layout.METRICS_FILE),
        {"config": asdict(cfg), "history": state["history"], "wall_s": wall, "checkpoint": model_uri},
    )
    return TrainResult(model_uri, state["history"], wall, ray_ckpt_path, resumes=int(state["resumes"]))


def _trainer(cfg: TrainConfig, loop_config: dict, output_dir: str, use_gpu: bool, cpus_per_worker: float,
             run_name: str):
    """The ``TorchTrainer``: storage named by the config's hash under ``output_dir`` (on S3 through a
    filesystem without credentials, so each worker uses its own node's), retries and checkpoints kept."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .. import gpu

    if storage.is_s3(output_dir):
        storage_fs, storage_path = storage.portable_filesystem(output_dir)
    else:
        storage_path, storage_fs = os.path.abspath(output_dir), None
    resources = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    log.info("Ray Train run %s under %s (resumes only a run with this exact config)", run_name, output_dir)
    return TorchTrainer(
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


def _save_model(cfg: TrainConfig, model_cfg: ModelConfig, rows: dict, state: dict, output_dir: str) -> str:
    """``output_dir/model.pt`` from the last Ray checkpoint's state (weights and the run's facts)."""
    model = build_model(model_cfg, announce=False)
    model.load_state_dict(state["model"])
    extra = {
        "strategy": cfg.strategy,
        "epochs": cfg.epochs,
        "num_ids": rows["num_ids"],
        "height": cfg.height,
        "width": cfg.width,
        "history": state["history"],
    }
    model_uri = storage.join(output_dir, MODEL_FILE)
    save_checkpoint(model_uri, model, model_cfg, extra)
    return model_uri
