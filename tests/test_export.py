"""``slsr export``: the exported feature path gives PyTorch's features (ONNX Runtime, TorchScript), with a
dynamic batch size and a model card; bad model references are one-line errors naming the file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slsr_ray.cli import app
from slsr_ray.export import (
    ModelError,
    card_path,
    export_model,
    load_reference,
    model_card,
    run_onnx,
    run_torchscript,
)
from slsr_ray.extract import decode_resize, normalise
from slsr_ray.models import ModelConfig, build_model, save_checkpoint
from slsr_ray.transforms import IMAGENET_MEAN, IMAGENET_STD

runner = CliRunner()
H, W = 64, 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A resnet18 re-id checkpoint whose BatchNorm statistics are not the defaults (a few train-mode
    forwards), so that eval-mode export is actually exercised."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=12, backbone="resnet18")
    model = build_model(cfg, announce=False).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, H, W) * 2 + 0.5)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pt")
    save_checkpoint(path, model, cfg, {"height": H, "width": W, "strategy": "slsr", "epochs": 1})
    return path


def _batch(synthetic_dataset, n: int = 5) -> np.ndarray:
    """n synthetic images through the extract stage's preprocessing (a batch size the export never saw)."""
    paths = synthetic_dataset.query["path"].to_pylist()[:n]
    return normalise(np.stack([decode_resize(p, H, W) for p in paths])).numpy()


@pytest.mark.parametrize("fmt,feature", [("onnx", "pool"), ("onnx", "bottleneck"), ("torchscript", "pool")])
def test_exported_features_equal_pytorch(checkpoint, synthetic_dataset, tmp_path, fmt, feature):
    out, card_uri = export_model(checkpoint, fmt, str(tmp_path / f"feat.{fmt}"), feature=feature)
    images = _batch(synthetic_dataset)
    loaded = load_reference(checkpoint)
    expected = loaded.model.extract(torch.from_numpy(images), feature=feature).numpy()
    data = Path(out).read_bytes()
    got = run_onnx(data, images) if fmt == "onnx" else run_torchscript(data, images)
    assert got.shape == expected.shape == (5, 512)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 1e-2  # features, not zeros

    card = json.loads(Path(card_uri).read_text())
    assert card_uri == card_path(out) and card_uri.endswith(".card.json")
    assert card["backbone"] == "resnet18" and card["input_size"] == [H, W] and card["feature"] == feature
    assert card["feature_dim"] == 512 and card["output"]["shape"] == ["batch", 512]
    assert card["normalisation"] == {"name": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert card["file"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert card["check"]["max_abs_diff_vs_pytorch"] < 1e-4
    assert len(card["training"]["config_hash"]) == 16 and card["training"]["strategy"] == "slsr"
    assert card["metrics"] is None  # a bare checkpoint has no run to take metrics from


def test_card_gives_the_models_own_input_normalisation(tmp_path):
    cfg = ModelConfig(num_classes=4, backbone="resnet18", input_norm="symmetric")
    path = str(tmp_path / "sym.pt")
    save_checkpoint(path, build_model(cfg, announce=False), cfg, {"height": H, "width": W})
    card = model_card(load_reference(path), "bottleneck", "onnx")
    assert card["normalisation"] == {"name": "symmetric", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert card["feature_dim"] == cfg.bottleneck_dim and card["input"]["shape"] == ["batch", 3, H, W]


def test_onnx_graph_has_no_classifier_and_a_dynamic_batch(checkpoint, tmp_path):
    import onnx

    out, _ = export_model(checkpoint, "onnx", str(tmp_path / "m.onnx"))
    graph = onnx.load(out).graph
    dim = graph.input[0].type.tensor_type.shape.dim
    assert dim[0].dim_param == "batch" and [d.dim_value for d in dim[1:]] == [3, H, W]
    names = {init.name for init in graph.initializer}
    assert not any(n.startswith(("classifier", "noise", "bottleneck")) for n in names)
    # the checkpoint's classifier weights (12 x 512) appear nowhere in the graph
    shapes = {tuple(init.dims) for init in graph.initializer}
    assert (12, 512) not in shapes


def test_cli_export_and_bad_model_files(checkpoint, tmp_path):
    out = str(tmp_path / "cli" / "model.pt")
    res = runner.invoke(app, ["export", checkpoint, "--format", "torchscript", "--output", out])
    assert res.exit_code == 0, res.output
    assert os.path.exists(out) and os.path.exists(card_path(out))

    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("this is not a checkpoint\n" * 20)
    res = runner.invoke(app, ["export", str(not_ckpt), "--output", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(not_ckpt) in lines[0]
    assert "not a slsr-ray model checkpoint" in lines[0]
    assert not os.path.exists(tmp_path / "x.onnx")

    res = runner.invoke(app, ["export", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "y.onnx")])
    assert res.exit_code == 2 and "missing.pt does not exist" in res.stderr
    res = runner.invoke(app, ["export", checkpoint, "--format", "tflite", "--output", str(tmp_path / "z")])
    assert res.exit_code == 2 and "tflite" in res.stderr

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="folder with neither model.pt nor a run's config.json"):
        load_reference(str(tmp_path / "empty"))
