"""slsr experiment: seeded ablation tables (mean ± std, paired difference to 'none', paired t-test) from
the per-seed point records, shared upstream stages (links, never recomputed), resume, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN
from scipy import stats

from slsr_ray.commands.experiment import parse_variants
from slsr_ray.config import ConfigError
from slsr_ray.experiment import Experiment, ExperimentConfig, build_rows, run_experiment
from slsr_ray.experiment_results import paired_test

FAST = ["train.num_workers=1", "pretrain.num_workers=1", "evaluate.rerank=false"]
BASE = [*TINY_RUN, *FAST]  # the shared tiny run's settings: its upstream stages are reused


@pytest.fixture(scope="module")
def finished(ray_session, tiny_run_root, tmp_path_factory):
    """2 strategies x 2 seeds, plus one generated-count point (0.25x the real images, seed 0), on a copy
    of the session's finished tiny run (same settings: its stages up to generation and its two seed-0
    trainings are reused; seed 1 and the generated-count point train)."""
    root = str(tmp_path_factory.mktemp("experiment") / "run")
    shutil.copytree(tiny_run_root[0].run_root, root)
    exp = ExperimentConfig(strategies=["none", "slsr"], seeds=[0, 1], generated=[0, 0.25], curve_seeds=[0])
    lines: list[str] = []
    results = run_experiment("synthetic", BASE, root, exp, echo=lines.append)
    return root, exp, results, lines


def _point_records(root: str) -> dict[str, dict]:
    """Every finished point, read straight from the per-point JSON files."""
    pdir = os.path.join(root, "experiment", "points")
    out = {}
    for name in os.listdir(pdir):
        with open(os.path.join(pdir, name, "point.json")) as f:
            rec = json.load(f)
        out[(rec["strategy"], rec["seed"], tuple(rec["overrides"]))] = rec
    return out


def test_table_numbers_come_from_the_per_seed_json(finished, tiny_overrides):
    root, exp, results, lines = finished
    recs = _point_records(root)
    num_real = Experiment("synthetic", tiny_overrides, root, exp).num_real()
    count = round(0.25 * num_real)
    assert set(recs) == {("none", 0, ()), ("none", 1, ()), ("slsr", 0, ()), ("slsr", 1, ()),
                         ("slsr", 0, (f"generate.count={count}",))}
    rows = {(r["group"], r["label"]): r for r in results["rows"]}
    slsr, none = rows[("strategy", "slsr")], rows[("strategy", "none")]
    for m in ("rank1", "mAP", "mINP"):
        x = [100 * recs[("slsr", s, ())]["metrics"]["plain"][m] for s in (0, 1)]
        ref = [100 * recs[("none", s, ())]["metrics"]["plain"][m] for s in (0, 1)]
        assert slsr["metrics"][m]["values"] == pytest.approx(x)
        assert slsr["metrics"][m]["mean"] == pytest.approx(np.mean(x))
        assert slsr["metrics"][m]["std"] == pytest.approx(np.std(x, ddof=1))
        diff = np.subtract(x, ref)
        assert slsr["vs_none"][m]["mean"] == pytest.approx(diff.mean())
        assert slsr["vs_none"][m]["std"] == pytest.approx(np.std(diff, ddof=1))
        if diff[0] != diff[1]:
            assert slsr["vs_none"][m]["p"] == pytest.approx(stats.ttest_rel(x, ref).pvalue)
        assert none["vs_none"][m]["mean"] == 0.0 and none["vs_none"][m]["p"] is None  # itself
    # the curve: 0x is the real-only baseline itself, 0.25x a point of its own (one seed: no std)
    zero, half = rows[("generated", "0x (0 images)")], rows[("generated", f"0.25x ({count} images)")]
    assert zero["points"][0]["point"] == none["points"][0]["point"]
    assert half["seeds"] == [0] and half["metrics"]["mAP"]["std"] is None
    assert half["metrics"]["mAP"]["mean"] == pytest.approx(
        100 * recs[("slsr", 0, (f"generate.count={count}",))]["metrics"]["plain"]["mAP"])
    md = Path(root, "experiment", "results.md").read_text()
    m = slsr["metrics"]["mAP"]
    assert f"{m['mean']:.2f} ± {m['std']:.2f}" in md and "paired t-test" in md
    for fig in results["figures"]:
        with open(os.path.join(root, "experiment", fig), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(results["figures"]) == {"strategies.png", "sensitivity.png"}
    assert any("5 distinct trainings, 5 to run" in line for line in lines)


def test_upstream_stages_are_shared_not_recomputed(finished):
    root, _, results, _ = finished
    points = os.path.join(root, "experiment", "points")
    for name in os.listdir(points):
        # a point of the real-only baseline has no use for the features and clusters (only for the
        # step-1 model its training starts from)
        real_only = name.startswith("none-")
        for stage in ("prepare", "pretrain", "extract", "cluster"):
            link = os.path.join(points, name, stage)
            if real_only and stage in ("extract", "cluster"):
                assert not os.path.lexists(link), link
                continue
            assert os.path.islink(link) and os.path.realpath(link) == os.path.join(root, stage)
    # seed 0 of each strategy is the copied run's own training (same config): linked, not trained again;
    # seed 1 trains in the point's own folder
    linked = {}
    for name in os.listdir(points):
        with open(os.path.join(points, name, "point.json")) as f:
            rec = json.load(f)
        train = os.path.join(points, name, "train", rec["strategy"])
        if not rec["overrides"]:
            linked[(rec["strategy"], rec["seed"])] = os.path.realpath(train) if os.path.islink(train) else None
    assert linked == {("none", 0): os.path.join(root, "train", "none"), ("slsr", 0): os.path.join(root, "train", "slsr"),
                      ("none", 1): None, ("slsr", 1): None}
    # the 0.25x point: its own generate stage, the base's GANs (linked), the base's generate untouched
    (variant,) = os.listdir(os.path.join(root, "experiment", "upstream"))
    vroot = os.path.join(root, "experiment", "upstream", variant)
    assert os.path.realpath(os.path.join(vroot, "gan")) == os.path.join(root, "gan")
    assert not os.path.islink(os.path.join(vroot, "generate"))
    with open(os.path.join(vroot, "generate", "_STAGE.json")) as f:
        got = json.load(f)["outputs"]["count"]
    with open(os.path.join(root, "generate", "_STAGE.json")) as f:
        base = json.load(f)["outputs"]["count"]
    assert got < base and results["upstream"][os.path.relpath(vroot, root)]["generated"] == got


def test_rerun_skips_finished_points(finished, tiny_overrides):
    root, exp, _, _ = finished
    stamps = {p: os.path.getmtime(os.path.join(root, "experiment", "points", p, "point.json"))
              for p in os.listdir(os.path.join(root, "experiment", "points"))}
    lines: list[str] = []
    again = run_experiment("synthetic", BASE, root, exp, echo=lines.append)
    assert any("5 distinct trainings, 0 to run" in line for line in lines)
    assert not any("running" in line for line in lines)  # no stage ran, upstream or point
    assert {p: os.path.getmtime(os.path.join(root, "experiment", "points", p, "point.json")) for p in stamps} == stamps
    # a third seed: only its two trainings run, the finished ones are reused
    more = ExperimentConfig(strategies=["none", "slsr"], seeds=[0, 1, 2], generated=[0, 0.25], curve_seeds=[0])
    plan = Experiment("synthetic", BASE, root, more)
    todo = [p for p in plan.plan(build_rows(more, plan.num_real())) if plan.finished(p) is None]
    assert sorted((p.strategy, p.seed) for p in todo) == [("none", 2), ("slsr", 2)]
    assert again["rows"] == finished[2]["rows"]


def test_paired_test_by_hand():
    x, ref = [10.0, 12.0, 15.0], [9.0, 11.0, 12.0]
    d = np.array([1.0, 1.0, 3.0])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    got = paired_test(x, ref)
    assert got["mean"] == pytest.approx(5 / 3) and got["std"] == pytest.approx(d.std(ddof=1))
    assert got["t"] == pytest.approx(t) and got["p"] == pytest.approx(2 * stats.t.sf(t, df=2))
    assert paired_test([1.0], [0.0])["p"] is None  # n = 1: no test
    assert paired_test([2.0, 3.0], [1.0, 2.0])["p"] is None  # constant difference: undefined


def test_rows_share_points_with_the_base(tiny_overrides, tmp_path):
    # K equal to the base's K and lambda equal to the base's lambda are the base SLSR points; a variant
    # that changes the real-only training gets its own baseline
    exp = ExperimentConfig(strategies=["none", "slsr"], seeds=[0], ks=[2], lams=[1.0], generated=[0],
                           variants={"bot": ["train.recipe=bot"], "nonoise": ["train.model.noise_layer=false"]},
                           strategies_of={"nonoise": ["slsr"]})
    e = Experiment("synthetic", tiny_overrides + ["cluster.k=2"], str(tmp_path / "r"), exp)
    rows = build_rows(exp, num_real=48)
    ids = [e.point_id(p) for p in e.plan(rows)]
    assert len(ids) == len(set(ids)) == 5  # none, slsr, bot:none, bot:slsr, nonoise:slsr
    assert sum(i.startswith("none-s0-") for i in ids) == 2  # nonoise compares with the base none


def test_bad_input_is_named(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match="unknown strategies"):
        ExperimentConfig(strategies=["none", "slsrr"])
    with pytest.raises(ConfigError, match="uses no generated images"):
        ExperimentConfig(ks=[2, 3], curve_strategy="lsr")
    with pytest.raises(ConfigError, match="distinct"):
        ExperimentConfig(seeds=[0, 0])
    for bad in ("bot", "bot:", "bot@:train.lr=1", "bot:train.lr"):
        with pytest.raises(ConfigError, match=r"expected NAME\[@strategy,...\]:section.key=value"):
            parse_variants([bad])
    assert parse_variants(["bot:train.recipe=bot;train.lr=0.02", "bot:train.epochs=3", "nn@slsr,lsro:train.lam=0.5"]) == (
        {"bot": ["train.recipe=bot", "train.lr=0.02", "train.epochs=3"], "nn": ["train.lam=0.5"]},
        {"nn": ["slsr", "lsro"]})
    with pytest.raises(ConfigError, match="unknown strategies"):
        ExperimentConfig(variants={"v": ["train.lam=0.5"]}, strategies_of={"v": ["slsrr"]})
    with pytest.raises(ConfigError, match="local run root"):
        Experiment("synthetic", tiny_overrides, "s3://bucket/x", ExperimentConfig())


def test_cli_collect_only_rewrites_the_tables(finished, tiny_overrides):
    from typer.testing import CliRunner

    from slsr_ray.cli import app

    root = finished[0]
    os.remove(os.path.join(root, "experiment", "results.md"))
    sets = [a for o in BASE for a in ("--set", o)]
    args = ["experiment", "-o", root, "--strategy", "none", "--strategy", "slsr", "--seed", "0", "--seed", "1",
            "--generated", "0", "--generated", "0.25", "--curve-seed", "0", "--collect-only", *sets]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "5 distinct trainings, 0 to run" in res.output
    assert "## Label strategies" in Path(root, "experiment", "results.md").read_text()
    bad = CliRunner().invoke(app, ["experiment", "-o", root, "--variant", "bot", "--collect-only"])
    assert bad.exit_code == 2 and "expected NAME[@strategy,...]" in bad.output


def test_sensitivity_baseline_uses_the_curve_seeds():
    """A curve run at seed 0 is compared with the real-only model at seed 0, not the mean of every seed."""
    from slsr_ray.experiment_results import _baseline_on

    none = {"seeds": [0, 1, 2], "metrics": {"mAP": {"values": [26.0, 22.0, 25.0]}}}
    assert _baseline_on(none, {0}, "mAP") == 26.0
    assert _baseline_on(none, {0, 2}, "mAP") == pytest.approx(25.5)
    assert _baseline_on(none, {5}, "mAP") is None and _baseline_on(None, {0}, "mAP") is None
