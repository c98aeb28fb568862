"""End to end: the pipeline as a real `ray job submit` job (to the job server of the session's local Ray),
with an s3:// run root (moto), stopped in the middle and resubmitted (it resumes); its artifacts and
numbers are then compared with the same config run on a local run root (the session's shared tiny run).
Jobs on a `ray start` cluster of three nodes: test_multinode.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from slsr_ray import storage
from slsr_ray.stages import StageRecord, read_record


def test_job_resumes_without_redoing_finished_stages(tiny_job_run):
    run_root, before, logs = tiny_job_run
    for stage, rec in before.items():
        assert rec is not None, f"{stage} had not finished before the stop"
        rec = StageRecord.from_json(rec)
        after = read_record(run_root, stage)
        assert (after.finished, after.hash) == (rec.finished, rec.hash), f"{stage} was redone"
        assert f"{stage}" in logs and "done (skipped)" in logs
    for stage in ("gan", "generate", "train/slsr", "train/none", "evaluate/slsr", "evaluate/none"):
        assert read_record(run_root, stage) is not None, stage
    summary = storage.read_json(storage.join(run_root, "report", "summary.json"))
    assert set(summary["metrics"]) == {"slsr", "none"}
    assert "| slsr |" in logs  # the metrics table is printed


def test_s3_run_root_matches_local(tiny_run_root, tiny_job_run):
    """The same config on an s3:// run root (moto), run as an interrupted and resumed job, produces the
    same artifacts and numbers as the uninterrupted local run."""
    local_root = tiny_run_root[0].run_root
    s3_root = tiny_job_run[0]

    def files(root: str, sub: str) -> set[str]:
        return set(storage.listdir(storage.join(root, sub)))

    for sub in ("prepare", "cluster", "generate", "report", "evaluate/slsr", "evaluate/none"):
        assert files(local_root, sub) == files(s3_root, sub), sub
    for split in ("train", "query", "gallery"):
        a = storage.read_table(storage.join(local_root, "prepare", f"{split}.parquet"))
        b = storage.read_table(storage.join(s3_root, "prepare", f"{split}.parquet"))
        assert a["pid"].equals(b["pid"]) and a["camid"].equals(b["camid"])
        assert all(p.startswith(s3_root + "/data/") for p in b["path"].to_pylist())  # images live on S3
    # the synthetic images themselves are byte-identical (same seed)
    a0 = storage.read_table(storage.join(local_root, "prepare", "train.parquet"))["path"][0].as_py()
    b0 = storage.read_table(storage.join(s3_root, "prepare", "train.parquet"))["path"][0].as_py()
    assert storage.read_bytes(a0) == storage.read_bytes(b0)
    ga = storage.read_table(storage.join(local_root, "generate", "manifest.parquet"))
    gb = storage.read_table(storage.join(s3_root, "generate", "manifest.parquet"))
    assert ga.num_rows == gb.num_rows == 24
    sa = storage.read_json(storage.join(local_root, "cluster", "silhouette.json"))
    sb = storage.read_json(storage.join(s3_root, "cluster", "silhouette.json"))
    assert set(sa) == set(sb)
    for strategy in ("slsr", "none"):
        m = storage.read_json(storage.join(s3_root, "evaluate", strategy, "plain.json"))
        assert 0 <= m["mAP"] <= 1 and np.isfinite(m["rank1"]) and m["num_valid_queries"] > 0
        # same config, same seed: the same numbers wherever the run root is
        local = storage.read_json(storage.join(local_root, "evaluate", strategy, "plain.json"))
        assert {k: m[k] for k in ("rank1", "mAP", "mINP")} == pytest.approx({k: local[k] for k in ("rank1", "mAP", "mINP")})
