"""Shared fixtures: one real local Ray per test session, a real S3 API (moto's server on loopback),
and small synthetic datasets built once per session."""

from __future__ import annotations

import os
import socket
import uuid

import pytest
from cluster_helpers import BIN, FAST_TRAIN_POLL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# With pytest-xdist (`make test TEST_WORKERS=n`) the controller process owns the one moto server and
# picks its port here, before the workers start: they inherit SLSR_TEST_MOTO_PORT and talk to the same
# server, so an s3:// run one worker built is readable from the other (a shared fixture below).
IS_XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ
MOTO_PORT = int(os.environ.setdefault("SLSR_TEST_MOTO_PORT", str(_free_port())))
# S3 settings go into the environment before Ray starts, so Ray workers inherit them too.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_DEDUP_LOGS": "0",
        "RAY_TRAIN_V2_ENABLED": "1",
        **FAST_TRAIN_POLL,
        "TQDM_DISABLE": "1",
        # Keep up to 6 idle workers per node (Ray's default: as many as CPUs, the rest killed after 1 s
        # idle): the suite's pipelines run task after task and restarted a worker for most of them (two
        # tiny pipelines in one driver: 8 worker processes, 22.7 CPU-s, vs 2 and 10.9 CPU-s kept warm).
        "RAY_num_workers_soft_limit": "6",
        # `python` of a job submitted to the session's Ray (tiny_job_run) is this venv's
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
)
os.environ.pop("AWS_PROFILE", None)
_MOTO = {}


