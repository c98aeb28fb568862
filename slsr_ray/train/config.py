"""Training settings (:class:`TrainConfig`), results, and the learning-rate policies."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from .. import layout
from ..config import from_known_fields
from ..errors import SlsrError
from ..labels import STRATEGIES
from ..models.reid import ModelConfig

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




# ---------------------------------------------------------------------------------- lr policies


def lr_factor(policy: str, iteration: int, iters_per_epoch: int, total_iters: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based global mini-batch index)."""
    if policy == "inv":
        return (1 + cfg.gamma * iteration) ** (-cfg.power)
    if policy == "step":
        return cfg.step_gamma ** ((iteration // max(iters_per_epoch, 1)) // cfg.step_size)
    return 0.5 * (1 + math.cos(math.pi * min(iteration / max(total_iters, 1), 1.0)))
