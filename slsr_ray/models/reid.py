"""The re-id network of the paper (section 4.3 / 5.3) and its checkpoints.

Layout, input to output::

    image -> ResNet backbone (torchvision resnet50 / resnet18, last stride 1 by default)
          -> global average pooling                       "pool"        2048-d (512-d for resnet18)
          -> bottleneck: Linear(., 512) + BatchNorm1d + LeakyReLU(0.1) + Dropout(0.5)
                                                           "bottleneck"  512-d
          -> classifier: Linear(512, C)                    "logits"      C = identities (+1 for all_in_one)
          -> softmax                                       p(k | x)
          -> noise adaptation layer (the paper's "extra linear layer on top of the softmax")
                                                           "log_probs"   log p~(k | x)

The bottleneck and classifier follow the ClassBlock of the LSRO / layumi baselines the paper builds on.

The **noise adaptation layer** (Sukhbaatar et al. 2015, "Training convolutional networks with noisy
labels") is a learned C x C label-transition matrix ``T``: ``p~(k|x) = sum_j p(j|x) T[j, k]``. It is
linear in the softmax output, as the paper says ("a linear layer on top of the softmax layer rather
than a non-linear such as tanh or ReLU"). ``T`` is kept row-stochastic by parametrising it as
``T = softmax(W, dim=1)``, with ``W`` initialised to a large diagonal so that ``T`` starts at (almost)
the identity (diagonal 0.999): at initialisation the model is the plain softmax classifier, and
training moves probability mass off the diagonal only where the noisy (GAN) targets ask for it.
``W`` is excluded from weight decay (decay would pull ``T`` towards the uniform matrix).

Where it applies: ``forward`` returns both ``clean_log_probs`` (log-softmax of the logits) and
``log_probs`` (after ``T``); the training loop (``slsr_ray.train``) scores **generated** images with
``log_probs`` and real, correctly-labelled images with ``clean_log_probs`` by default, so ``T`` models
the noise of the GAN label distributions only (``noise_layer_on="all"`` in the training config scores
every image through ``T``). As in Sukhbaatar et al., ``T`` is used only for the loss: retrieval features
("pool" or "bottleneck") come before the classifier and never see it. ``noise_layer=False`` removes it
(``log_probs == clean_log_probs``), for comparison.

Retrieval feature: ``extract(x, feature="pool")`` (default) returns the 2048-d pooled feature, the same
feature the clustering stage uses; ``feature="bottleneck"`` returns the 512-d bottleneck output (eval
mode: BatchNorm running statistics, no dropout).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import storage
from ..config import from_known_fields
from ..errors import SlsrError

log = logging.getLogger(__name__)

BACKBONES = ("resnet50", "resnet18")
NECKS = ("bottleneck", "bnneck")
FEATURES = ("pool", "bottleneck")
# initial diagonal of the transition matrix T (rows sum to 1, the rest is spread over off-diagonals)
NOISE_INIT_DIAGONAL = 0.999


class WeightsError(SlsrError, ValueError):
    """A pretrained weights file or model checkpoint does not fit the model (wrong keys or shapes)."""


@dataclass
class ModelConfig:
    """Re-id model settings. ``num_classes`` is the number of model outputs (identities, +1 for
    ``all_in_one``). ``pretrained``: local path or ``s3://`` URI of an ImageNet state dict of the
    torchvision backbone (``fc.*`` keys are ignored); None means random initialisation."""

    num_classes: int = 751
    backbone: str = "resnet50"
    last_stride: int = 1
    bottleneck_dim: int = 512
    dropout: float = 0.5
    noise_layer: bool = True
    pretrained: str | None = None
    input_norm: str = "imagenet"  # pixel scaling the model expects: imagenet statistics or symmetric [-1, 1]
    neck: str = "bottleneck"  # the paper's 512-d bottleneck, or "bnneck" (Bag of Tricks, models/bnneck.py)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.neck not in NECKS:
            raise ValueError(f"neck must be one of {NECKS}, got {self.neck!r}")
        if self.last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        from ..transforms import normalization

        normalization(self.input_norm)  # validates the name

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return from_known_fields(cls, d)


class NoiseAdaptation(nn.Module):
    """Row-stochastic C x C transition ``T = softmax(W, dim=1)`` applied to softmax probabilities."""

    def __init__(self, num_classes: int, init_diagonal: float = NOISE_INIT_DIAGONAL):
        super().__init__()
        # logit gap giving T[i, i] = init_diagonal exactly: e^d / (e^d + C - 1) = init_diagonal
        gap = math.log(init_diagonal / (1 - init_diagonal) * max(num_classes - 1, 1)) if num_classes > 1 else 0.0
        self.weight = nn.Parameter(torch.eye(num_classes) * gap)

    def transition(self) -> torch.Tensor:
        return torch.softmax(self.weight.float(), dim=1)

    def forward(self, log_p: torch.Tensor) -> torch.Tensor:
        """log(p @ T) from log p, computed stably: log p~ = m + log(exp(log p - m) @ T), m = max log p.

        exp(log p - m) has entries in (0, 1] with a 1 at the arg-max, and T is strictly positive, so the
        product is bounded away from 0 and the log never sees an underflowed zero."""
        log_p = log_p.float()
        m = log_p.max(dim=1, keepdim=True).values.detach()
        mixed = torch.exp(log_p - m) @ self.transition()
        return m + torch.log(mixed.clamp_min(torch.finfo(mixed.dtype).tiny))


class ReidModel(nn.Module):
    """ResNet + 512-d bottleneck + classifier + noise adaptation layer (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from torchvision import models

        self.cfg = cfg
        backbone = getattr(models, cfg.backbone)(weights=None)
        if cfg.last_stride == 1:  # re-id practice: keep a 16x8 final map at 256x128 input
            block = backbone.layer4[0]
            if cfg.backbone == "resnet50":
                block.conv2.stride = (1, 1)
            else:
                block.conv1.stride = (1, 1)
            block.downsample[0].stride = (1, 1)
        self.feature_dim = backbone.fc.in_features
        backbone.fc = nn.Identity()  # avgpool + flatten stay: the backbone returns the pooled feature
        self.backbone = backbone
        if cfg.neck == "bnneck":
            from .bnneck import bnneck_head

            self.bottleneck, self.classifier = bnneck_head(self.feature_dim, cfg.num_classes)
        else:
            self.bottleneck = nn.Sequential(
                nn.Linear(self.feature_dim, cfg.bottleneck_dim),
                nn.BatchNorm1d(cfg.bottleneck_dim),
                nn.LeakyReLU(0.1),
                nn.Dropout(p=cfg.dropout),
            )
            self.classifier = nn.Linear(cfg.bottleneck_dim, cfg.num_classes)
            self._init_head()
        self.noise = NoiseAdaptation(cfg.num_classes) if cfg.noise_layer else None

    def _init_head(self) -> None:
        # as the layumi ClassBlock: kaiming for the bottleneck, N(1, 0.02) BN scale, small classifier init
        lin, bn = self.bottleneck[0], self.bottleneck[1]
        nn.init.kaiming_normal_(lin.weight, a=0, mode="fan_out")
        nn.init.zeros_(lin.bias)
        nn.init.normal_(bn.weight, 1.0, 0.02)
        nn.init.zeros_(bn.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training outputs: ``pool``, ``bottleneck``, ``logits``, ``clean_log_probs`` (log-softmax) and
        ``log_probs`` (log of the noise-adapted probabilities; equal to ``clean_log_probs`` without the
        noise layer). Log-probabilities are float32 even under autocast."""
        pool = self.backbone(x)
        bottleneck = self.bottleneck(pool)
        logits = self.classifier(bottleneck)
        clean = F.log_softmax(logits.float(), dim=1)
        adapted = self.noise(clean) if self.noise is not None else clean
        return {
            "pool": pool,
            "bottleneck": bottleneck,
            "logits": logits,
            "clean_log_probs": clean,
            "log_probs": adapted,
        }

    @torch.no_grad()
    def extract(self, x: torch.Tensor, feature: str = "pool") -> torch.Tensor:
        """Retrieval features in eval mode: ``pool`` (default, 2048-d for resnet50) or ``bottleneck``."""
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        was_training = self.training
        self.eval()
        try:
            pool = self.backbone(x)
            return pool if feature == "pool" else self.bottleneck(pool)
        finally:
            self.train(was_training)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """SGD parameter groups: weight decay everywhere except the noise layer's transition logits."""
        noise = [p for n, p in self.named_parameters() if n.startswith("noise.")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("noise.")]
        groups = [{"params": rest, "weight_decay": weight_decay}]
        if noise:
            groups.append({"params": noise, "weight_decay": 0.0})
        return groups


def load_pretrained_backbone(model: ReidModel, uri: str) -> None:
    """Load an ImageNet state dict (torchvision key names; ``fc.*`` ignored) into the backbone.

    Every backbone tensor must be present with the same shape; raises :class:`WeightsError` naming the
    offending keys otherwise."""
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except storage.StorageError:
        raise
    except Exception as e:  # unpickling errors come in many types
        raise WeightsError(f"pretrained weights {uri}: not a torch state dict loadable with weights_only ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"pretrained weights {uri}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    own = model.backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"wrong shapes ({len(wrong)}): " + "; ".join(wrong[:5]))
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:5]}")
        raise WeightsError(
            f"pretrained weights {uri} do not fit a torchvision {model.cfg.backbone} backbone: " + ", ".join(parts)
        )
    model.backbone.load_state_dict(state, strict=True)


