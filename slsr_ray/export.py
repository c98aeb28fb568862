"""Use a trained model outside the pipeline: find it, and export its retrieval feature path.

A *model reference* is either a run root (the model of its ``train.strategy``, or of ``strategy=``),
a training folder holding ``model.pt``, or a checkpoint file (local or ``s3://``) written by
:func:`slsr_ray.models.save_checkpoint`. :func:`load_reference` turns it into the model, its config
and its training extras, with one-line errors naming the file.

:func:`export_model` writes the **retrieval feature path only** (backbone + global pooling, plus the
bottleneck for ``feature="bottleneck"``; no classifier, no noise adaptation layer) as ONNX or
TorchScript with a dynamic batch dimension, and a JSON model card beside it (``model.onnx`` ->
``model.onnx.card.json``) that says how to feed it: input size, normalisation, feature dimension, the
training config hash and, for a run root, the run's evaluation metrics. The exported graph takes the
*normalised* float32 NCHW batch, exactly what :func:`slsr_ray.extract.normalise` makes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import nn

from . import layout, storage
from .config import config_hash
from .errors import SlsrError
from .layout import RunLayout
from .stages import MARKER, read_record

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
MODEL_FILE = layout.MODEL_FILE
ONNX_OPSET = 17


class ModelError(SlsrError, ValueError):
    """A model reference that is not a usable checkpoint or run root."""


class ExportError(SlsrError, ValueError):
    """An export that cannot be done (unknown format, missing exporter package)."""


def first_line(err: BaseException | str) -> str:
    """The first line of an error's text: torch's unpickling errors run over many lines."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass
class ModelSource:
    """Where a model came from: its checkpoint, and the run root / strategy when it is a run's model."""

    checkpoint: str
    run_root: str | None = None
    strategy: str | None = None


def _parent(uri: str) -> str:
    return posixpath.dirname(uri.rstrip("/")) if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri))


def _run_root_of(checkpoint: str) -> ModelSource:
    """A checkpoint at ``<run_root>/train/<strategy>/model.pt`` belongs to that run."""
    folder = _parent(checkpoint)
    train_dir = _parent(folder)
    run_root = _parent(train_dir)
    if posixpath.basename(train_dir.rstrip("/")) == "train" and storage.exists(RunLayout(run_root).config):
        return ModelSource(checkpoint, run_root, posixpath.basename(folder.rstrip("/")))
    return ModelSource(checkpoint)


def resolve_model(ref: str, strategy: str | None = None) -> ModelSource:
    """Find the checkpoint of a model reference (see the module docstring); ModelError otherwise."""
    ref = storage.absolute(str(ref))
    if storage.exists(RunLayout(ref).config):
        if strategy is None:
            cfg = storage.read_json(RunLayout(ref).config)  # CorruptFileError naming it
            strategy = (cfg.get("train") or {}).get("strategy") if isinstance(cfg, dict) else None
            if not isinstance(strategy, str):
                raise ModelError(f"{RunLayout(ref).config} has no train.strategy; pass --strategy")
        ckpt = RunLayout(ref).model(f"train/{strategy}")
        if read_record(ref, f"train/{strategy}") is None or not storage.exists(ckpt):
            raise ModelError(f"run root {ref} has no finished train/{strategy} stage (no {ckpt} with its "
                             f"{MARKER}); run the pipeline first or pass a model.pt")
        return ModelSource(ckpt, ref, strategy)
    if strategy is not None:
        raise ModelError(f"--strategy needs a run root, but {ref} has no config.json")
    if storage.exists(storage.join(ref, MODEL_FILE)):
        return _run_root_of(storage.join(ref, MODEL_FILE))
    if not storage.exists(ref):
        raise ModelError(f"model {ref} does not exist (expected a model.pt checkpoint or a run root)")
    fs, path = storage.filesystem(ref)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        raise ModelError(f"model {ref} is a folder with neither {MODEL_FILE} nor a run's config.json")
    return _run_root_of(ref)


