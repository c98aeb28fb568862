"""The pipeline's config: one typed section per stage (the stages' own configs: ``TrainConfig``,
``ExtractConfig``, ``GanConfig``; the sections below for the others), the presets and :func:`load_config`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources

from . import storage
from .config import ConfigError, apply_overrides, from_dict, load_yaml
from .extract import ExtractConfig
from .gan import GanConfig
from .train import TrainConfig
from .validate import validate_config

PRESETS = ("synthetic", "market1501", "dukemtmcreid", "cuhk03", "viper", "msmt17", "scale")
GENERATED_STRATEGIES = ("lsr", "lsro", "all_in_one", "pseudo", "slsr")
# lsr smooths real labels only: it needs no generated images (the paper's LSR baseline)
USES_GENERATED = ("lsro", "all_in_one", "pseudo", "slsr")
INPUT_PIPELINES = ("reid", "paper")


@dataclass
class SyntheticSpec:
    """Size of the synthetic dataset built when ``data.dataset`` is ``synthetic``."""

    num_ids: int = 60
    cams: int = 4
    images_per_id: int = 10
    seed: int = 0
    height: int = 128
    width: int = 64
    num_distractors: int = 10
    num_junk: int = 5


@dataclass
class DataSection:
    """``root``: the dataset folder (for ``synthetic``: where to build it; default ``<run_root>/data``
    on a local run root, a temporary folder uploaded to ``<run_root>/data`` on S3). ``manifests``: a
    folder/URI with ``train/query/gallery.parquet`` made earlier (``slsr data manifest``), the way to
    use a dataset stored on S3. ``on_bad_image``: ``raise`` stops on an unreadable image, ``skip``
    drops it with a warning; ``check_images`` decodes every image up front.

    ``protocol``: the dataset's evaluation protocol (:mod:`slsr_ray.data.protocols`; None: its first):
    market1501/synthetic ``single_query`` | ``multi_query``, cuhk03 ``classic`` | ``new_767_700``
    (``cuhk03_labeled`` picks the labeled boxes, default detected as in the paper), viper
    ``ten_trials``, the others ``standard``. ``split_id`` is the protocol split this run trains and
    tests on (VIPeR halves drawn with ``split_seed``); ``evaluate.trials`` runs several. A
    ``{split_id}`` in ``manifests`` is replaced by the split id."""

    dataset: str = "synthetic"
    root: str | None = None
    manifests: str | None = None
    protocol: str | None = None
    split_id: int = 0
    split_seed: int = 0
    cuhk03_labeled: bool = False
    check_images: bool = False
    on_bad_image: str = "raise"
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)

    def __post_init__(self):
        from .data.protocols import PROTOCOLS, _key, check_split_id, get_protocol

        if _key(self.dataset) not in PROTOCOLS:
            return  # an unknown dataset name: validate_config reports it with the valid names
        check_split_id(self.dataset, get_protocol(self.dataset, self.protocol), self.split_id)


@dataclass
class ClusterSection:
    """K-means over the pretrained features for each K in ``ks``; ``k`` fixes K (None: the K with the
    best silhouette). ``rule``: how identities map to clusters for the sparse labels: ``majority`` (the
    paper: each identity in the cluster holding most of its images, so the clusters partition the
    identities), ``any`` (every cluster holding one of its images; SLSR then nears LSRO) or
    ``min_share`` (clusters holding at least ``min_share`` of its images)."""

    ks: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    k: int | None = None
    rule: str = "majority"
    min_share: float = 0.2
    n_init: int = 3
    max_iter: int = 100
    silhouette_sample: int = 10000
    seed: int = 0


@dataclass
class GenerateSection:
    """``count`` generated images (paper best: 12,000) split over clusters ``proportional`` to their
    size or ``equal``; written at ``height x width`` (the re-id input shape)."""

    count: int = 12000
    split: str = "proportional"
    seed: int = 0
    height: int = 128
    width: int = 64


@dataclass
class EvaluateSection:
    """``trials``: how many splits of ``data.protocol`` to run, each a full pipeline (its own models:
    split *i*'s test ids are other splits' training ids) under ``<run_root>/split<i>/``, averaged
    with their std under ``<run_root>/trials/`` (:mod:`slsr_ray.trials`); 1 runs ``data.split_id`` only."""

    trials: int = 1
    rerank: bool = True
    metric: str = "euclidean"
    max_rank: int = 50
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3


@dataclass
class PipelineConfig:
    """Everything a run needs. ``train`` is the final training (its ``strategy`` is the method, SLSR by
    default); ``baselines`` are trained with the same settings and a different strategy for the
    comparison table; ``train_init``: ``imagenet`` fine-tunes from ``train.model.pretrained`` (the
    paper: ImageNet weights, random init when none) and ``pretrain`` from the step-1 model.
    ``pretrained``: the ImageNet backbone weights (local path or ``s3://``) of *both* the step-1 model,
    whose features are clustered, and the final model, as in the paper; it fills
    ``pretrain.model.pretrained`` and ``train.model.pretrained`` where those are not set.
    ``input_pipeline``: ``reid`` keeps each section's own input settings (the presets: 256x128, pad +
    random crop, ImageNet statistics); ``paper`` sets the paper's (section 5.2) on every model stage:
    resize to 256x256, random crop 224x224, pixels scaled to [-1, 1]."""

    name: str = "custom"
    run_root: str = "runs/default"
    pretrained: str | None = None
    input_pipeline: str = "reid"
    data: DataSection = field(default_factory=DataSection)
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, lr=0.001, strategy="none"))
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    gan: GanConfig = field(default_factory=GanConfig)
    generate: GenerateSection = field(default_factory=GenerateSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(strategy="slsr"))
    train_init: str = "imagenet"
    baselines: list[str] = field(default_factory=lambda: ["none"])
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)

    def __post_init__(self):
        # Local paths become absolute: Ray workers (and job drivers) run in other working directories.
        self.run_root = storage.absolute(self.run_root)
        self.data.root = storage.absolute(self.data.root)
        self.data.manifests = storage.absolute(self.data.manifests)
        if self.train_init not in ("imagenet", "pretrain"):
            raise ValueError(f"train_init must be 'imagenet' or 'pretrain', got {self.train_init!r}")
        if self.input_pipeline not in INPUT_PIPELINES:
            raise ValueError(f"input_pipeline must be one of {INPUT_PIPELINES}, got {self.input_pipeline!r}")
        if self.input_pipeline == "paper":
            for section in (self.pretrain, self.train):
                section.height = section.width = 224
                section.crop = "resize"  # 8/7 x 224 = 256, then a random 224 crop
                section.model.input_norm = "symmetric"
            self.extract.height = self.extract.width = 224
            self.generate.height = self.generate.width = 224
        self.pretrained = storage.absolute(self.pretrained)
        for section in (self.pretrain, self.train):
            if section.model.pretrained is None:
                section.model.pretrained = self.pretrained

    @property
    def strategies(self) -> list[str]:
        out = [self.train.strategy]
        out += [s for s in self.baselines if s not in out]
        return out


def load_config(name_or_path: str = "synthetic", overrides: list[str] | None = None, run_root: str | None = None) -> PipelineConfig:
    """A preset name (``synthetic``, ``market1501``, ...), a YAML path, or an ``s3://`` YAML URI,
    with ``section.key=value`` overrides applied; unknown keys and wrong types raise ConfigError."""
    if name_or_path in PRESETS:
        text = resources.files("slsr_ray").joinpath(f"configs/{name_or_path}.yaml").read_text()
    elif storage.is_s3(name_or_path) or os.path.exists(name_or_path):
        text = storage.read_text(name_or_path)
    else:
        raise ConfigError(f"config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
    raw = apply_overrides(load_yaml(text, name_or_path), list(overrides or []))
    if run_root is not None:
        raw["run_root"] = run_root
    cfg = from_dict(PipelineConfig, raw)
    validate_config(cfg)  # ranges, enums, names and cross-field rules; no I/O (see slsr_ray.validate)
    return cfg
