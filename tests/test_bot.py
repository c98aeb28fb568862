"""train.recipe=bot (Bag of Tricks): the triplet loss, label smoothing, warm-up, PK batches, the BNNeck
head, and a real tiny Ray Train run with SLSR on top (generated images in the ID loss, not the triplet)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from slsr_ray.config import ConfigError
from slsr_ray.data import to_manifest
from slsr_ray.losses import batch_hard_triplet_loss, smooth_real_targets, warmup_factor
from slsr_ray.models import ModelConfig, load_model
from slsr_ray.models.reid import ReidModel
from slsr_ray.pipeline import PRESETS, load_config
from slsr_ray.samplers import PKEpochSampler
from slsr_ray.train import TrainConfig, evaluate_checkpoint, run_training


def test_batch_hard_triplet_by_hand():
    # ids 0,0,1,1 on a line: hardest positive / negative distances are easy to write down
    f = torch.tensor([[0.0], [1.0], [3.0], [7.0]], requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1])
    # anchor 0: dp 1, dn 3 -> relu(1-3+0.3)=0 ; anchor 1: dp 1, dn 2 -> 0 ; anchor 2: dp 4, dn 2 -> 2.3 ;
    # anchor 3: dp 4, dn 6 -> 0  => mean 2.3/4
    loss = batch_hard_triplet_loss(f, pids, margin=0.3)
    assert loss.item() == pytest.approx(2.3 / 4, abs=1e-5)
    loss.backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_triplet_ignores_generated_rows_and_degenerate_batches():
    f = torch.tensor([[0.0], [1.0], [3.0], [7.0], [100.0], [-50.0]])
    pids = torch.tensor([0, 0, 1, 1, -1, -1])  # generated images (pid -1) far away change nothing
    assert batch_hard_triplet_loss(f, pids).item() == pytest.approx(2.3 / 4, abs=1e-5)
    # one identity only (no negative) or singletons (no positive): nothing to learn, loss 0 and finite grad
    g = torch.randn(4, 3, requires_grad=True)
    for p in (torch.tensor([2, 2, 2, 2]), torch.tensor([0, 1, 2, 3]), torch.tensor([-1, -1, -1, -1])):
        loss = batch_hard_triplet_loss(g, p)
        assert loss.item() == 0.0
        loss.backward()


def test_label_smoothing_of_real_rows_keeps_generated_targets():
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])  # a real row (id 1), a generated SLSR row
    lam = torch.tensor([0.0, 1.0])
    is_gen = torch.tensor([False, True])
    q2, lam2 = smooth_real_targets(q, lam, is_gen, num_ids=4, epsilon=0.1)
    assert torch.allclose(q2[0], torch.full((4,), 0.25)) and lam2[0] == pytest.approx(0.1)
    assert torch.equal(q2[1], q[1]) and lam2[1] == 1.0
    # all_in_one has C+1 outputs: the smoothing spreads over the C identities only
    q3, _ = smooth_real_targets(torch.zeros(1, 5), torch.zeros(1), torch.tensor([False]), num_ids=4, epsilon=0.1)
    assert q3[0].tolist() == [0.25, 0.25, 0.25, 0.25, 0.0]


def test_warmup_is_linear_then_one():
    assert warmup_factor(0, 10) == pytest.approx(0.1)
    assert warmup_factor(5, 10) == pytest.approx(0.55)
    assert warmup_factor(10, 10) == warmup_factor(500, 10) == warmup_factor(3, 0) == 1.0


def test_pk_sampler_batches_hold_p_identities_of_k_images():
    pids = np.repeat(np.arange(12), [5, 3, 4, 4, 6, 2, 4, 4, 4, 4, 4, 4])  # id 5 has only 2 images
    s = PKEpochSampler(pids, num_generated=0, batch=16, instances=4, seed=1)
    s.set_epoch(0)
    idx = list(s)
    assert len(idx) == len(s) == s.iterations() * 16 and s.iterations() == len(pids) // 16
    for b in np.array(idx).reshape(-1, 16):
        ids, counts = np.unique(pids[b], return_counts=True)
        assert len(ids) == 4 and (counts == 4).all()
    s.set_epoch(1)
    assert list(s) != idx


def test_pk_sampler_mixes_generated_images_and_shards_ranks():
    pids = np.repeat(np.arange(10), 4)  # 40 real images
    ranks = [PKEpochSampler(pids, num_generated=100, batch=16, instances=4, generated_ratio=1.0, rank=r,
                            world_size=2, seed=0) for r in range(2)]
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == len(ranks[0])
    for batch in np.array(a + b).reshape(-1, 16):
        real, gen = batch[batch < 40], batch[batch >= 40]
        # ratio 1: half the epoch is generated -> 8 generated slots and 2 identities x 4 images per batch
        assert len(gen) == 8 and gen.max() < 140
        ids, counts = np.unique(pids[real], return_counts=True)
        assert len(ids) == 2 and (counts == 4).all()
    assert a != b  # ranks take different batches
    with pytest.raises(ValueError, match="2 identities"):
        PKEpochSampler(pids, 0, batch=6, instances=4)


def test_bnneck_model_shapes_and_fresh_bias():
    m = ReidModel(ModelConfig(num_classes=7, backbone="resnet18", neck="bnneck"))
    out = m(torch.randn(4, 3, 64, 32))
    assert out["pool"].shape == (4, 512) and out["bottleneck"].shape == (4, 512) and out["logits"].shape == (4, 7)
    assert m.classifier.bias is None and not m.bottleneck.bias.requires_grad
    assert m.extract(torch.randn(2, 3, 64, 32), feature="bottleneck").shape == (2, 512)
    with pytest.raises(ValueError, match="neck must be one of"):
        ModelConfig(neck="fancy")


@pytest.mark.parametrize("preset", PRESETS)
def test_bot_recipe_works_with_every_preset(preset):
    cfg = load_config(preset, ["train.recipe=bot"])
    assert cfg.train.recipe == "bot" and cfg.train.model.neck == "bnneck"
    assert cfg.train.warmup_epochs == max(1, round(cfg.train.epochs / 12))
    assert cfg.pretrain.recipe == "paper" and cfg.pretrain.model.neck == "bottleneck"  # step 1 stays the paper's
    with pytest.raises(ConfigError, match="recipe must be one of"):
        load_config(preset, ["train.recipe=fancy"])


def test_bot_with_slsr_trains_on_ray(ray_session, synthetic_dataset, tmp_path):
    train = synthetic_dataset.train
    n = 24  # stand-in generated images: real pictures marked as generated, with cluster ids
    gen = to_manifest(pa.table({"path": train["path"].to_pylist()[:n], "pid": [-1] * n, "camid": [-1] * n,
                                "source": ["generated"] * n, "cluster": [i % 2 for i in range(n)]}))
    membership = {0: list(range(6)), 1: list(range(6, 12))}
    cfg = TrainConfig(height=64, width=32, batch_size=16, loader_workers=0, erasing_p=0.0, epochs=4, lr=0.02,
                      strategy="slsr", recipe="bot", warmup_epochs=2, num_workers=1, seed=0,
                      model=ModelConfig(backbone="resnet18", dropout=0.0))
    result = run_training(cfg, train, str(tmp_path / "bot"), generated_manifest=gen, membership=membership)
    losses = [m["loss"] for m in result.metrics]
    print("bot+slsr losses", [round(x, 3) for x in losses])
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    lrs = [m["lr"] for m in result.metrics]
    assert lrs[0] < lrs[-1]  # half-way through the 2-epoch warm-up after epoch 1
    model, mcfg, _ = load_model(result.checkpoint)
    assert mcfg.neck == "bnneck" and model.classifier.bias is None
    scores = evaluate_checkpoint(result.checkpoint, synthetic_dataset.query, synthetic_dataset.gallery)
    assert 0 < scores["rank1"] <= 1 and scores["num_valid_queries"] == synthetic_dataset.query.num_rows
