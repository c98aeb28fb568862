"""Check a whole :class:`~slsr_ray.pipeline.PipelineConfig` before any work starts.

:func:`validate_config` runs in two depths:

* always (``load_config`` calls it): ranges, enums, strategy and stage names and the cross-field rules
  that need no I/O (K <= the synthetic dataset's training identities, generated images for the
  strategies that use them). Nothing is read.
* ``check_inputs=True`` (``run_pipeline``, ``slsr run`` / ``slsr check`` before Ray starts, the jobs):
  also the inputs the config names: the dataset root (a folder), premade manifests, the run root (not a
  file), K against the identities of a known manifest, and every checkpoint file
  (``*.model.pretrained``), loaded on the driver with ``weights_only`` and matched against the backbone
  built on the ``meta`` device (no memory, no compute).

The first problem is raised as a :class:`~slsr_ray.config.ConfigError` (or ``WeightsError`` /
``DatasetError`` / ``StorageError`` for inputs) in the form ``<what> (<key>): <expected>``; the keys
of any further problems are appended, so one run shows everything to fix.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import dataclass, field

from . import storage
from .cluster import MEMBERSHIP_RULES
from .config import ConfigError
from .layout import RunLayout, split_file

METRICS = ("euclidean", "cosine")
ON_BAD_IMAGE = ("raise", "skip")
TRAIN_INITS = ("imagenet", "pretrain")
MIN_IMAGE_SIDE = 16  # below this the ResNet's feature map (and the synthetic renderer) collapse


@dataclass
class Problems:
    """Problems found so far: (what, key, what was expected)."""

    items: list[tuple[str, str, str]] = field(default_factory=list)

    def need(self, ok: bool, key: str, expected: str, got: object, what: str = "invalid config value") -> None:
        if not ok:
            self.items.append((what, key, f"expected {expected}, got {got!r}"))

    def raise_first(self) -> None:
        if not self.items:
            return
        what, key, expected = self.items[0]
        more = [k for _, k, _ in self.items[1:]]
        tail = f" (also fix: {', '.join(more)})" if more else ""
        raise ConfigError(what, where=key, expected=expected + tail)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _in_range(p: Problems, key: str, v, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    ok = _number(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
    p.need(ok, key, "a number " + " and ".join(s for s in (lo_s, hi_s) if s), v)


def _one_of(p: Problems, key: str, v, choices) -> None:
    p.need(v in choices, key, "one of " + ", ".join(map(str, choices)), v)


# ------------------------------------------------------------------------------------------ sections


def _check_data(p: Problems, d) -> None:
    from .data import DATASETS

    name = str(d.dataset).lower().replace("-", "").replace("_", "")
    p.need(name in DATASETS or bool(d.manifests), "data.dataset", "one of " + ", ".join(DATASETS), d.dataset,
           what=f"unknown dataset {d.dataset!r}")
    _in_range(p, "data.split_id", d.split_id, 0)
    _one_of(p, "data.on_bad_image", d.on_bad_image, ON_BAD_IMAGE)
    s = d.synthetic
    _in_range(p, "data.synthetic.num_ids", s.num_ids, 2)
    _in_range(p, "data.synthetic.cams", s.cams, 2, 9)
    _in_range(p, "data.synthetic.images_per_id", s.images_per_id, 2)
    _in_range(p, "data.synthetic.height", s.height, MIN_IMAGE_SIDE)
    _in_range(p, "data.synthetic.width", s.width, MIN_IMAGE_SIDE)
    _in_range(p, "data.synthetic.num_distractors", s.num_distractors, 0)
    _in_range(p, "data.synthetic.num_junk", s.num_junk, 0)
    _in_range(p, "data.synthetic.seed", s.seed, 0)


def _check_train(p: Problems, t, key: str) -> None:
    from .transforms import CROP_MODES

    _in_range(p, f"{key}.lam", t.lam, 0, 1)
    _in_range(p, f"{key}.epsilon", t.epsilon, 0, 1, hi_open=True)
    _in_range(p, f"{key}.momentum", t.momentum, 0, 1)
    _in_range(p, f"{key}.weight_decay", t.weight_decay, 0)
    _in_range(p, f"{key}.gamma", t.gamma, 0)
    _in_range(p, f"{key}.power", t.power, 0)
    _in_range(p, f"{key}.step_size", t.step_size, 1)
    _in_range(p, f"{key}.step_gamma", t.step_gamma, 0, lo_open=True)
    _in_range(p, f"{key}.height", t.height, MIN_IMAGE_SIDE)
    _in_range(p, f"{key}.width", t.width, MIN_IMAGE_SIDE)
    _one_of(p, f"{key}.crop", t.crop, CROP_MODES)
    _in_range(p, f"{key}.erasing_p", t.erasing_p, 0, 1)
    _in_range(p, f"{key}.cpus_per_worker", t.cpus_per_worker, 0, lo_open=True)
    _in_range(p, f"{key}.loader_workers", t.loader_workers, 0)
    _in_range(p, f"{key}.seed", t.seed, 0)
    _in_range(p, f"{key}.max_failures", t.max_failures, 0)
    _in_range(p, f"{key}.num_to_keep", t.num_to_keep, 1)
    _in_range(p, f"{key}.model.bottleneck_dim", t.model.bottleneck_dim, 1)
    _in_range(p, f"{key}.model.dropout", t.model.dropout, 0, 1, hi_open=True)


def _check_cluster(p: Problems, c) -> None:
    p.need(len(c.ks) > 0, "cluster.ks", "a non-empty list of cluster counts", c.ks)
    for i, k in enumerate(c.ks):
        _in_range(p, f"cluster.ks[{i}]", k, 2)
    if c.k is not None:
        _in_range(p, "cluster.k", c.k, 2)
    _one_of(p, "cluster.rule", c.rule, MEMBERSHIP_RULES)
    _in_range(p, "cluster.min_share", c.min_share, 0, 1, lo_open=True)
    _in_range(p, "cluster.n_init", c.n_init, 1)
    _in_range(p, "cluster.max_iter", c.max_iter, 1)
    _in_range(p, "cluster.silhouette_sample", c.silhouette_sample, 2)
    _in_range(p, "cluster.seed", c.seed, 0)


def _check_rest(p: Problems, cfg) -> None:
    from .generate import SPLITS
    from .labels import STRATEGIES

    e = cfg.extract
    _in_range(p, "extract.cpus_per_actor", e.cpus_per_actor, 0, lo_open=True)
    _in_range(p, "extract.decode_cpus", e.decode_cpus, 0, lo_open=True)
    _in_range(p, "extract.rows_per_file", e.rows_per_file, 1)
    if e.num_gpus is not None:
        _in_range(p, "extract.num_gpus", e.num_gpus, 0)
    g = cfg.gan
    _in_range(p, "gan.max_restarts", g.max_restarts, 0)
    _in_range(p, "gan.max_loss", g.max_loss, 0, lo_open=True)
    _in_range(p, "gan.beta1", g.beta1, 0, 1, hi_open=True)
    gen = cfg.generate
    _in_range(p, "generate.count", gen.count, 0)
    _one_of(p, "generate.split", gen.split, SPLITS)
    _in_range(p, "generate.seed", gen.seed, 0)
    _in_range(p, "generate.height", gen.height, 1)
    _in_range(p, "generate.width", gen.width, 1)
    for i, s in enumerate(cfg.baselines):
        _one_of(p, f"baselines[{i}]", s, STRATEGIES)
    _one_of(p, "train_init", cfg.train_init, TRAIN_INITS)
    ev = cfg.evaluate
    _one_of(p, "evaluate.metric", ev.metric, METRICS)
    _in_range(p, "evaluate.max_rank", ev.max_rank, 1)
    _in_range(p, "evaluate.k1", ev.k1, 1)
    _in_range(p, "evaluate.k2", ev.k2, 1)
    _in_range(p, "evaluate.lambda_value", ev.lambda_value, 0, 1)


def _check_cross_fields(p: Problems, cfg) -> None:
    from .pipeline import USES_GENERATED

    users = [s for s in cfg.strategies if s in USES_GENERATED]
    if users and _number(cfg.generate.count) and cfg.generate.count == 0:
        p.need(False, "generate.count", f"> 0: strategies {users} train on generated images "
               "(0 works only with none / lsr)", 0)
    d = cfg.data
    if d.dataset == "synthetic" and not d.manifests and d.root is None and _number(d.synthetic.num_ids):
        num_train = (d.synthetic.num_ids + 1) // 2
        _check_k(p, cfg.cluster, num_train, f"the synthetic dataset's training identities "
                 f"(data.synthetic.num_ids={d.synthetic.num_ids} gives {num_train})")


def _check_k(p: Problems, c, num_ids: int, source: str) -> None:
    for key, ks in (("cluster.k", [c.k] if c.k is not None else []), ("cluster.ks", c.ks)):
        big = [k for k in ks if _number(k) and k > num_ids]
        p.need(not big, key, f"K <= {num_ids}, the number of {source}", big[0] if len(big) == 1 else big)


def check_stage_names(from_stage: str | None, until: str | None) -> None:
    from .stages import STAGES

    p = Problems()
    for flag, name in (("--from", from_stage), ("--until", until)):
        if name is not None:
            p.need(name in STAGES, flag, "one of " + ", ".join(STAGES), name, what=f"unknown stage {name!r}")
    p.raise_first()
    if from_stage is not None and until is not None and STAGES.index(until) < STAGES.index(from_stage):
        raise ConfigError("nothing to run", where=f"--from {from_stage} --until {until}",
                          expected="--until must not come before --from in " + " -> ".join(STAGES))


def validate_config(cfg, check_inputs: bool = False, from_stage: str | None = None,
                    until: str | None = None) -> None:
    """Raise on the first problem of ``cfg`` (see the module docstring); returns None when all is well."""
    p = Problems()
    _check_data(p, cfg.data)
    _check_train(p, cfg.pretrain, "pretrain")
    _check_train(p, cfg.train, "train")
    _check_cluster(p, cfg.cluster)
    _check_rest(p, cfg)
    _check_cross_fields(p, cfg)
    p.raise_first()
    check_stage_names(from_stage, until)
    if check_inputs:
        from .pipeline_config import USES_GENERATED

        # K against the identities only matters when the run clusters (strategies with generated images)
        clusters = _reaches(until, "cluster") and any(s in USES_GENERATED for s in cfg.strategies)
        check_config_inputs(cfg, clusters=clusters)


def _reaches(until: str | None, stage: str) -> bool:
    """Whether a run stopping after ``until`` runs ``stage`` (its checks matter only then)."""
    from .stages import STAGES

    return until is None or STAGES.index(until) >= STAGES.index(stage)


# ------------------------------------------------------------------------------------------ inputs


def check_config_inputs(cfg, clusters: bool = True) -> None:
    """The files and folders ``cfg`` names (cheap: existence, types, one parquet column, checkpoints);
    ``clusters``: also K against the training identities (when the run reaches the cluster stage)."""
    check_folder(cfg.run_root, "run_root", must_exist=False)
    d = cfg.data
    num_ids, source = None, None
    if d.manifests:
        for split in ("train", "query", "gallery"):
            uri = split_file(d.manifests, split)
            if not storage.exists(uri):
                raise ConfigError("manifest missing", where=f"data.manifests={d.manifests}",
                                  expected=f"{uri} (train/query/gallery.parquet, written by `slsr data manifest`)")
        num_ids = _count_ids(split_file(d.manifests, "train"))
        source = f"training identities in {d.manifests}"
    elif d.dataset != "synthetic":
        if d.root is None:
            raise ConfigError("no dataset location", where="data.root",
                              expected=f"the folder of dataset {d.dataset!r} (or data.manifests=...)")
        check_folder(d.root, "data.root")
    elif d.root is not None:
        check_folder(d.root, "data.root", must_exist=False)
    if clusters and num_ids is None:
        num_ids, source = _ids_of_finished_prepare(cfg)
    if clusters and num_ids is not None:
        p = Problems()
        _check_k(p, cfg.cluster, num_ids, source)
        p.raise_first()
    checked = set()
    for key, model in (("pretrain.model.pretrained", cfg.pretrain.model), ("train.model.pretrained", cfg.train.model)):
        if model.pretrained and (model.pretrained, model.backbone) not in checked:
            checked.add((model.pretrained, model.backbone))
            check_backbone_weights(model.pretrained, model.backbone,
                                   "pretrained" if model.pretrained == cfg.pretrained else key)


def check_folder(uri: str | None, key: str, must_exist: bool = True) -> None:
    """A local ``uri`` must be a folder (or, with ``must_exist=False``, not exist yet); S3 prefixes pass."""
    if uri is None or storage.is_s3(uri):
        return
    if os.path.isfile(uri):
        raise ConfigError(f"{uri} is a file", where=key, expected="a folder")
    if must_exist and not os.path.isdir(uri):
        raise ConfigError(f"{uri} does not exist", where=key, expected="an existing folder")


def _count_ids(uri: str) -> int:
    import pyarrow.compute as pc

    table = storage.read_table(uri, columns=["pid"])
    return len(pc.unique(table["pid"]))


def _ids_of_finished_prepare(cfg) -> tuple[int | None, str | None]:
    """Training identities of this run's prepare artifact, when it is done for this config."""
    from .pipeline import stage_hashes
    from .stages import is_done

    if storage.is_s3(cfg.run_root) or not os.path.isdir(cfg.run_root):
        return None, None
    if not is_done(cfg.run_root, "prepare", stage_hashes(cfg)["prepare"]):
        return None, None
    uri = RunLayout(cfg.run_root).split("train")
    if not storage.exists(uri):
        return None, None
    return _count_ids(uri), f"training identities in {uri}"