def build_model(cfg: ModelConfig, announce: bool = True) -> ReidModel:
    """Build the re-id model; load ImageNet backbone weights from ``cfg.pretrained`` when given.

    Without weights it logs one warning line saying the backbone is randomly initialised
    (``announce=False`` silences it, e.g. on all but one training worker)."""
    model = ReidModel(cfg)
    if cfg.pretrained:
        load_pretrained_backbone(model, cfg.pretrained)
        if announce:
            log.info("loaded ImageNet backbone weights from %s", cfg.pretrained)
    elif announce:
        log.warning(
            "no pretrained weights given: %s backbone is randomly initialised (pass --pretrained PATH_OR_S3_URI "
            "with an ImageNet state dict for paper-level accuracy)",
            cfg.backbone,
        )
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_checkpoint(uri: str, model: nn.Module, cfg: ModelConfig, extra: dict | None = None) -> None:
    """Write ``{"state_dict", "config", "extra"}`` with torch.save to ``uri`` (local or s3://, atomic).

    ``extra`` must hold plain Python values (numbers, strings, lists, dicts) so the file stays loadable
    with ``weights_only=True``. A DDP-wrapped model is unwrapped first."""
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    cfg_dict = asdict(cfg)
    buf = io.BytesIO()
    torch.save({"state_dict": state, "config": cfg_dict, "extra": dict(extra or {})}, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_model(uri: str, map_location: str | torch.device = "cpu") -> tuple[ReidModel, ModelConfig, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`: returns (model in eval mode, config, extra)."""
    try:
        blob = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location=map_location, weights_only=True)
    except storage.StorageError:
        raise
    except Exception as e:
        raise WeightsError(f"checkpoint {uri}: cannot be loaded with weights_only=True ({e})") from e
    if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob:
        raise WeightsError(f"checkpoint {uri}: expected a dict with state_dict and config (written by save_checkpoint)")
    cfg = ModelConfig.from_dict({**blob["config"], "pretrained": None})
    model = ReidModel(cfg)
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as e:
        raise WeightsError(f"checkpoint {uri} does not match its own config {cfg}: {e}") from e
    model.to(map_location).eval()
    cfg.pretrained = blob["config"].get("pretrained")
    return model, cfg, blob.get("extra", {})
