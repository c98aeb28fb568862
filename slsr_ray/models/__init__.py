"""Models: the re-id network (:mod:`.reid`). The DCGAN lives in :mod:`.dcgan` (import it directly)."""

from .reid import (
    BACKBONES,
    FEATURES,
    ModelConfig,
    NoiseAdaptation,
    ReidModel,
    WeightsError,
    build_model,
    load_model,
    save_checkpoint,
)

__all__ = [
    "BACKBONES",
    "FEATURES",
    "ModelConfig",
    "NoiseAdaptation",
    "ReidModel",
    "WeightsError",
    "build_model",
    "load_model",
    "save_checkpoint",
]
