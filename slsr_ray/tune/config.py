"""The sweep's settings (:class:`SweepConfig`), errors and results."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import ConfigError, from_dict

log = logging.getLogger("slsr_ray.tune")


SEARCHES = ("grid", "random", "optuna")
METRIC = "val_mAP"
EXPERIMENT_NAME = "tune"


class SweepError(ConfigError):
    """A sweep's search space or data cannot work (raised before any trial starts)."""


@dataclass
class SweepConfig:
    """What to search and how.

    ``ks`` / ``lams`` / ``generated`` / ``lrs``: the values searched (``lrs`` None keeps
    ``train.lr``). ``search``: ``grid`` runs every combination ``num_samples`` times, with training seeds
    ``train.seed + 0 .. num_samples-1`` (runs with 0
    generated images do not depend on K or lambda, so the grid trains that baseline once per lr and the
    table repeats it in every K row); ``random`` draws ``num_samples`` points; ``optuna`` lets Optuna
    (``pip install 'slsr-ray[optuna]'``; Ray Tune's ``OptunaSearch``, TPE) pick ``num_samples`` points. ``asha``: stop weak trials early on the
    validation mAP, checked every ``report_every`` epochs (None: 1 with ASHA, else only at the end).
    Resources: each trial holds ``trial_cpus`` and runs ``train_workers`` Ray Train workers of
    ``cpus_per_worker`` CPUs (or a GPU each when the cluster has GPUs); the defaults fit a 2-CPU laptop.
    ``val_fraction`` of the training identities are held out for validation (seeded by ``seed``).
    ``retrain_best``: retrain the best values on the full training set and evaluate on the test split.
    ``retry_failed``: on resume, rerun trials that failed before."""

    ks: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    lams: list[float] = field(default_factory=lambda: [1.0])
    generated: list[int] = field(default_factory=lambda: [0, 4000, 8000, 12000])
    lrs: list[float] | None = None
    search: str = "grid"
    num_samples: int = 1
    asha: bool = False
    asha_grace_period: int = 1
    asha_reduction_factor: float = 2.0
    report_every: int | None = None
    max_concurrent_trials: int = 1
    trial_cpus: float = 1.0
    train_workers: int = 1
    cpus_per_worker: float = 0.5
    val_fraction: float = 0.2
    seed: int = 0
    retrain_best: bool = True
    retry_failed: bool = False

    def __post_init__(self):
        self.ks = [int(k) for k in (self.ks or [])]
        self.lams = [float(x) for x in (self.lams or [])]
        self.generated = [int(n) for n in (self.generated or [])]
        self.lrs = [float(x) for x in self.lrs] if self.lrs else None
        empty = [name for name, v in (("ks", self.ks), ("lams", self.lams), ("generated", self.generated)) if not v]
        if empty:
            raise SweepError(f"empty search space: give at least one value for {', '.join(empty)}")
        checks = [
            (self.search in SEARCHES, f"search must be one of {SEARCHES}, got {self.search!r}"),
            (all(k >= 1 for k in self.ks), f"ks must be >= 1, got {self.ks}"),
            (all(0.0 <= x <= 1.0 for x in self.lams), f"lams (lambda for generated images) must lie in [0, 1], got {self.lams}"),
            (all(n >= 0 for n in self.generated), f"generated counts must be >= 0, got {self.generated}"),
            (self.lrs is None or all(x > 0 for x in self.lrs), f"lrs must be > 0, got {self.lrs}"),
            (self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.report_every is None or self.report_every >= 1, "report_every must be >= 1 or None"),
            (self.max_concurrent_trials >= 1, "max_concurrent_trials must be >= 1"),
            (self.train_workers >= 1, "train_workers must be >= 1"),
            (self.trial_cpus > 0 and self.cpus_per_worker > 0, "trial_cpus and cpus_per_worker must be > 0"),
            (0.0 < self.val_fraction < 1.0, f"val_fraction must lie in (0, 1), got {self.val_fraction}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SweepError(msg)

    def search_space_dict(self) -> dict:
        """The fields that define the trials (a resumed sweep must keep them)."""
        keys = ("ks", "lams", "generated", "lrs", "search", "num_samples", "asha", "asha_grace_period",
                "asha_reduction_factor", "report_every", "val_fraction", "seed")
        return {k: getattr(self, k) for k in keys}


@dataclass
class SweepResults:
    """``rows``: one dict per trial (k, lam, generated, lr, status, val_rank1, val_mAP, epochs,
    seconds, error, trial_id); ``best``: the best row; ``table``: the Markdown table; ``files``: written
    URIs; ``timings``: shared-stage and trial seconds; ``test``: the best config's test metrics."""

    rows: list[dict]
    best: dict | None
    table: str
    files: dict[str, str]
    timings: dict
    built: list[str]
    test: dict | None = None



def sweep_config_from(values: dict) -> SweepConfig:
    """Build a :class:`SweepConfig` from a plain mapping (unknown keys and wrong types raise)."""
    return from_dict(SweepConfig, {k: v for k, v in values.items() if v is not None})
