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
