"""The re-id model, its noise adaptation layer, weights loading, checkpoints and transforms."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from slsr_ray.models import (
    ModelConfig,
    NoiseAdaptation,
    ReidModel,
    WeightsError,
    build_model,
    load_model,
    save_checkpoint,
)
from slsr_ray.transforms import build_test_transform, build_train_transform


def small(**kw) -> ModelConfig:
    return ModelConfig(**{"num_classes": 6, "backbone": "resnet18", **kw})


def test_forward_outputs_and_noise_layer_at_init():
    torch.manual_seed(0)
    m = ReidModel(small())
    out = m(torch.randn(4, 3, 64, 32))
    assert out["pool"].shape == (4, 512) and out["bottleneck"].shape == (4, 512) and out["logits"].shape == (4, 6)
    assert torch.allclose(out["log_probs"].exp().sum(1), torch.ones(4), atol=1e-5)
    # T starts at (almost) the identity: adapted probabilities ~ the softmax
    assert torch.allclose(out["log_probs"].exp(), out["clean_log_probs"].exp(), atol=2e-3)
    t = m.noise.transition()
    assert torch.allclose(t.sum(1), torch.ones(6)) and torch.allclose(t.diag(), torch.full((6,), 0.999))
    no_noise = ReidModel(small(noise_layer=False))
    out2 = no_noise(torch.randn(2, 3, 64, 32))
    assert no_noise.noise is None and torch.equal(out2["log_probs"], out2["clean_log_probs"])


def test_noise_layer_is_exact_and_stable():
    layer = NoiseAdaptation(5)
    with torch.no_grad():
        layer.weight.normal_()
    logits = torch.randn(3, 5)
    ref = (torch.softmax(logits, 1) @ layer.transition()).log()
    assert torch.allclose(layer(torch.log_softmax(logits, 1)), ref, atol=1e-6)
    extreme = torch.tensor([[1e4, -1e4, 0.0, 0.0, 0.0]], requires_grad=True)
    out = layer(torch.log_softmax(extreme, 1))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(extreme.grad).all()


def test_noise_layer_learns_a_label_flip():
    """Trained on targets where class 0 is always reported as class 1, T moves mass 0 -> 1."""
    torch.manual_seed(0)
    layer = NoiseAdaptation(3)
    logp = torch.log_softmax(torch.tensor([[8.0, 0.0, 0.0]]), 1)  # the clean model says class 0
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    for _ in range(200):
        loss = -layer(logp)[0, 1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = layer.transition()
    assert t[0, 1] > 0.9 and torch.allclose(t.sum(1), torch.ones(3))


def test_extract_features_eval_mode_and_choice():
    m = ReidModel(small()).train()
    x = torch.randn(3, 3, 64, 32)
    a, b = m.extract(x), m.extract(x)
    assert a.shape == (3, 512) and torch.equal(a, b)  # eval mode: deterministic
    assert m.extract(x, feature="bottleneck").shape == (3, 512)
    assert m.training  # mode restored
    with pytest.raises(ValueError, match="feature must be one of"):
        m.extract(x, feature="logits")
    r50 = ReidModel(ModelConfig(num_classes=3, backbone="resnet50"))
    assert r50.extract(torch.randn(1, 3, 64, 32)).shape == (1, 2048)
    # last stride 1: a 256x128 input keeps a 16x8 map in the last block
    feats = torch.nn.Sequential(*list(r50.backbone.children())[:-2])(torch.randn(1, 3, 256, 128))
    assert feats.shape[-2:] == (16, 8)


def test_pretrained_weights_and_wrong_shape(tmp_path, caplog):
    # (s3:// URIs go through the same storage.read_bytes as checkpoints, tested on S3 below)
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    m = build_model(small(pretrained=str(tmp_path / "r18.pth")))
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)
    assert torch.equal(m.backbone.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)

    bad = ref.state_dict()
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)"):
        build_model(small(pretrained=str(tmp_path / "bad.pth")))
    partial = ref.state_dict()
    del partial["layer4.1.bn2.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"do not fit a torchvision resnet18 backbone: missing keys \(1\)"):
        build_model(small(pretrained=str(tmp_path / "partial.pth")))

    with caplog.at_level(logging.WARNING, logger="slsr_ray.models.reid"):
        build_model(small())
    notices = [r for r in caplog.records if "randomly initialised" in r.getMessage()]
    assert len(notices) == 1


def test_checkpoint_round_trip_local_and_s3(tmp_path, s3_bucket):
    torch.manual_seed(1)
    m = ReidModel(small(num_classes=5, dropout=0.3))
    x = torch.randn(2, 3, 64, 32)
    for uri in (str(tmp_path / "model.pt"), f"{s3_bucket}/run/model.pt"):
        save_checkpoint(uri, m, m.cfg, {"epoch": 3, "history": [{"loss": 1.5}]})
        loaded, cfg, extra = load_model(uri)
        assert cfg == m.cfg and extra == {"epoch": 3, "history": [{"loss": 1.5}]}
        assert not loaded.training
        assert torch.equal(loaded.extract(x), m.extract(x))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        load_model(str(tmp_path / "junk.pt"))


def test_transforms_shapes_and_modes():
    img = Image.new("RGB", (64, 128), (200, 30, 30))
    assert build_train_transform(64, 32)(img).shape == (3, 64, 32)
    assert build_train_transform(56, 56, crop="resize")(img).shape == (3, 56, 56)
    t = build_test_transform(64, 32)(img)
    assert t.shape == (3, 64, 32) and t.dtype == torch.float32
    # ImageNet normalisation: the red channel of pure (200,30,30) is (200/255 - 0.485) / 0.229
    assert t[0, 10, 10].item() == pytest.approx((200 / 255 - 0.485) / 0.229, rel=1e-4)
    with pytest.raises(ValueError, match="crop must be one of"):
        build_train_transform(crop="zoom")
    # the paper's scaling to [-1, 1]: 200 -> 200/127.5 - 1; the extractor's batch path agrees
    t = build_test_transform(64, 32, norm="symmetric")(img)
    assert t[0, 10, 10].item() == pytest.approx(200 / 127.5 - 1, rel=1e-5)
    from slsr_ray.extract import normalise

    batch = normalise(np.asarray(img.resize((32, 64)))[None], "symmetric")[0]
    assert torch.allclose(batch, t, atol=1e-6)
    with pytest.raises(ValueError, match="input_norm must be one of"):
        ModelConfig(input_norm="zscore")
