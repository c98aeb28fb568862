"""The BNNeck head of the Bag-of-Tricks baseline (Luo et al. 2019), ``ModelConfig.neck = "bnneck"``.

    pooled feature f_t (the triplet loss's feature) -> BatchNorm1d (bias frozen at 0) -> f_i
                                                     -> Linear(D, C, no bias)  (the ID loss's logits)

Normalising f_t before the classifier separates the feature the ID loss shapes (f_i, on a hypersphere-
like space) from the one the triplet loss shapes (f_t, free Euclidean space). No dropout, as in BoT. The
head keeps the ``bottleneck`` / ``classifier`` attribute names of the paper's head, so
``extract(feature="bottleneck")`` returns f_i and ``feature="pool"`` returns f_t.
"""

from __future__ import annotations

from torch import nn


def bnneck_head(feature_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """(BNNeck, classifier) initialised as in the BoT code: BN weight 1 / bias 0 (frozen), classifier
    weights N(0, 0.001)."""
    bn = nn.BatchNorm1d(feature_dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)  # BoT: a shift would hurt the classifier's decision planes through the origin
    classifier = nn.Linear(feature_dim, num_classes, bias=False)
    nn.init.normal_(classifier.weight, std=0.001)
    return bn, classifier
