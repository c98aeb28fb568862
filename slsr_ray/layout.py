"""Where every artifact of a run lives. The one module that formats artifact paths.

A run root (local folder or ``s3://`` prefix) holds one folder per stage::

    <root>/data/                      the synthetic dataset (when the run builds one)
    <root>/prepare/{train,query,gallery[,multi_query]}.parquet
    <root>/pretrain/model.pt          step 1's model (and metrics.json)
    <root>/extract/features/          step 2: feature shards + meta.json
    <root>/cluster/k{K}/              step 3: assignments.parquet, membership.json, centroids.npy
    <root>/cluster/{silhouette,summary}.json
    <root>/gan/c{c}/                  step 4: ckpt.pt, losses.json, samples.png (gan/gan.json: all clusters)
    <root>/generate/manifest.parquet  step 5: and images/c{c}/SSSSSS-EEEEEE.tar (shards of JPEGs)
    <root>/train/<strategy>/model.pt  step 6 (and metrics.json)
    <root>/evaluate/<strategy>/{plain,rerank}.json, features/
    <root>/report/                    report.md, report.html, figures
    <root>/logs/ray.log

Each stage folder also holds its marker (``_STAGE.json``, see :mod:`slsr_ray.stages`). The sweep keeps
one sub-run per K: :func:`per_k` is a run root of its own, so ``RunLayout(per_k(root, 3)).gan`` is
``<root>/k3/gan``. Stage modules get their output folder from the caller and name what is inside it
with the helpers below (``assignments_file(cluster_dir, k)``), so a stage can also run outside a run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import storage

# file names inside a stage folder
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
FEATURES = "features"
FEATURES_META = "meta.json"
ASSIGNMENTS = "assignments.parquet"
MEMBERSHIP = "membership.json"
CENTROIDS = "centroids.npy"
SILHOUETTE = "silhouette.json"
CLUSTER_SUMMARY = "summary.json"
GAN_CHECKPOINT = "ckpt.pt"
GAN_LOSSES = "losses.json"
GAN_LOSS_PLOT = "losses.png"
GAN_SAMPLES = "samples.png"
GAN_SUMMARY = "gan.json"
GENERATED_MANIFEST = "manifest.parquet"
GENERATION_INFO = "generation.json"
SHARD_SUFFIX = ".tar"  # generated images: one tar of JPEGs per shard_size images of a cluster (one PUT each)
SHARD_SEP = "#"
RUN_CONFIG = "config.json"
STAGE_MARKER = "_STAGE.json"
REPORT_SUMMARY = "summary.json"
LOG_FILE = ("logs", "ray.log")


# ------------------------------------------------------------------- inside one stage's folder


def split_file(folder: str, split: str) -> str:
    """``<folder>/<split>.parquet``: a manifest folder (``prepare/``, ``data.manifests``, a sweep split)."""
    return storage.join(folder, f"{split}.parquet")


def k_dir(cluster_dir: str, k: int) -> str:
    return storage.join(cluster_dir, f"k{int(k)}")


def assignments_file(cluster_dir: str, k: int) -> str:
    return storage.join(k_dir(cluster_dir, k), ASSIGNMENTS)


def membership_file(cluster_dir: str, k: int) -> str:
    return storage.join(k_dir(cluster_dir, k), MEMBERSHIP)


def centroids_file(cluster_dir: str, k: int) -> str:
    return storage.join(k_dir(cluster_dir, k), CENTROIDS)


def gan_cluster_dir(gan_dir: str, cluster: int) -> str:
    return storage.join(str(gan_dir), f"c{int(cluster)}")


def gan_clusters(gan_dir: str) -> list[int]:
    """The cluster ids with a folder under ``gan_dir``, ascending."""
    names = storage.listdir(gan_dir) if storage.exists(gan_dir) else []
    return sorted(int(m.group(1)) for name in names if (m := re.fullmatch(r"c(\d+)", name)))


def gan_checkpoint(gan_dir: str, cluster: int) -> str:
    return storage.join(gan_cluster_dir(gan_dir, cluster), GAN_CHECKPOINT)


def gan_losses(gan_dir: str, cluster: int) -> str:
    return storage.join(gan_cluster_dir(gan_dir, cluster), GAN_LOSSES)


def gan_samples(gan_dir: str, cluster: int) -> str:
    return storage.join(gan_cluster_dir(gan_dir, cluster), GAN_SAMPLES)


def generated_images_dir(generate_dir: str, cluster: int) -> str:
    return storage.join(generate_dir, "images", f"c{int(cluster)}")


def generated_shard(generate_dir: str, cluster: int, start: int, stop: int) -> str:
    """The tar shard holding generated images ``start..stop-1`` of one cluster (members ``NNNNNN.jpg``)."""
    return storage.join(generated_images_dir(generate_dir, cluster), f"{int(start):06d}-{int(stop):06d}{SHARD_SUFFIX}")


def shard_member(shard: str, name: str) -> str:
    """The manifest path of one image inside a shard: ``<shard>#<name>`` (read by ``data.read_image``)."""
    return f"{shard}{SHARD_SEP}{name}"