@dataclass
class LoadedModel:
    model: nn.Module
    config: object  # slsr_ray.models.ModelConfig
    extra: dict
    source: ModelSource

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at (the checkpoint's training extras)."""
        return int(self.extra.get("height", 256)), int(self.extra.get("width", 128))

    def feature_dim(self, feature: str) -> int:
        return int(self.model.feature_dim if feature == "pool" else self.config.bottleneck_dim)


def load_reference(ref: str, strategy: str | None = None) -> LoadedModel:
    """Resolve and load a model reference on the CPU, in eval mode; ModelError naming the file."""
    from .models import WeightsError, load_model

    source = resolve_model(ref, strategy)
    try:
        model, cfg, extra = load_model(source.checkpoint, map_location="cpu")
    except (WeightsError, storage.StorageError) as e:
        raise ModelError(f"{source.checkpoint} is not a slsr-ray model checkpoint: {first_line(e)}") from e
    return LoadedModel(model, cfg, extra, source)


class FeatureNet(nn.Module):
    """The retrieval feature path of a :class:`~slsr_ray.models.ReidModel`, as ``model.extract`` runs it:
    backbone (pooled), then the bottleneck for ``feature="bottleneck"`` (eval mode: no dropout)."""

    def __init__(self, model: nn.Module, feature: str = "pool"):
        super().__init__()
        from .models.reid import FEATURES

        if feature not in FEATURES:
            raise ExportError(f"feature must be one of {FEATURES}, got {feature!r}")
        self.backbone = model.backbone
        self.head = model.bottleneck if feature == "bottleneck" else nn.Identity()
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def card_path(output: str) -> str:
    """``model.onnx`` -> ``model.onnx.card.json`` (beside the exported file; one card per export)."""
    return str(output) + ".card.json"


def _to_onnx(net: FeatureNet, sample: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 prefers the torch.export-based exporter, which needs onnxscript; the TorchScript-based
        # one needs nothing beyond torch and exports ResNets exactly (checked against onnxruntime below).
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (sample,), buf, dynamo=False, input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=ONNX_OPSET)
    return buf.getvalue()


def _to_torchscript(net: FeatureNet, sample: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, but still loads everywhere
        traced = torch.jit.trace(net, sample)
        torch.jit.save(traced, buf)
    return buf.getvalue()


def run_onnx(data: bytes, images: np.ndarray) -> np.ndarray:
    """Features of a normalised float32 NCHW batch from ONNX bytes, with onnxruntime on the CPU."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("running ONNX models needs onnxruntime: pip install 'slsr-ray[export]'") from e
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(["features"], {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]


def run_torchscript(data: bytes, images: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, not gone
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()


RUNNERS = {"onnx": run_onnx, "torchscript": run_torchscript}


def _training_info(loaded: LoadedModel) -> dict:
    """Strategy, epochs and the training config hash (of metrics.json's TrainConfig when the training
    folder has one, else of the checkpoint's model config and extras); the stage hash for a run."""
    src, extra = loaded.source, loaded.extra
    info = {k: extra.get(k) for k in ("strategy", "epochs", "num_ids")}
    metrics_uri = storage.join(_parent(src.checkpoint), layout.METRICS_FILE)
    if storage.exists(metrics_uri):
        info["config_hash"] = config_hash(storage.read_json(metrics_uri)["config"])
        info["config_hash_of"] = "TrainConfig in " + metrics_uri
    else:
        plain = {k: v for k, v in extra.items() if k != "history"}
        info["config_hash"] = config_hash(asdict(loaded.config), plain)
        info["config_hash_of"] = "model config and training extras of the checkpoint"
    if src.run_root is not None:
        rec = read_record(src.run_root, f"train/{src.strategy}")
        info["stage_hash"] = rec.hash if rec else None
    return info


def _run_metrics(source: ModelSource) -> dict | None:
    """The run's evaluation of this model (``evaluate/<strategy>/{plain,rerank}.json``, without the CMC)."""
    if source.run_root is None:
        return None
    out = {}
    for kind in ("plain", "rerank"):
        uri = RunLayout(source.run_root).metrics(source.strategy, kind)
        if storage.exists(uri):
            out[kind] = {k: v for k, v in storage.read_json(uri).items() if k != "cmc"}
    return out or None


def model_card(loaded: LoadedModel, feature: str, fmt: str) -> dict:
    """What a user of the exported file needs to feed it and to trust it."""
    from . import __version__
    from .transforms import normalization

    h, w = loaded.input_size
    cfg = loaded.config
    mean, std = normalization(cfg.input_norm)
    return {
        "format": fmt,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "backbone": cfg.backbone,
        "last_stride": cfg.last_stride,
        "input": {"name": "images", "shape": ["batch", 3, h, w], "dtype": "float32", "layout": "NCHW, RGB"},
        "input_size": [h, w],
        "preprocessing": "decode to RGB, resize to input_size (PIL bilinear), scale to [0, 1], subtract mean, divide by std",
        "normalisation": {"name": cfg.input_norm, "mean": list(mean), "std": list(std)},
        "output": {"name": "features", "shape": ["batch", loaded.feature_dim(feature)], "dtype": "float32"},
        "feature": feature,
        "feature_dim": loaded.feature_dim(feature),
        "l2_normalised": False,
        "excluded": ["classifier", "noise adaptation layer"],
        "training": _training_info(loaded),
        "metrics": _run_metrics(loaded.source),
        "source": {"checkpoint": loaded.source.checkpoint, "run_root": loaded.source.run_root,
                   "strategy": loaded.source.strategy},
        "versions": {"slsr_ray": __version__, "torch": torch.__version__},
    }


def export_model(ref: str, fmt: str, output: str, feature: str = "pool", strategy: str | None = None,
                 check_batch: int = 2) -> tuple[str, str]:
    """Export a model reference's feature path to ``output`` (local or s3://) and write its model card;
    returns (output, card path). The export is run once on a random batch and compared with PyTorch;
    the largest difference goes into the card."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
    loaded = load_reference(ref, strategy)
    net = FeatureNet(loaded.model, feature)
    h, w = loaded.input_size
    sample = torch.randn(check_batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    data = _to_onnx(net, sample) if fmt == "onnx" else _to_torchscript(net, sample)
    seconds = time.perf_counter() - t0
    with torch.inference_mode():
        expected = net(sample).numpy()
    diff = float(np.abs(RUNNERS[fmt](data, sample.numpy()) - expected).max())
    output = storage.absolute(output)
    storage.write_bytes(output, data)
    card = model_card(loaded, feature, fmt)
    card["file"] = {"path": output, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    card["check"] = {"batch": check_batch, "max_abs_diff_vs_pytorch": diff, "export_seconds": round(seconds, 2)}
    card_uri = card_path(output)
    storage.write_json(card_uri, card)
    log.info("exported %s (%s, %d-d %s features) to %s", loaded.source.checkpoint, fmt, card["feature_dim"], feature,
             output)
    return output, card_uri
