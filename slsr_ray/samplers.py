"""PK sampling for the triplet loss of ``train.recipe: bot``: every batch holds P identities with K images
each (the real part), plus the epoch's share of generated images.

The sampler yields one flat index list per epoch whose consecutive chunks of ``batch`` indices are the
batches, so the training loop's ``DataLoader(batch_size=batch, sampler=...)`` keeps its shape. Index
layout as :class:`slsr_ray.train.EpochSampler`: real images ``0..num_real-1``, generated images after
them. The generated count per epoch follows the same rule (every generated image, or
``generated_ratio`` x the real count), spread evenly over the batches. The batch list is drawn from
``(seed, epoch)`` only, identical on every rank, and rank r takes batches r, r + world, ...
"""

from __future__ import annotations

import numpy as np
import torch


class PKEpochSampler(torch.utils.data.Sampler):
    """``real_pids``: identity of each real image; ``batch``: images per batch on one rank;
    ``instances``: K. P = (batch - generated slots) // K, at least 2 (a triplet needs a negative);
    slots left over by the rounding are filled with generated images, or with more identities when
    there are none. Identities with fewer than K images are sampled with replacement."""

    def __init__(self, real_pids, num_generated: int, batch: int, instances: int = 4, generated_ratio=None,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        pids = np.asarray(real_pids, dtype=np.int64)
        self.ids = np.unique(pids)
        self.by_id = {int(p): np.flatnonzero(pids == p) for p in self.ids}
        self.num_real, self.num_generated = len(pids), int(num_generated)
        self.batch, self.k, self.generated_ratio = int(batch), int(instances), generated_ratio
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        if len(self.ids) < 2:
            raise ValueError(f"PK sampling needs at least 2 identities, got {len(self.ids)}")
        if self.batch < 2 * self.k:
            raise ValueError(f"a batch of {self.batch} images per worker cannot hold 2 identities x {self.k} images "
                             "(train.pk_instances): raise batch_size or lower pk_instances")
        gen_epoch = self._generated_per_epoch()
        share = gen_epoch / (self.num_real + gen_epoch) if gen_epoch else 0.0
        slots = min(int(round(self.batch * share)), self.batch - 2 * self.k) if gen_epoch else 0
        self.p = min((self.batch - slots) // self.k, len(self.ids))
        self.gen_slots = self.batch - self.p * self.k if gen_epoch else 0
        if not gen_epoch and self.p * self.k < self.batch:  # no generated images: top up with one more id
            self.extra = self.batch - self.p * self.k
        else:
            self.extra = 0

    def _generated_per_epoch(self) -> int:
        if self.num_generated == 0:
            return 0
        if self.generated_ratio is None:
            return self.num_generated
        return int(round(self.generated_ratio * self.num_real))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def iterations(self) -> int:
        """Batches per rank per epoch: about one pass over the real + generated images."""
        size = self.num_real + self._generated_per_epoch()
        return max(1, size // (self.batch * self.world_size))

    def __len__(self) -> int:
        return self.iterations() * self.batch

    def _identity_stream(self, rng: np.random.Generator):
        while True:
            yield from rng.permutation(self.ids).tolist()

    def _images(self, rng: np.random.Generator, pid: int, n: int) -> np.ndarray:
        pool = self.by_id[pid]
        return rng.choice(pool, size=n, replace=len(pool) < n)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        n_batches = self.iterations() * self.world_size
        gen_epoch = self._generated_per_epoch()
        gen = np.empty(0, dtype=np.int64)
        if gen_epoch and self.gen_slots:
            gen = self.num_real + rng.choice(self.num_generated, size=gen_epoch, replace=gen_epoch > self.num_generated)
            gen = np.resize(rng.permutation(gen), n_batches * self.gen_slots)
        ids = self._identity_stream(rng)
        batches = []
        for b in range(n_batches):
            chosen: list[int] = []
            while len(chosen) < self.p + (1 if self.extra else 0):
                pid = next(ids)
                if pid not in chosen or len(chosen) >= len(self.ids):
                    chosen.append(pid)
            parts = [self._images(rng, pid, self.k) for pid in chosen[: self.p]]
            if self.extra:
                parts.append(self._images(rng, chosen[-1], self.extra))
            if self.gen_slots:
                parts.append(gen[b * self.gen_slots : (b + 1) * self.gen_slots])
            batches.append(np.concatenate(parts))
        mine = batches[self.rank :: self.world_size]
        return iter(np.concatenate(mine).astype(np.int64).tolist())