def pytest_configure(config):
    """The moto server lives in the main pytest process (the xdist controller, or the only process)."""
    if IS_XDIST_WORKER:
        return
    from moto.server import ThreadedMotoServer

    _MOTO["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False)
    _MOTO["server"].start()


def pytest_unconfigure(config):
    if "server" in _MOTO:
        _MOTO.pop("server").stop()


# Heaviest test files first under xdist: it hands whole files to its workers in this order (`--dist
# loadfile --no-loadscope-reorder`), so the long ones start at once and the short ones fill the gaps.
HEAVY_FIRST = ("test_multinode.py", "test_tune.py", "test_jobs.py", "test_console.py", "test_pipeline_reruns.py",
               "test_experiment.py", "test_notebooks.py", "test_protocols.py", "test_search.py", "test_train.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if not IS_XDIST_WORKER:  # a single process runs the files in their usual order
        return
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept


def shared_fixture(tmp_path_factory, name: str, build):
    """Build a session fixture's value once per test run, even across xdist workers: the first worker
    to ask builds it under a file lock into a folder every worker sees; the others wait, then read it.
    ``build(folder)`` returns something JSON-able; every worker (the builder too) gets it back from JSON."""
    import json

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    base = base.parent if IS_XDIST_WORKER else base
    folder, done = base / name, base / f"{name}.json"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps(build(folder)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def moto_server():
    return f"http://127.0.0.1:{MOTO_PORT}"


@pytest.fixture
def s3_bucket(moto_server):
    """A fresh bucket on the moto server; returns its ``s3://`` URI."""
    import boto3

    name = f"slsr-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(moto_server):
    """One local Ray for the whole test session (2 CPUs, a small object store), started the way every run
    starts it, with Ray's own console output (pytest captures it).

    moto's server starts first: its port is only chosen at import, and a Ray worker started before it
    can bind that port (seen: a Train controller on it, then an S3 test hung talking to it)."""
    import shutil
    import tempfile

    import ray

    from slsr_ray.raysetup import init_ray

    # Its own temp dir, holding its own address file: the job server of a `ray.init` Ray (tiny_job_run
    # submits there) finds the GCS its jobs connect to in <temp dir>/ray_current_cluster, which only
    # `ray start` writes; without it, a job takes any Ray running on the machine (seen: another xdist
    # worker's `ray start` head, stopped mid-job).
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths have a length limit
    init_ray(num_cpus=2, object_store_memory=300 * 1024 * 1024, quiet=False, configure_logging=False,
             _temp_dir=temp_dir)
    ray._private.utils.write_ray_address(ray.get_runtime_context().gcs_address, temp_dir)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset (Market-1501 layout), built once: 24 ids, 4 cameras, 8 images/id."""
    from slsr_ray.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, num_ids=24, cams=4, images_per_id=8, seed=0, num_distractors=6, num_junk=3)
    return str(root)


@pytest.fixture(scope="session")
def synthetic_dataset(synthetic_root):
    from slsr_ray.data import load_dataset

    return load_dataset("market1501", synthetic_root)


# The smallest pipeline that still exercises every stage (a few seconds of training per stage). One
# Ray Train worker: DDP over two workers is tested in test_train.py, and a second worker on this 2-core
# machine only adds start-up time to every other pipeline test.
TINY_OVERRIDES = [
    "data.synthetic.num_ids=16",
    "data.synthetic.cams=3",
    "data.synthetic.images_per_id=6",
    "data.synthetic.height=64",
    "data.synthetic.width=32",
    "pretrain.epochs=1",
    "pretrain.height=64",
    "pretrain.width=32",
    "pretrain.batch_size=16",
    "train.epochs=1",
    "pretrain.num_workers=1",
    "train.num_workers=1",
    "train.height=64",
    "train.width=32",
    "train.batch_size=16",
    "extract.height=64",
    "extract.width=32",
    "cluster.ks=[2,3]",
    "cluster.n_init=1",
    "gan.epochs=1",
    "gan.image_size=32",
    "gan.ngf=8",
    "gan.ndf=8",
    "gan.batch_size=16",
    "generate.count=24",
    "generate.height=64",
    "generate.width=32",
]


@pytest.fixture(scope="session")
def tiny_overrides():
    return list(TINY_OVERRIDES)


# The config of the shared finished run (tiny_run_root): SLSR at K=2 and the real-only baseline.
TINY_RUN = [*TINY_OVERRIDES, "cluster.k=2", "baselines=[none]"]


@pytest.fixture(scope="session")
def tiny_run_root(ray_session, tmp_path_factory):
    """One finished tiny pipeline run (every stage and the report) that tests only *read*: the report,
    the determinism check, the S3-vs-local comparison. Returns ``(config, summary, printed lines)``.
    Built once per test run (see :func:`shared_fixture`); its summary is the one the run returned."""
    from slsr_ray.pipeline import load_config, run_pipeline

    def build(folder):
        cfg = load_config("synthetic", TINY_RUN, run_root=str(folder))
        lines: list[str] = []
        summary = run_pipeline(cfg, echo=lines.append)
        return {"run_root": str(folder), "summary": summary, "lines": lines}

    shared = shared_fixture(tmp_path_factory, "tiny-run", build)
    return load_config("synthetic", TINY_RUN, run_root=shared["run_root"]), shared["summary"], shared["lines"]


@pytest.fixture(scope="session")
def tiny_job_run(ray_session, moto_server, tmp_path_factory):
    """The shared tiny run's config (``TINY_RUN``) as a real ``ray job submit`` job to the job server of
    the session's Ray (the dashboard every local run starts), with an s3:// run root on moto: stopped
    once the cluster stage is done, resubmitted, finished. Returns ``(run_root, {stage: marker before
    the stop, as a dict}, logs of the second job)``; built once per test run, like ``tiny_run_root``.

    One run serves the resume test, the S3-vs-local comparison and the same-seed check (every end-to-end
    run costs a minute or more of the suite's 2 cores). The job runs on the Ray of the xdist worker that
    builds it, which waits for it (a Ray head of its own cost 30-40 CPU-seconds more); jobs on a
    ``ray start`` cluster of several nodes are tested in test_multinode.py."""
    import dataclasses

    def build(folder):
        import boto3
        from cluster_helpers import submit, wait_job
        from ray.job_submission import JobSubmissionClient

        from slsr_ray import storage
        from slsr_ray.stages import read_record

        bucket = f"slsr-job-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=bucket)
        run_root = f"s3://{bucket}/runs/tiny"
        dashboard = "http://" + ray_session._private.worker.global_worker.node.webui_url
        client = JobSubmissionClient(dashboard)
        first = submit(dashboard, run_root, TINY_RUN)
        marker = storage.join(run_root, "cluster", "_STAGE.json")
        status = wait_job(client, first, {"SUCCEEDED", "FAILED", "STOPPED"}, 600, also=lambda: storage.exists(marker))
        assert status != "FAILED", client.get_job_logs(first)[-3000:]
        client.stop_job(first)  # interrupt the pipeline in the middle (during the GAN stage)
        wait_job(client, first, {"STOPPED", "SUCCEEDED", "FAILED"}, 120)
        records = {s: read_record(run_root, s) for s in ("prepare", "pretrain", "extract", "cluster")}
        before = {s: dataclasses.asdict(r) if r else None for s, r in records.items()}
        second = submit(dashboard, run_root, TINY_RUN)
        status = wait_job(client, second, {"SUCCEEDED", "FAILED", "STOPPED"}, 900)
        logs = client.get_job_logs(second)
        assert status == "SUCCEEDED", logs[-4000:]
        return {"run_root": run_root, "before": before, "logs": logs}

    shared = shared_fixture(tmp_path_factory, "tiny-job-run", build)
    return shared["run_root"], shared["before"], shared["logs"]
