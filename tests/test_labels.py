"""Label strategies and the SLSR loss against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slsr_ray import storage
from slsr_ray.labels import LabelError, load_membership, make_strategy, slsr_loss

C = 4
PIDS = torch.tensor([2, -1, 0, -1])
CLUSTERS = torch.tensor([-1, 1, -1, 0])
GEN = torch.tensor([False, True, False, True])
MEMBERSHIP = {0: [0, 1, 3], 1: [2]}
# fixed log-probabilities: row i = log of the probability vectors below
PROBS = torch.tensor(
    [[0.1, 0.2, 0.6, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]]
)
LOGP = PROBS.log()


def test_slsr_strategy_targets_and_loss_by_hand():
    s = make_strategy("slsr", C, MEMBERSHIP)
    q, lam = s.targets(PIDS, CLUSTERS, GEN)
    assert torch.allclose(q[1], torch.tensor([0.0, 0.0, 1.0, 0.0]))  # one-identity cluster -> one-hot
    assert torch.allclose(q[3], torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))
    assert lam.tolist() == [0.0, 1.0, 0.0, 1.0]
    loss = slsr_loss(LOGP, PIDS, q, lam)
    # real: -log p(y); generated: -sum q log p
    expected = (
        -math.log(0.6)
        - math.log(0.25)
        - math.log(0.7)
        - (math.log(0.4) + math.log(0.3) + math.log(0.1)) / 3
    ) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_lam_weights_generated_rows():
    s = make_strategy("slsr", C, MEMBERSHIP, lam=0.5)
    q, lam = s.targets(PIDS, CLUSTERS, GEN)
    assert lam.tolist() == [0.0, 0.5, 0.0, 0.5]
    expected = (-math.log(0.6) - 0.5 * math.log(0.25) - math.log(0.7)
                - 0.5 * (math.log(0.4) + math.log(0.3) + math.log(0.1)) / 3) / 4  # fmt: skip
    assert slsr_loss(LOGP, PIDS, q, lam).item() == pytest.approx(expected, rel=1e-6)


def test_lsro_uniform_and_slsr_with_one_cluster_of_all_ids_is_lsro():
    lsro = make_strategy("lsro", C)
    q, lam = lsro.targets(PIDS, CLUSTERS, GEN)
    assert torch.allclose(q[GEN], torch.full((2, C), 0.25))
    one_cluster = make_strategy("slsr", C, {0: [0, 1, 2, 3]})
    q1, lam1 = one_cluster.targets(PIDS, torch.tensor([-1, 0, -1, 0]), GEN)
    assert torch.allclose(q1, q) and torch.equal(lam1, lam)
    expected_gen = -sum(math.log(p) for p in PROBS[3].tolist()) / 4
    loss = slsr_loss(LOGP, PIDS, q, lam)
    assert loss.item() == pytest.approx((-math.log(0.6) - math.log(0.25) - math.log(0.7) + expected_gen) / 4, rel=1e-6)


def test_one_identity_cluster_reduces_to_cross_entropy():
    s = make_strategy("slsr", C, {5: [3]})
    q, lam = s.targets(torch.tensor([-1]), torch.tensor([5]), torch.tensor([True]))
    logits = torch.randn(1, C)
    loss = slsr_loss(torch.log_softmax(logits, 1), torch.tensor([-1]), q, lam)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor([3])).item(), rel=1e-6)


def test_lsr_smooths_real_labels_like_torch():
    s = make_strategy("lsr", C, epsilon=0.1)
    pids = torch.tensor([2, 0])
    q, lam = s.targets(pids, torch.tensor([-1, -1]), torch.tensor([False, False]))
    assert lam.tolist() == pytest.approx([0.1, 0.1])
    logits = torch.randn(2, C)
    ours = slsr_loss(torch.log_softmax(logits, 1), pids, q, lam)
    ref = torch.nn.functional.cross_entropy(logits, pids, label_smoothing=0.1)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_none_is_plain_cross_entropy_and_rejects_generated_rows():
    s = make_strategy("none", C)
    pids = torch.tensor([1, 3, 0])
    q, lam = s.targets(pids, torch.full((3,), -1), torch.zeros(3, dtype=torch.bool))
    logits = torch.randn(3, C)
    assert slsr_loss(torch.log_softmax(logits, 1), pids, q, lam).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, pids).item(), rel=1e-6
    )
    assert not s.uses_generated
    with pytest.raises(LabelError, match="does not use generated images"):
        s.targets(PIDS, CLUSTERS, GEN)


def test_all_in_one_uses_an_extra_class():
    s = make_strategy("all_in_one", C)
    assert s.num_outputs(C) == C + 1 and s.num_outputs() == C + 1
    q, lam = s.targets(PIDS, CLUSTERS, GEN)
    assert q.shape == (4, C + 1)
    assert q[1].tolist() == [0, 0, 0, 0, 1] and q[3].tolist() == [0, 0, 0, 0, 1]
    assert lam.tolist() == [0, 1, 0, 1]
    logp = torch.log_softmax(torch.randn(4, C + 1), 1)
    expected = -(logp[0, 2] + logp[1, 4] + logp[2, 0] + logp[3, 4]) / 4
    assert slsr_loss(logp, PIDS, q, lam).item() == pytest.approx(expected.item(), rel=1e-6)


def test_pseudo_labels_are_the_detached_argmax():
    s = make_strategy("pseudo", C)
    logits = torch.tensor([[0.0, 0, 5, 0], [0, 3, 1, 0], [1, 0, 0, 0], [0, 0, 0, 9]], requires_grad=True)
    q, lam = s.targets(PIDS, CLUSTERS, GEN, logits)
    assert q[1].argmax().item() == 1 and q[3].argmax().item() == 3 and q[GEN].sum().item() == 2
    assert not q.requires_grad
    with pytest.raises(LabelError, match="needs the current logits"):
        s.targets(PIDS, CLUSTERS, GEN)


def test_loss_is_finite_where_q_is_zero_and_log_p_is_minus_inf():
    logp = torch.tensor([[0.0, -float("inf"), -float("inf"), -float("inf")]], requires_grad=True)
    q = torch.tensor([[1.0, 0, 0, 0]])
    loss = slsr_loss(logp, torch.tensor([-1]), q, torch.tensor([1.0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logp.grad).all()


def test_slsr_bad_inputs_name_the_problem():
    s = make_strategy("slsr", C, MEMBERSHIP)
    with pytest.raises(LabelError, match="without a cluster id"):
        s.targets(torch.tensor([-1]), torch.tensor([-1]), torch.tensor([True]))
    with pytest.raises(LabelError, match=r"clusters \[7\]"):
        s.targets(torch.tensor([-1]), torch.tensor([7]), torch.tensor([True]))
    with pytest.raises(LabelError, match=r"unknown identities \[4, 9\]"):
        make_strategy("slsr", C, {0: [0, 4, 9]})
    with pytest.raises(LabelError, match="needs the cluster membership"):
        make_strategy("slsr", C, None)
    with pytest.raises(LabelError, match="unknown label strategy"):
        make_strategy("bogus", C)
    with pytest.raises(LabelError, match=r"identities \[4\] outside"):
        make_strategy("lsro", C).targets(torch.tensor([4]), torch.tensor([-1]), torch.tensor([False]))


def test_load_membership_local_and_s3(tmp_path, s3_bucket):
    doc = {"k": 2, "rule": "any", "clusters": [{"cluster": 0, "size": 3, "pids": [0, 1, 3]}, {"cluster": 1, "size": 1, "pids": [2]}]}
    for uri in (str(tmp_path / "k2.json"), f"{s3_bucket}/clusters/k2.json"):
        storage.write_json(uri, doc)
        assert load_membership(uri) == MEMBERSHIP
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"k": 2}))
    with pytest.raises(LabelError, match="not a cluster membership file"):
        load_membership(str(bad))
