"""Label strategies for real and generated images, and the SLSR loss (paper section 3.2).

Every strategy turns a batch into a target distribution ``q`` [B, C_out] and a per-sample weight
``lam`` [B] for the one loss

    L_i = -(1 - lam_i) log p(y_i) - lam_i * sum_k q_i(k) log p(k)        (averaged over the batch)

Real images have an identity ``y`` and ``lam = 0`` (plain cross-entropy), except under ``lsr`` where
``lam = epsilon`` and ``q`` is uniform, which is exactly label smoothing. Generated images have no
identity (``pid = -1``): their hard term is absent and ``lam`` (the ``lam`` parameter, paper: 1)
weights the soft term, so ``lam < 1`` down-weights generated images (Tune searches it).

=============  ====================================================================================
strategy       target of a generated image from cluster c
=============  ====================================================================================
``none``       no generated images (CE on real images only; step 1 of Algorithm 1)
``lsr``        no generated images; real images get label smoothing with ``epsilon`` (Szegedy 2016)
``lsro``       uniform 1/C over all identities (Zheng et al. 2017)
``all_in_one`` one-hot on an extra class C; the model has C+1 outputs (Salimans et al. 2016)
``pseudo``     one-hot on the arg-max of the current model's logits, detached (Lee 2013)
``slsr``       1/|S_c| on the identities S_c of cluster c, 0 elsewhere (the paper)
=============  ====================================================================================

The cluster membership ``{cluster: [train pids]}`` comes from the clustering stage's JSON
(:func:`load_membership`). Degenerate cases follow from the definition: a one-identity cluster gives a
one-hot target; one cluster holding every identity gives the LSRO target.
"""

from __future__ import annotations

import torch

from . import storage
from .errors import SlsrError

STRATEGIES = ("none", "lsr", "lsro", "all_in_one", "pseudo", "slsr")


class LabelError(SlsrError, ValueError):
    """A batch or cluster membership that a label strategy cannot turn into targets."""


