"""Seeded ablations like the paper's tables: every label strategy over several training seeds (Tables 3
and 5), and sensitivity curves over K, lambda and the number of generated images (Tables 2 and 4), all
on one dataset config with shared upstream stages.

Layout under the run root::

    prepare/ ... generate/         the base config's stages, run once (``run_pipeline(until=...)``)
    experiment/upstream/<key>/     a variant's own upstream stages (e.g. K=4: cluster, gan, generate); the
                                   stages it shares with the base are symbolic links to the base's folders
    experiment/points/<id>/        one point = one training + evaluation (``run_pipeline`` on this root):
                                   its upstream stage folders are links, ``train/`` and ``evaluate/`` its
                                   own (``train/`` links the run root's own training when that one is
                                   finished with the point's config, e.g. seed 0 of an experiment on a
                                   finished run); ``point.json`` is written last, so a rerun skips finished
                                   points
    experiment/results.{json,md}   the tables (mean +- std over seeds, paired difference against ``none``)
    experiment/*.png               the figures (see :mod:`slsr_ray.experiment_results`)

A point's id is ``<strategy>-s<seed>-<hash>`` with the hash of its evaluation stage, which chains every
config it depends on (:func:`slsr_ray.pipeline.stage_hashes`): two rows that need the same training (the
SLSR row of the strategy table and the K=3 point of the K curve when the base has K=3, or the real-only
baseline that every curve's lambda or K leaves unchanged) share one point and train once.

Why sequential ``run_pipeline`` calls and not Ray Tune trials: every point is already a Ray Train run
that takes the CPUs it asks for, the shared stages must run before any point, and resuming is the
pipeline's own stage markers. The harness needs a local run root (links); the points run wherever Ray
Train puts its workers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from . import storage
from .config import ConfigError, to_dict
from .labels import STRATEGIES
from .layout import RunLayout
from .pipeline import USES_GENERATED, PipelineConfig, load_config, plan, run_pipeline, stage_hashes
from .stages import is_done, read_record

log = logging.getLogger("slsr_ray.experiment")

UPSTREAM = ("prepare", "pretrain", "extract", "cluster", "gan", "generate")
MODES = ("plain", "rerank")
POINT_FILE = "point.json"


class ExperimentError(RuntimeError):
    """Some points failed; the others are in the results (a rerun retries the failed ones)."""


@dataclass
class ExperimentConfig:
    """What to run. ``strategies`` x ``seeds`` (train.seed) is the strategy table. The curves run
    ``curve_strategy`` over ``curve_seeds`` (default: ``seeds``) at each K in ``ks``, each lambda in
    ``lams`` and each count in ``generated`` (multiples of the number of real training images; 0 is the
    real-only baseline). ``variants``: named override lists (e.g. ``{"bot": ["train.recipe=bot"]}``),
    each run for ``variant_strategies`` (or its own list in ``strategies_of[name]``) and compared with
    its own ``none`` when that is among them, else with the base ``none``. ``mode``: which evaluation goes in the tables (``plain`` or
    ``rerank``); both are kept in the JSON."""

    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ks: list[int] = field(default_factory=list)
    lams: list[float] = field(default_factory=list)
    generated: list[float] = field(default_factory=list)
    curve_strategy: str = "slsr"
    curve_seeds: list[int] | None = None
    variants: dict[str, list[str]] = field(default_factory=dict)
    variant_strategies: list[str] = field(default_factory=lambda: ["none", "slsr"])
    strategies_of: dict[str, list[str]] = field(default_factory=dict)
    mode: str = "plain"

    def __post_init__(self):
        named = {s for v in self.strategies_of.values() for s in v}
        unknown = sorted(set(self.strategies) | set(self.variant_strategies) | named | {self.curve_strategy})
        unknown = [s for s in unknown if s not in STRATEGIES]
        checks = [
            (not unknown, f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}"),
            (bool(self.seeds), "give at least one seed"),
            (len(set(self.seeds)) == len(self.seeds), f"seeds must be distinct, got {self.seeds}"),
            (all(k >= 1 for k in self.ks), f"K values must be >= 1, got {self.ks}"),
            (all(0 <= x <= 1 for x in self.lams), f"lambda values must lie in [0, 1], got {self.lams}"),
            (all(m >= 0 for m in self.generated), f"generated multiples must be >= 0, got {self.generated}"),
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (not (self.ks or self.lams or self.generated) or self.curve_strategy in USES_GENERATED,
             f"curve strategy {self.curve_strategy!r} uses no generated images: K, lambda and the generated "
             f"count would not change it; pick one of {', '.join(USES_GENERATED)}"),
            (all(n and "/" not in n for n in self.variants), f"variant names must be non-empty, without '/': {list(self.variants)}"),
            (set(self.strategies_of) <= set(self.variants),
             f"strategies given for unknown variants {sorted(set(self.strategies_of) - set(self.variants))}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def seeds_for_curves(self) -> list[int]:
        return list(self.curve_seeds) if self.curve_seeds else list(self.seeds)


@dataclass(frozen=True)
class Row:
    """One row of a results table: a strategy under some overrides, over seeds, paired with the
    ``none`` run under ``ref_overrides`` with the same seed."""

    group: str
    label: str
    strategy: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    ref_overrides: tuple[str, ...] = ()
    value: float | None = None


def build_rows(exp: ExperimentConfig, num_real: int) -> list[Row]:
    """Every table row the experiment asks for, in the order they are run and shown."""
    seeds, curve = tuple(exp.seeds), tuple(exp.seeds_for_curves)
    rows = [Row("strategy", s, s, seeds) for s in exp.strategies]
    for name, overrides in exp.variants.items():
        strategies = exp.strategies_of.get(name) or exp.variant_strategies
        ref = tuple(overrides) if "none" in strategies else ()
        rows += [Row(f"variant:{name}", s, s, seeds, tuple(overrides), ref) for s in strategies]
    s = exp.curve_strategy
    rows += [Row("k", f"K={k}", s, curve, (f"cluster.k={k}",), (), float(k)) for k in exp.ks]
    rows += [Row("lambda", f"lambda={x:g}", s, curve, (f"train.lam={x}",), (), float(x)) for x in exp.lams]
    for m in exp.generated:
        if m == 0:  # no generated images: the real-only baseline
            rows.append(Row("generated", "0x (0 images)", "none", curve, (), (), 0.0))
            continue
        count = max(1, round(m * num_real))
        rows.append(Row("generated", f"{m:g}x ({count} images)", s, curve, (f"generate.count={count}",), (), float(m)))
    return rows


@dataclass(frozen=True)
class Point:
    """One training + evaluation run."""

    strategy: str
    seed: int
    overrides: tuple[str, ...] = ()


def row_points(row: Row) -> list[tuple[Point, Point]]:
    """(point, its paired none point) for each seed of a row."""
    return [(Point(row.strategy, s, row.overrides), Point("none", s, row.ref_overrides)) for s in row.seeds]


class Experiment:
    """Runs the points of one :class:`ExperimentConfig` on one dataset config (see the module doc)."""

    def __init__(self, config: str, overrides: list[str], run_root: str, exp: ExperimentConfig, echo=print):
        self.config, self.overrides, self.exp, self.echo = config, list(overrides), exp, echo
        self.base = load_config(config, self.overrides, run_root)
        self.root = self.base.run_root
        if storage.is_s3(self.root):
            raise ConfigError(
                f"run root {self.root!r}: slsr experiment needs a local run root (its points link the shared "
                "stage folders, which S3 cannot); run it on a node with a shared file system"
            )
        self.dir = RunLayout(self.root).experiment
        self._hash_cache: dict[Point, tuple[PipelineConfig, dict]] = {}

    # ---------------------------------------------------------------------------- configs and ids

    def point_config(self, p: Point) -> tuple[PipelineConfig, dict[str, str]]:
        """The pipeline config of a point (run root still the base's) and its stage hashes."""
        if p not in self._hash_cache:
            extra = [*p.overrides, f"train.strategy={p.strategy}", "baselines=[]", f"train.seed={p.seed}"]
            cfg = load_config(self.config, self.overrides + extra, self.root)
            self._hash_cache[p] = (cfg, stage_hashes(cfg))
        return self._hash_cache[p]

    def point_id(self, p: Point) -> str:
        _, hashes = self.point_config(p)
        return f"{p.strategy}-s{p.seed}-{hashes[f'evaluate/{p.strategy}']}"

    def point_root(self, p: Point) -> str:
        return storage.join(self.dir, "points", self.point_id(p))

    def finished(self, p: Point) -> dict | None:
        uri = storage.join(self.point_root(p), POINT_FILE)
        return storage.read_json(uri) if storage.exists(uri) else None

    # ---------------------------------------------------------------------------- the shared stages

    def run_base(self, rows_need_generated: bool) -> None:
        """The base config's upstream stages, under the run root itself."""
        strategy = "slsr" if rows_need_generated else "none"
        cfg = load_config(self.config, [*self.overrides, f"train.strategy={strategy}", "baselines=[]"], self.root)
        last = "generate" if rows_need_generated else "cluster"
        run_pipeline(cfg, until=last, echo=self._echo, report=False)

    def num_real(self) -> int:
        return storage.read_table(RunLayout(self.root).split("train")).num_rows

    def upstream_root(self, p: Point) -> str:
        """A folder whose upstream stages are done with this point's hashes: the run root, or a variant
        folder that links the prefix of stages it shares with the base and runs the rest."""
        cfg, hashes = self.point_config(p)
        needed = _upstream_keys(cfg)
        if all(is_done(self.root, k, hashes[k]) for k in needed):
            return self.root
        vroot = storage.join(self.dir, "upstream", f"{needed[-1]}-{hashes[needed[-1]]}")
        shared = True
        for key in needed:
            shared = shared and is_done(self.root, key, hashes[key])
            dst = RunLayout(vroot).stage(key)
            _unlink(dst)  # a link is always renewed; real folders are the pipeline's (it checks their hashes)
            if shared and not os.path.exists(dst):
                _link(RunLayout(self.root).stage(key), dst)
        if not all(is_done(vroot, k, hashes[k]) for k in needed):
            self.echo(f"[experiment] upstream stages for {list(p.overrides)} under {vroot}")
            cfg.run_root = vroot
            try:
                run_pipeline(cfg, until=needed[-1], echo=self._echo, report=False)
            finally:
                cfg.run_root = self.root
        return vroot

    # ---------------------------------------------------------------------------- one point

    def run_point(self, p: Point) -> dict:
        """Train and evaluate one point (or read it back when finished); returns its record."""
        done = self.finished(p)
        if done is not None:
            return done
        cfg, hashes = self.point_config(p)
        upstream = self.upstream_root(p)
        proot = self.point_root(p)
        for key in _upstream_keys(cfg):
            dst = RunLayout(proot).stage(key)
            _unlink(dst)
            if os.path.exists(dst):
                raise RuntimeError(f"{dst} is a folder, expected a link to the shared stage: remove it and rerun")
            _link(RunLayout(upstream).stage(key), dst)
            if not is_done(proot, key, hashes[key]):  # never let the pipeline rerun a stage through a link
                raise RuntimeError(f"shared stage {key} under {upstream} does not match point {self.point_id(p)}")
        train_key = f"train/{p.strategy}"
        own = RunLayout(proot).stage(train_key)
        _unlink(own)  # renewed like the upstream links: never train through a link into the run root's folder
        if not os.path.exists(own) and is_done(self.root, train_key, hashes[train_key]):
            _link(RunLayout(self.root).stage(train_key), own)  # the run root trained this config already
        cfg.run_root = proot
        t0 = time.time()
        try:
            run_pipeline(cfg, echo=self._echo, report=False)
        finally:
            cfg.run_root = self.root
        s = p.strategy
        train, ev = read_record(proot, f"train/{s}"), read_record(proot, f"evaluate/{s}")
        record = {
            "id": self.point_id(p), "strategy": s, "seed": p.seed, "overrides": list(p.overrides),
            "metrics": ev.outputs, "train_seconds": train.seconds, "evaluate_seconds": ev.seconds,
            "wall_s": round(time.time() - t0, 1), "final_epoch": train.outputs.get("final", {}),
            "upstream": os.path.relpath(upstream, self.root), "finished": datetime.now(UTC).isoformat(),
        }
        storage.write_json(storage.join(proot, POINT_FILE), record)
        return record

    def _echo(self, line: str) -> None:
        if "(skipped)" not in line:  # every point skips the same six shared stages
            self.echo(line)

    # ---------------------------------------------------------------------------- the whole run

    def plan(self, rows: list[Row]) -> list[Point]:
        """The distinct points the rows need, group by group and seed by seed within a group (a run cut
        short has every row of the first groups at the first seeds), each after its paired baseline."""
        groups: dict[str, list[Row]] = {}
        for row in rows:
            groups.setdefault(row.group, []).append(row)
        seen: dict[str, Point] = {}
        for group_rows in groups.values():
            seeds = list(dict.fromkeys(s for r in group_rows for s in r.seeds))
            for seed in seeds:
                for row in group_rows:
                    for point, ref in row_points(row):
                        if point.seed == seed:
                            seen.setdefault(self.point_id(ref), ref)
                            seen.setdefault(self.point_id(point), point)
        return list(seen.values())

    def run(self, collect_only: bool = False) -> dict:
        """Run every unfinished point (unless ``collect_only``), then write the results; returns them."""
        from .experiment_results import write_results

        needs_gen = any(r.strategy in USES_GENERATED for r in self.rows_without_counts())
        if not collect_only:
            self.run_base(needs_gen)
        rows = build_rows(self.exp, self.num_real())
        points = self.plan(rows)
        todo = [p for p in points if self.finished(p) is None]
        self.echo(f"[experiment] {len(rows)} table rows, {len(points)} distinct trainings, {len(todo)} to run")
        failed = []
        for i, p in enumerate([] if collect_only else todo, 1):
            self.echo(f"[experiment] point {i}/{len(todo)}: {p.strategy} seed {p.seed} {list(p.overrides)}")
            try:
                rec = self.run_point(p)
            except Exception as e:  # the other points still run; a rerun retries this one
                log.exception("point %s failed", self.point_id(p))
                failed.append(f"{self.point_id(p)}: {type(e).__name__}: {e}")
                self.echo(f"[experiment]   FAILED: {failed[-1]}")
                continue
            m = rec["metrics"][self.exp.mode]
            self.echo(f"[experiment]   R1 {100 * m['rank1']:.2f}  mAP {100 * m['mAP']:.2f}  ({rec['wall_s']:.0f}s)")
        records = {self.point_id(p): rec for p in points if (rec := self.finished(p)) is not None}
        results = write_results(self, rows, records)
        if failed:
            raise ExperimentError(f"{len(failed)} point(s) failed (rerun to retry them):\n  " + "\n  ".join(failed))
        return results

    def rows_without_counts(self) -> list[Row]:
        """The rows, with a placeholder real count (only strategies and overrides are looked at)."""
        return build_rows(self.exp, 1)

    def describe(self) -> dict:
        return {"config": self.config, "overrides": self.overrides, "run_root": self.root,
                "experiment": to_dict(self.exp)}


def _upstream_keys(cfg: PipelineConfig) -> list[str]:
    return [key for key, _ in plan(cfg) if key in UPSTREAM]


def _link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(os.path.realpath(src), dst, target_is_directory=True)


def _unlink(path: str) -> None:
    if os.path.islink(path):
        os.unlink(path)


def run_experiment(config: str, overrides: list[str], run_root: str, exp: ExperimentConfig, echo=print,
                   collect_only: bool = False) -> dict:
    """Run (or resume) an experiment; returns the results dict also written to
    ``<run_root>/experiment/results.json``."""
    return Experiment(config, overrides, run_root, exp, echo=echo).run(collect_only=collect_only)