# ------------------------------------------------------------------------------------------ checkpoints


def _torch_load(uri: str, key: str, expected: str):
    import torch

    from .models import WeightsError

    if not storage.exists(uri):
        raise WeightsError(f"{uri} does not exist", where=key, expected=expected)
    data = storage.read_bytes(uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise WeightsError(f"{uri} is not a torch checkpoint of tensors and plain values ({_torch_reason(e)})",
                           where=key, expected=expected) from e


def _torch_reason(e: Exception) -> str:
    """The useful part of torch's long weights_only error text."""
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|Check the documentation|$)", str(e), re.S)
    return _short(Exception(m.group(1)), 200) if m and m.group(1).strip() else _short(e, 200)


def _meta_model(model_cfg):
    import torch

    from .models.reid import ReidModel

    with torch.device("meta"):
        return ReidModel(model_cfg)


def _load_into_meta(module, state) -> None:
    with warnings.catch_warnings():  # copying into meta tensors is a no-op: only keys/shapes are checked
        warnings.simplefilter("ignore")
        module.load_state_dict(state, strict=True)


def check_backbone_weights(uri: str, backbone: str, key: str) -> None:
    """``uri`` holds a torchvision ``backbone`` state dict (``fc.*`` ignored) of the right shapes, as
    ``models.reid.load_pretrained_backbone`` will require on the workers."""
    from .models import ModelConfig, WeightsError

    expected = f"a torchvision {backbone} state dict (ImageNet weights)"
    state = _torch_load(uri, key, expected)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and hasattr(v, "shape") for k, v in state.items()):
        raise WeightsError(f"{uri} holds a {type(state).__name__}, not tensors by name", where=key, expected=expected)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    model = _meta_model(ModelConfig(backbone=backbone, num_classes=2, pretrained=None))
    try:
        _load_into_meta(model.backbone, state)
    except RuntimeError as e:
        raise WeightsError(f"{uri} does not fit the backbone ({_short(e)})", where=key, expected=expected) from e


def _short(e: Exception, limit: int = 300) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model_checkpoint(uri: str, key: str = "--checkpoint"):
    """``uri`` is a checkpoint written by ``models.save_checkpoint`` whose weights fit its own config;
    returns that :class:`~slsr_ray.models.ModelConfig`. Nothing is computed (meta device)."""
    from .models import ModelConfig, WeightsError

    expected = "a slsr model checkpoint (model.pt written by pretraining or training)"
    blob = _torch_load(uri, key, expected)
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict) or not isinstance(
            blob.get("config"), dict):
        raise WeightsError(f"{uri} holds no state_dict and config", where=key, expected=expected)
    try:
        cfg = ModelConfig.from_dict({**blob["config"], "pretrained": None})
        _load_into_meta(_meta_model(cfg), blob["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{uri} does not match its own model config ({_short(e)})", where=key,
                           expected=expected) from e
    return cfg
