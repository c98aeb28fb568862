"""Losses and schedules of the Bag-of-Tricks re-id recipe (Luo et al. 2019, "Bag of Tricks and A Strong
Baseline for Deep Person Re-identification"), used by ``train.recipe: bot`` on top of the label
strategies of :mod:`slsr_ray.labels`:

* **label smoothing** of the real images' identity targets (epsilon 0.1): the strategy's targets for
  generated images (SLSR, LSRO, ...) are kept, real rows get ``(1 - eps) one-hot + eps uniform``;
* **batch-hard triplet loss** (Hermans et al. 2017, margin 0.3) on the pooled feature ``f_t`` before the
  BNNeck, over **real images only**: a generated image has no identity, so it has no positive and no
  trustworthy negative (its cluster's sparse label says it may be any of |S_c| identities);
* **warm-up**: the learning rate rises linearly from 10 % to 100 % over the first epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_real_targets(
    q: torch.Tensor, lam: torch.Tensor, is_generated: torch.Tensor, num_ids: int, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label smoothing for the real rows of a strategy's (q, lam): with the SLSR loss
    ``-(1 - lam) log p(y) - lam sum_k q(k) log p(k)``, ``q`` uniform over the ``num_ids`` identities and
    ``lam = epsilon`` is exactly label smoothing. Generated rows are returned unchanged."""
    real = ~is_generated.bool().reshape(-1)
    q, lam = q.clone(), lam.clone()
    q[real] = 0.0
    q[real, :num_ids] = 1.0 / num_ids
    lam[real] = epsilon
    return q, lam


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances, clamped before the square root so that the gradient stays finite at 0."""
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * x @ x.t()
    return d2.clamp_min(1e-12).sqrt()


def batch_hard_triplet_loss(features: torch.Tensor, pids: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Mean over anchors of ``relu(max d(a, p) - min d(a, n) + margin)``, batch-hard mining.

    Rows with ``pid < 0`` (generated images) take no part. Anchors without another image of their
    identity or without any other identity in the batch are skipped; with none left the loss is 0 (and
    still part of the graph, so DDP sees every parameter used)."""
    keep = pids >= 0
    f, y = features[keep].float(), pids[keep]
    zero = features.sum() * 0.0
    if f.shape[0] < 2:
        return zero
    d = pairwise_distances(f)
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    has_pos = (same & ~eye).any(1)
    has_neg = (~same).any(1)
    valid = has_pos & has_neg
    if not valid.any():
        return zero
    hardest_pos = torch.where(same, d, torch.zeros_like(d)).max(1).values
    hardest_neg = torch.where(same, torch.full_like(d, float("inf")), d).min(1).values
    losses = F.relu(hardest_pos - hardest_neg + margin)
    return losses[valid].mean() + zero


def warmup_factor(iteration: int, warmup_iters: int, start: float = 0.1) -> float:
    """Linear warm-up multiplier: ``start`` at iteration 0, 1 from ``warmup_iters`` on."""
    if warmup_iters <= 0 or iteration >= warmup_iters:
        return 1.0
    return start + (1.0 - start) * iteration / warmup_iters
