"""End to end: the pipeline as a real `ray job submit` job on a `ray start --head` on loopback,
stopped in the middle and resubmitted (it resumes), then the same run on an s3:// run root (moto).

The head runs in its own process session and is stopped by its pid: `ray stop` would kill every Ray
on the machine, the test session's own Ray included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cluster_helpers import LocalCluster
from cluster_helpers import submit as _submit
from cluster_helpers import wait_job as _wait

from slsr_ray import storage
from slsr_ray.stages import read_record


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with the job server; yields the dashboard address and a job client."""
    cluster = LocalCluster()
    cluster.start_head(num_cpus=2)
    yield cluster.dashboard, cluster.client
    cluster.stop()


@pytest.fixture(scope="module")
def job_run(ray_head, tiny_overrides, tmp_path_factory):
    """Submit, stop the job once the cluster stage is done, resubmit: the run finishes."""
    address, client = ray_head
    run_root = str(tmp_path_factory.mktemp("job-run"))
    overrides = [*tiny_overrides, "baselines=[none]"]
    first = _submit(address, run_root, overrides)
    marker = Path(run_root) / "cluster" / "_STAGE.json"
    status = _wait(client, first, {"SUCCEEDED", "FAILED", "STOPPED"}, 600, also=marker.exists)
    assert status not in ("FAILED",), client.get_job_logs(first)[-3000:]
    client.stop_job(first)  # interrupt the pipeline in the middle (during the GAN stage)
    _wait(client, first, {"STOPPED", "SUCCEEDED", "FAILED"}, 120)
    before = {s: read_record(run_root, s) for s in ("prepare", "pretrain", "extract", "cluster")}
    second = _submit(address, run_root, overrides)
    status = _wait(client, second, {"SUCCEEDED", "FAILED", "STOPPED"}, 900)
    logs = client.get_job_logs(second)
    assert status == "SUCCEEDED", logs[-4000:]
    return run_root, before, logs


def test_job_resumes_without_redoing_finished_stages(job_run):
    run_root, before, logs = job_run
    for stage, rec in before.items():
        assert rec is not None, f"{stage} had not finished before the stop"
        after = read_record(run_root, stage)
        assert (after.finished, after.hash) == (rec.finished, rec.hash), f"{stage} was redone"
        assert f"{stage}" in logs and "done (skipped)" in logs
    for stage in ("gan", "generate", "train/slsr", "train/none", "evaluate/slsr", "evaluate/none"):
        assert read_record(run_root, stage) is not None, stage
    summary = json.loads((Path(run_root) / "report" / "summary.json").read_text())
    assert set(summary["metrics"]) == {"slsr", "none"}
    assert "| slsr |" in logs  # the metrics table is printed


def test_s3_run_root_matches_local(tiny_run_root, s3_bucket):
    """The same config on an s3:// run root (moto) produces the same artifacts as the local run."""
    from conftest import TINY_RUN

    from slsr_ray.pipeline import load_config, run_pipeline

    local_root = tiny_run_root[0].run_root
    s3_root = f"{s3_bucket}/runs/tiny"
    cfg = load_config("synthetic", TINY_RUN, run_root=s3_root)
    run_pipeline(cfg, echo=lambda *_: None)

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