def split_shard_member(uri: str) -> tuple[str, str] | None:
    """``(shard, member name)`` of a :func:`shard_member` path, None for a plain file path."""
    shard, sep, name = str(uri).rpartition(SHARD_SEP)
    return (shard, name) if sep and shard.endswith(SHARD_SUFFIX) and name else None


def generated_manifest(generate_dir: str) -> str:
    return storage.join(generate_dir, GENERATED_MANIFEST)


def per_k(root: str, k: int) -> str:
    """The sweep's sub-run root of one K (its own gan/ and generate/ stages)."""
    return storage.join(root, f"k{int(k)}")


def per_k_stage(k: int, stage: str) -> str:
    """The stage key of a per-K stage under the sweep's shared root (``k3/gan``)."""
    return f"k{int(k)}/{stage}"


# ------------------------------------------------------------------------------ the whole run


@dataclass(frozen=True)
class RunLayout:
    """Every artifact path of one run root."""

    root: str

    def stage(self, key: str) -> str:
        """A stage folder by its key: ``"cluster"``, ``"train/slsr"``, ``"k3/gan"``."""
        return storage.join(self.root, *key.split("/"))

    def marker(self, key: str) -> str:
        """The stage's finished marker (see :mod:`slsr_ray.stages`)."""
        return storage.join(self.stage(key), STAGE_MARKER)

    def stage_metrics(self, key: str) -> str:
        """A training stage's ``metrics.json`` (per-epoch history): ``"pretrain"``, ``"train/slsr"``."""
        return storage.join(self.stage(key), METRICS_FILE)

    def split(self, split: str = "train") -> str:
        return split_file(self.stage("prepare"), split)

    @property
    def data(self) -> str:
        return self.stage("data")

    @property
    def config(self) -> str:
        return storage.join(self.root, RUN_CONFIG)

    @property
    def log_file(self) -> str:
        return storage.join(self.root, *LOG_FILE)

    @property
    def features(self) -> str:
        return storage.join(self.stage("extract"), FEATURES)

    @property
    def silhouette(self) -> str:
        return storage.join(self.stage("cluster"), SILHOUETTE)

    def centroids(self, k: int) -> str:
        return centroids_file(self.stage("cluster"), k)

    def assignments(self, k: int) -> str:
        return assignments_file(self.stage("cluster"), k)

    def membership(self, k: int) -> str:
        return membership_file(self.stage("cluster"), k)

    @property
    def gan(self) -> str:
        return self.stage("gan")

    def gan_samples(self, cluster: int) -> str:
        return gan_samples(self.gan, cluster)

    @property
    def generate(self) -> str:
        return self.stage("generate")

    @property
    def generated_manifest(self) -> str:
        return generated_manifest(self.generate)

    def train(self, strategy: str) -> str:
        return self.stage(f"train/{strategy}")

    def model(self, stage: str) -> str:
        """The weights a training stage wrote: ``model("pretrain")``, ``model("train/slsr")``."""
        return storage.join(self.stage(stage), MODEL_FILE)

    def evaluate(self, strategy: str) -> str:
        return self.stage(f"evaluate/{strategy}")

    def evaluation_features(self, strategy: str) -> str:
        return storage.join(self.evaluate(strategy), FEATURES)

    def metrics(self, strategy: str, kind: str) -> str:
        """``evaluate/<strategy>/<kind>.json``, kind ``plain`` or ``rerank``."""
        return storage.join(self.evaluate(strategy), f"{kind}.json")

    @property
    def report(self) -> str:
        return self.stage("report")

    def trial(self, split_id: int) -> RunLayout:
        """The sub-run of one evaluation trial (``split{i}``) of a multi-trial protocol."""
        return RunLayout(storage.join(self.root, f"split{int(split_id)}"))

    @property
    def trials(self) -> str:
        """Where the trials' mean ± std go: ``trials/<strategy>/<mode>.json``, ``trials/results.{json,md}``."""
        return self.stage("trials")

    @property
    def tensorboard(self) -> str:
        return self.stage("tensorboard")

    @property
    def experiment(self) -> str:
        return self.stage("experiment")


@dataclass
class SweepLayout:
    """Where a sweep's artifacts live under the run root: ``sweep/source`` (the dataset's own split),
    ``sweep/split`` (train ids minus the held-out validation ids, as train/query/gallery manifests),
    ``sweep/shared`` (a run root of the stages every trial shares; per K a sub-run ``shared/k{K}`` with
    its GANs and generated images), ``sweep/trials/<trial id>``, ``sweep/best``, and the results files."""

    run_root: str

    @property
    def root(self) -> str:
        return storage.join(self.run_root, "sweep")

    @property
    def source(self) -> str:
        return storage.join(self.root, "source")

    @property
    def split(self) -> str:
        return storage.join(self.root, "split")

    @property
    def shared(self) -> str:
        return storage.join(self.root, "shared")

    @property
    def trials(self) -> str:
        return storage.join(self.root, "trials")

    @property
    def best(self) -> str:
        return storage.join(self.root, "best")

    def split_file(self, split: str) -> str:
        return split_file(self.split, split)

    def per_k(self, k: int) -> RunLayout:
        return RunLayout(per_k(self.shared, k))

    def results(self, name: str) -> str:
        """``sweep/<name>``: results.{csv,md,json}, heatmap.png, best.yaml, sweep.json."""
        return storage.join(self.root, name)
