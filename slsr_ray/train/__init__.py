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

Modules: :mod:`.config` (TrainConfig, lr policies), :mod:`.data` (dataset, sampler, rows),
:mod:`.worker` (the loop on each Ray Train worker), :mod:`.driver` (:func:`run_training`); checkpoint
evaluation is :func:`slsr_ray.evaluate.checkpoint.evaluate_checkpoint` (re-exported here).
"""

from ..evaluate.checkpoint import evaluate_checkpoint, extract_features
from .config import (
    FAULT_ENV,
    LR_POLICIES,
    MODEL_FILE,
    NOISE_LAYER_ON,
    RECIPES,
    STATE_FILE,
    STATUS_FILE,
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    lr_factor,
)
from .data import EpochSampler, ManifestDataset, prepare_rows
from .driver import RESUMABLE_FIELDS, _gpu_workers, resume_key, run_training
from .worker import epoch_seed

__all__ = [
    "FAULT_ENV", "LR_POLICIES", "MODEL_FILE", "NOISE_LAYER_ON", "RECIPES", "RESUMABLE_FIELDS", "STATE_FILE",
    "STATUS_FILE", "EpochSampler", "_gpu_workers", "ManifestDataset", "TrainConfig", "TrainResult", "TrainingDivergedError",
    "epoch_seed", "evaluate_checkpoint", "extract_features", "lr_factor", "prepare_rows", "resume_key",
    "run_training",
]