def slsr_loss(
    log_probs: torch.Tensor, labels: torch.Tensor, target_dist: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """Mean over the batch of ``-(1-lam) log p(y) - lam * sum_k q(k) log p(k)``.

    ``log_probs`` [B, C] are log-probabilities (log-softmax, or the noise-adapted ones), ``labels`` [B]
    the identities (negative for generated images: their hard term is dropped), ``target_dist`` [B, C]
    and ``lam`` [B] from :meth:`LabelStrategy.targets`. Rows with ``q = 0`` contribute nothing to the
    soft term even where ``log p = -inf``."""
    log_probs = log_probs.float()
    lam = lam.to(log_probs).reshape(-1)
    has_label = labels >= 0
    safe = labels.clamp_min(0).long()
    hard = -log_probs.gather(1, safe[:, None]).squeeze(1)
    hard = torch.where(has_label, hard, torch.zeros_like(hard))
    hard_weight = torch.where(has_label, 1 - lam, torch.zeros_like(lam))
    q = target_dist.to(log_probs)
    # q * log p with 0 * -inf := 0
    soft = -torch.where(q > 0, q * log_probs, torch.zeros_like(log_probs)).sum(1)
    return (hard_weight * hard + lam * soft).mean()


class LabelStrategy:
    """One label strategy: see the module docstring. Build with :func:`make_strategy`."""

    def __init__(
        self,
        name: str,
        num_classes: int,
        membership: dict[int, list[int]] | None = None,
        epsilon: float = 0.1,
        lam: float = 1.0,
    ):
        if name not in STRATEGIES:
            raise LabelError(f"unknown label strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
        if num_classes < 1:
            raise LabelError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= epsilon <= 1:
            raise LabelError(f"epsilon must be in [0, 1], got {epsilon}")
        if not 0 <= lam <= 1:
            raise LabelError(f"lam must be in [0, 1], got {lam}")
        self.name = name
        self.num_classes = num_classes
        self.epsilon = float(epsilon)
        self.lam = float(lam)
        self.cluster_targets: dict[int, torch.Tensor] = {}
        if name == "slsr":
            if not membership:
                raise LabelError("strategy 'slsr' needs the cluster membership {cluster: [pids]} (--clusters)")
            self.cluster_targets = self._cluster_targets(membership, num_classes)

    @property
    def uses_generated(self) -> bool:
        """Whether generated images take part in training under this strategy."""
        return self.name not in ("none", "lsr")

    def num_outputs(self, num_classes: int | None = None) -> int:
        """Classifier outputs needed: C, or C+1 for ``all_in_one`` (the extra 'generated' class)."""
        c = self.num_classes if num_classes is None else num_classes
        return c + 1 if self.name == "all_in_one" else c

    @staticmethod
    def _cluster_targets(membership: dict[int, list[int]], num_classes: int) -> dict[int, torch.Tensor]:
        out = {}
        for cluster, pids in membership.items():
            pids = sorted({int(p) for p in pids})
            if not pids:
                raise LabelError(f"cluster {cluster} has no identities; every cluster needs at least one")
            unknown = [p for p in pids if not 0 <= p < num_classes]
            if unknown:
                raise LabelError(
                    f"cluster {cluster} names unknown identities {unknown[:10]}"
                    f"{' ...' if len(unknown) > 10 else ''}: training identities are 0..{num_classes - 1}"
                )
            q = torch.zeros(num_classes)
            q[pids] = 1.0 / len(pids)
            out[int(cluster)] = q
        return out

    def targets(
        self,
        pids: torch.Tensor,
        clusters: torch.Tensor,
        is_generated: torch.Tensor,
        logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target distributions [B, num_outputs] and per-sample lam [B] for a batch (see module doc)."""
        pids = torch.as_tensor(pids).long().reshape(-1)
        clusters = torch.as_tensor(clusters).long().reshape(-1)
        gen = torch.as_tensor(is_generated).bool().reshape(-1)
        device = pids.device
        b, c_out = pids.numel(), self.num_outputs()
        real = ~gen
        bad = pids[real][(pids[real] < 0) | (pids[real] >= self.num_classes)]
        if bad.numel():
            raise LabelError(
                f"real images with identities {bad.unique().tolist()[:10]} outside 0..{self.num_classes - 1}"
            )
        q = torch.zeros(b, c_out, device=device)
        lam = torch.zeros(b, device=device)
        q[real, pids[real]] = 1.0  # the real rows' q is only used (as the uniform mix) under lsr
        if self.name == "lsr":
            q[real] = 1.0 / self.num_classes
            lam[real] = self.epsilon
        if not gen.any():
            return q, lam
        if not self.uses_generated:
            raise LabelError(
                f"strategy {self.name!r} does not use generated images, but the batch has {int(gen.sum())}; "
                "do not feed generated rows (pick lsro/all_in_one/pseudo/slsr to use them)"
            )
        lam[gen] = self.lam
        if self.name == "lsro":
            q[gen] = 1.0 / self.num_classes
        elif self.name == "all_in_one":
            q[gen, self.num_classes] = 1.0
        elif self.name == "pseudo":
            if logits is None:
                raise LabelError("strategy 'pseudo' needs the current logits to label generated images")
            guess = logits.detach()[gen][:, : self.num_classes].argmax(1).to(device)
            q[gen.nonzero().squeeze(1), guess] = 1.0
        elif self.name == "slsr":
            gen_clusters = clusters[gen].tolist()
            missing = sorted({c for c in gen_clusters if c not in self.cluster_targets})
            if missing:
                if -1 in missing:
                    raise LabelError(
                        "generated images without a cluster id (cluster = -1) cannot be labelled under 'slsr'; "
                        "generated manifest rows must carry the cluster of the GAN that made them"
                    )
                raise LabelError(
                    f"generated images name clusters {missing} that the membership does not have "
                    f"(known clusters: {sorted(self.cluster_targets)})"
                )
            q[gen] = torch.stack([self.cluster_targets[c] for c in gen_clusters]).to(device)
        return q, lam


def make_strategy(
    name: str,
    num_classes: int,
    membership: dict[int, list[int]] | None = None,
    epsilon: float = 0.1,
    lam: float = 1.0,
) -> LabelStrategy:
    """A label strategy over ``num_classes`` identities (see the module docstring for ``name``)."""
    return LabelStrategy(name, num_classes, membership=membership, epsilon=epsilon, lam=lam)


def load_membership(uri: str) -> dict[int, list[int]]:
    """Read the clustering stage's membership JSON (``{"k", "rule", "clusters": [{"cluster", "size",
    "pids"}, ...]}``) from a local path or s3:// URI as ``{cluster: [pids]}``."""
    doc = storage.read_json(uri)
    try:
        entries = doc["clusters"]
        membership = {int(e["cluster"]): [int(p) for p in e["pids"]] for e in entries}
    except (KeyError, TypeError, ValueError) as e:
        raise LabelError(
            f"{uri}: not a cluster membership file; expected {{'k': K, 'rule': ..., 'clusters': "
            f"[{{'cluster': c, 'size': n, 'pids': [...]}}, ...]}} ({e!r})"
        ) from e
    if not membership:
        raise LabelError(f"{uri}: cluster membership lists no clusters")
    return membership
