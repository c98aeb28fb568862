"""End to end: the pipeline as a real `ray job submit` job on a `ray start --head` on loopback,
stopped in the middle and resubmitted (it resumes), then the same run on an s3:// run root (moto).

The head runs in its own process session and is stopped by its pid: `ray stop` would kill every Ray
on the machine, the test session's own Ray included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from slsr_ray import storage
from slsr_ray.stages import read_record

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with the job server; yields the dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash = _free_port(), _free_port()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--num-cpus=2",
        "--include-dashboard=true", "--disable-usage-stats",
        # fixed default ports (e.g. the agent's 52365) clash with any other Ray on the machine
        f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
    ]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    client = None
    while time.time() < deadline:
        try:
            client = JobSubmissionClient(address)
            client.list_jobs()
            break
        except Exception:
            client = None
            time.sleep(2)
    if client is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray head did not come up in 120 s")
    yield address, client
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, run_root: str, overrides: list[str]) -> str:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    runtime_env = {"env_vars": {"RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1", "RAY_TRAIN_V2_ENABLED": "1"}}
    args = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "jobs/run_pipeline.py", "--config", "synthetic", "--run-root", run_root,
    ]
    for o in overrides:
        args += ["--set", o]
    deadline = time.time() + 180
    while True:  # right after start the head may have no job agent yet: retry
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout + out.stderr
    found = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr)
    assert found, f"no submission id in: {out.stdout}"
    return found.group(0)


def _wait(client, job_id: str, until: set[str], timeout: float, also=lambda: False) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in until or also():
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s:\n{client.get_job_logs(job_id)[-3000:]}")


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


def test_s3_run_root_matches_local(job_run, s3_bucket, ray_session, tiny_overrides):
    """The same config on an s3:// run root (moto) produces the same artifacts as the local run."""
    from slsr_ray.pipeline import load_config, run_pipeline

    local_root = job_run[0]
    s3_root = f"{s3_bucket}/runs/tiny"
    cfg = load_config("synthetic", [*tiny_overrides, "baselines=[none]"], run_root=s3_root)
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
