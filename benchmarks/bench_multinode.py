"""The pipeline as a `ray job submit` job on one node vs three nodes of this machine, and what a node
kill costs.

Each run is the same tiny config (the test suite's, with 3 pretraining epochs) on an s3:// run root
served by moto on loopback, the dataset uploaded once with `slsr data manifest`, on a fresh cluster
of `ray start` processes (tests/cluster_helpers.py):

1. ``1 node``: a head with 2 CPUs;
2. ``3 nodes``: a head with 1 CPU + two worker nodes with 1 CPU and 1 GPU without CUDA each (the
   tests/test_multinode.py layout: GPU work spreads over both and falls back to CPU tensors);
3. ``3 nodes, node killed``: the same, a worker node's raylet killed once the first pretraining
   checkpoint is committed, and a replacement node started.

All three share the machine's 2 cores, so more nodes cannot be faster here: the numbers measure the
overhead of the multi-node path and of a recovery, not a speed-up. Writes ``results/multinode.json``.

    python benchmarks/bench_multinode.py
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]


def _moto() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1", "RAY_DEDUP_LOGS": "0"})
    from moto.server import ThreadedMotoServer

    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    return os.environ["AWS_ENDPOINT_URL"]


def _dataset(tmp: str, endpoint: str) -> tuple[str, str]:
    import boto3

    from slsr_ray.data import load_dataset, make_synthetic
    from slsr_ray.data.manifests import upload_dataset, write_manifests

    bucket = f"slsr-bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    root = os.path.join(tmp, "synthetic")
    make_synthetic(root, num_ids=16, cams=3, images_per_id=6, seed=0, size=(64, 32))
    ds = upload_dataset(load_dataset("market1501", root), f"s3://{bucket}/datasets/tiny/images")
    manifests = f"s3://{bucket}/datasets/tiny/manifests"
    write_manifests(ds, manifests)
    return f"s3://{bucket}", manifests


def _run(layout: str, bucket: str, overrides: list[str]) -> dict:
    from cluster_helpers import (
        FAST_HEALTH_CHECKS,
        LocalCluster,
        checkpoint_committed,
        submit,
        wait_job,
        while_running,
        worker_node_of,
    )

    from slsr_ray.stages import read_record

    run_root = f"{bucket}/runs/{layout.replace(' ', '-').replace(',', '')}"
    cluster = LocalCluster(env=FAST_HEALTH_CHECKS)
    try:
        if layout == "1 node":
            cluster.start_head(num_cpus=2)
        else:
            cluster.start_head(num_cpus=1)
            cluster.add_worker("a", num_cpus=1, num_gpus=1)
            cluster.add_worker("b", num_cpus=1, num_gpus=1)
        t0 = time.time()
        job = submit(cluster.dashboard, run_root, overrides)
        row = {"layout": layout}
        if "killed" in layout:
            victim = while_running(cluster.client, job, lambda: checkpoint_committed(run_root)
                                   and worker_node_of(cluster, "RayTrainWorker"), 3600, "the first checkpoint")
            t_kill = time.time()
            cluster.kill_raylet(victim)
            row["kill_noticed_s"] = time.time() - t_kill
            cluster.add_worker("c", num_cpus=1, num_gpus=1)
            row["replacement_joined_s"] = time.time() - t_kill
        status = wait_job(cluster.client, job, {"SUCCEEDED", "FAILED", "STOPPED"}, 3600)
        row["job_s"] = time.time() - t0
        assert status == "SUCCEEDED", cluster.client.get_job_logs(job)[-3000:]
        stages = ("prepare", "pretrain", "extract", "cluster", "gan", "generate", "train/slsr", "evaluate/slsr")
        row.update({f"{s}_s": read_record(run_root, s).seconds for s in stages})
        row["load_avg_1m"] = os.getloadavg()[0]
        return row
    finally:
        cluster.stop()


def main() -> None:
    from common import report
    from conftest import TINY_OVERRIDES

    endpoint = _moto()
    with tempfile.TemporaryDirectory(prefix="slsr-bench-mn-") as tmp:
        bucket, manifests = _dataset(tmp, endpoint)
        overrides = [*TINY_OVERRIDES, "baselines=[]", "pretrain.epochs=3", "pretrain.max_failures=3",
                     f"data.manifests={manifests}"]
        rows = [_run(layout, bucket, overrides) for layout in ("1 node", "3 nodes", "3 nodes, node killed")]
    base = rows[1]
    rows[2]["lost_to_kill_s"] = rows[2]["job_s"] - base["job_s"]
    rows[2]["pretrain_lost_s"] = rows[2]["pretrain_s"] - base["pretrain_s"]
    report("multinode", "small", rows, ["layout", "job_s", "pretrain_s", "extract_s", "gan_s", "train/slsr_s",
                                         "lost_to_kill_s", "load_avg_1m"])


if __name__ == "__main__":
    main()
