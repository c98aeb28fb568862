"""The benchmarks' own checks: impossible figures are errors, not table rows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import BenchmarkError, check_rows  # noqa: E402


def _row(**kw):
    return {"name": "x", "peer": "y", "ours_s": 1.0, "peer_s": 2.0, "ratio": 2.0, **kw}


def test_sane_rows_pass():
    check_rows([_row(peak_rss_mb=10.0, R1=0.6, mAP=0.3, inertia_rel_diff=-1e-4, mAP_diff_points=-0.01),
                _row(peer_s=math.nan, ratio=math.nan, note="peer cannot run here: needs 176 GiB")])


@pytest.mark.parametrize("bad, match", [
    ({"ours_s": -7.5}, "ours_s = -7.5"),          # the stale extract.json had this
    ({"ours_s": 0.0}, "cannot take no time"),
    ({"peer_peak_rss_mb": -3.0}, "peer_peak_rss_mb"),
    ({"ratio": math.inf}, "ratio = inf"),
    ({"R1": 1.2}, "R1 = 1.2 is not a fraction"),
    ({"ours_per_iter_ms": -1.0}, "ours_per_iter_ms"),
    ({"peer_s": math.nan}, "NaN and the row has no note"),
])
def test_impossible_figures_are_errors(bad, match):
    with pytest.raises(BenchmarkError, match=match):
        check_rows([_row(**bad)])


def test_evaluate_part_rerun_keeps_the_other_parts_rows(monkeypatch, tmp_path):
    import json

    import bench_evaluate
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    old = {"measured_at": "then", "rows": [{"name": "evaluate_rank 3368x15913", "ours_s": 11.0},
                                          {"name": "re_ranking_features 2000x10000", "ours_s": 19.9}]}
    (tmp_path / "evaluate_market.json").write_text(json.dumps(old))
    kept = bench_evaluate._kept_rows("market", ("rerank",))  # rerunning the re-rankings keeps the evaluators
    assert [r["name"] for r in kept] == ["evaluate_rank 3368x15913"]
    assert kept[0]["part"] == "eval" and kept[0]["measured_at"] == "then"
    assert bench_evaluate._kept_rows("small", ("rerank",)) == []  # no previous file


# ------------------------------------------------------------------ bench_scale.py (the whole pipeline)

# bench_scale's sizes at the test fixtures' tiny scale: 64x32 images, 1-epoch everything, 32x32 GANs
SCALE_TINY = [
    "data.synthetic.height=64", "data.synthetic.width=32", "data.synthetic.images_per_id=4",
    "data.synthetic.cams=3", "pretrain.height=64", "pretrain.width=32", "pretrain.batch_size=16",
    "pretrain.num_workers=1", "train.num_workers=1", "train.height=64", "train.width=32", "train.batch_size=16",
    "extract.height=64", "extract.width=32", "cluster.ks=[2]", "gan.image_size=32", "gan.ngf=8", "gan.ndf=8",
    "gan.batch_size=16", "generate.height=64", "generate.width=32", "evaluate.rerank=false",
]


def test_bench_scale_records_every_stage_and_fits_exponents(ray_session, tmp_path):
    """One real tiny size (every stage measured), then a second size made from it (2x the ids and images,
    every time x 2**1.5) to check the fit and the extrapolation on two sizes without a second pipeline."""
    import copy
    import json

    import bench_scale

    out = tmp_path / "scale.json"
    results = bench_scale.run([6], str(tmp_path / "work"), out, overrides=SCALE_TINY, echo=lambda *a: None)
    saved = json.loads(out.read_text())
    stages = {"prepare", "pretrain", "extract", "cluster", "gan", "generate", "train/slsr", "evaluate/slsr", "report"}
    size = saved["sizes"]["6"]
    assert set(size["stages"]) == stages
    for key, r in size["stages"].items():
        assert r["seconds"] > 0 and r["artifact_bytes"] > 0 and r["artifact_files"] > 0, key
        assert r["driver_rss_peak_mb"] > 0 and r["worker_rss_peak_mb"] > 0, key
        assert "store_peak_mb" in r and "load_avg" in r, key
        assert key == "report" or r["img_s"] > 0
    assert size["dataset"]["train_images"] == 4 * 6  # images_per_id=4 here
    assert size["dataset"]["generated"] == round(bench_scale.GENERATED_PER_REAL * 17 * 6)
    assert size["watch"]["membership_bytes"] > 0 and size["watch"]["manifest_bytes"]["train"] > 0
    # sizes already in the JSON are skipped
    again = bench_scale.run([6], str(tmp_path / "work"), out, overrides=SCALE_TINY, echo=lambda *a: None)
    assert again["sizes"]["6"]["measured_at"] == results["sizes"]["6"]["measured_at"]
    # the fit on two sizes: time ~ x**1.5 exactly
    big = copy.deepcopy(size)
    big["n_ids"] = 12
    big["dataset"] = {k: v * 2 if isinstance(v, int) else v for k, v in size["dataset"].items()}
    for r in big["stages"].values():
        r["seconds"] *= 2**1.5
    big["total_s"] *= 2**1.5
    saved["sizes"]["12"] = big
    saved.update(bench_scale.analyse(saved))
    for key in stages:
        assert abs(saved["fits"][key]["seconds"] - 1.5) < 1e-3, key
        assert saved["extrapolation_s"]["market1501"][key] > 0 and saved["extrapolation_s"]["msmt17"][key] > 0
    assert abs(saved["fits"]["total"]["seconds"] - 1.5) < 1e-3
    bench_scale.plot(saved, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 0
    assert "| 12 |" in bench_scale.markdown(saved)


def test_exponent_fit_recovers_a_power_law():
    import bench_scale

    fit = bench_scale.fit_exponent([100, 300, 1000], [2.0 * x**1.5 for x in (100, 300, 1000)])
    assert abs(fit["a"] - 1.5) < 1e-6 and bench_scale.fit_exponent([100, 100], [1.0, 2.0]) is None
