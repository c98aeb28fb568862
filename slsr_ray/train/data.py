"""What a Ray Train worker reads: the manifest dataset, the epoch sampler (real:generated mix, sharding
across ranks) and the rows the driver ships to the workers."""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import storage
from ..labels import LabelStrategy, load_membership, make_strategy
from .config import TrainConfig

log = logging.getLogger(__name__)



class ManifestDataset(torch.utils.data.Dataset):
    """Rows of a manifest as (image tensor, pid, cluster, is_generated)."""

    def __init__(self, paths: list[str], pids, clusters, generated, transform):
        self.paths = list(paths)
        self.pids = np.asarray(pids, dtype=np.int64)
        self.clusters = np.asarray(clusters, dtype=np.int64)
        self.generated = np.asarray(generated, dtype=bool)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..data import read_image

        img = self.transform(read_image(self.paths[i]))
        return img, int(self.pids[i]), int(self.clusters[i]), bool(self.generated[i])


class EpochSampler(torch.utils.data.Sampler):
    """Per-epoch index list: every real image plus generated images, shuffled, sharded over ranks.

    Real indices are ``0..num_real-1``, generated ``num_real..num_real+num_generated-1``.
    ``generated_ratio=None`` takes every generated image; r takes round(r * num_real) per epoch (without
    replacement while there are enough). Every rank gets the same count (the list is padded by wrapping)
    so DDP ranks run the same number of steps. Call :meth:`set_epoch` before each epoch."""

    def __init__(self, num_real, num_generated, generated_ratio=None, rank=0, world_size=1, seed=0):
        self.num_real, self.num_generated = num_real, num_generated
        self.generated_ratio = generated_ratio
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_size(self) -> int:
        if self.num_generated == 0:
            return self.num_real
        if self.generated_ratio is None:
            return self.num_real + self.num_generated
        return self.num_real + int(round(self.generated_ratio * self.num_real))

    def __len__(self) -> int:
        return math.ceil(self.epoch_size() / self.world_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])  # identical on every rank
        idx = [np.arange(self.num_real)]
        n_gen = self.epoch_size() - self.num_real
        if n_gen > 0:
            replace = n_gen > self.num_generated
            idx.append(self.num_real + rng.choice(self.num_generated, size=n_gen, replace=replace))
        order = rng.permutation(np.concatenate(idx))
        total = len(self) * self.world_size
        order = np.resize(order, total)  # wraps around to pad
        return iter(order[self.rank :: self.world_size].tolist())


def _as_table(manifest: str | pa.Table | None, what: str) -> pa.Table | None:
    if manifest is None:
        return None
    table = manifest if isinstance(manifest, pa.Table) else storage.read_table(manifest)
    from ..data import to_manifest

    try:
        return to_manifest(table)
    except ValueError as e:
        raise ValueError(f"{what} manifest: {e}") from e


def prepare_rows(
    cfg: TrainConfig,
    train_manifest: str | pa.Table,
    generated_manifest: str | pa.Table | None = None,
    membership: dict[int, list[int]] | str | None = None,
) -> tuple[dict, LabelStrategy]:
    """Validate the manifests against the strategy; returns plain row lists for the workers and the
    strategy (built here once so that bad labels fail on the driver, before any worker starts)."""
    train = _as_table(train_manifest, "train")
    is_gen = pc.equal(train["source"], "generated")
    real = train.filter(pc.invert(is_gen))
    gen_parts = [train.filter(is_gen)]
    extra = _as_table(generated_manifest, "generated")
    if extra is not None:
        gen_parts.append(extra.filter(pc.equal(extra["source"], "generated")))
        if gen_parts[-1].num_rows != extra.num_rows:
            raise ValueError("generated manifest has rows whose source is not 'generated'")
    gen = pa.concat_tables([g.select(real.column_names) for g in gen_parts]) if gen_parts else None
    if real.num_rows == 0:
        raise ValueError("train manifest has no real images")
    pids = real["pid"].to_numpy()
    uniq = np.unique(pids)
    if uniq[0] != 0 or uniq[-1] != len(uniq) - 1:
        raise ValueError(
            f"train identities must be relabelled 0..N-1 (load_dataset does this); got {len(uniq)} ids "
            f"ranging {uniq[0]}..{uniq[-1]}"
        )
    num_ids = len(uniq)
    if isinstance(membership, str):
        membership = load_membership(membership)
    strategy = make_strategy(cfg.strategy, num_ids, membership=membership, epsilon=cfg.epsilon, lam=cfg.lam)
    if gen is not None and gen.num_rows and not strategy.uses_generated:
        if extra is not None:
            raise ValueError(
                f"strategy {cfg.strategy!r} trains on real images only; drop the generated manifest or "
                "pick lsro/all_in_one/pseudo/slsr"
            )
        log.info("strategy %s: excluding %d generated rows of the train manifest", cfg.strategy, gen.num_rows)
        gen = None
    if gen is not None and gen.num_rows:
        # every distinct cluster once through the strategy: raises on cluster -1 / unknown clusters
        clusters = np.unique(gen["cluster"].to_numpy())
        n = len(clusters)
        logits = torch.zeros(n, strategy.num_outputs())
        strategy.targets(torch.full((n,), -1), torch.as_tensor(clusters), torch.ones(n, dtype=torch.bool), logits)
    else:
        gen = real.slice(0, 0)
    rows = {
        "paths": real["path"].to_pylist() + gen["path"].to_pylist(),
        "pids": np.concatenate([pids, np.full(gen.num_rows, -1)]).tolist(),
        "clusters": np.concatenate([np.full(real.num_rows, -1), gen["cluster"].to_numpy()]).tolist(),
        "num_real": real.num_rows,
        "num_generated": gen.num_rows,
        "num_ids": num_ids,
        "membership": {int(k): list(v) for k, v in (membership or {}).items()},
    }
    return rows, strategy
