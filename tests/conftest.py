"""Shared fixtures: one real local Ray per test session, a real S3 API (moto's server on loopback),
and small synthetic datasets built once per session."""

from __future__ import annotations

import os
import socket
import uuid

import pytest
from cluster_helpers import FAST_TRAIN_POLL


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
HEAVY_FIRST = ("test_multinode.py", "test_tune.py", "test_console.py", "test_pipeline_reruns.py",
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

    # its own temp dir, away from the other xdist worker's Ray and any other on the machine
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths have a length limit
    init_ray(num_cpus=2, object_store_memory=300 * 1024 * 1024, quiet=False, configure_logging=False,
             _temp_dir=temp_dir)
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
    """One finished tiny pipeline run (every stage and the report) that tests read or copy: the report,
    the same-seed rerun (test_console.py), the reruns, the notebooks. Returns ``(config, summary, printed lines)``.
    Built once per test run (see :func:`shared_fixture`); its summary is the one the run returned."""
    from slsr_ray.pipeline import load_config, run_pipeline

    def build(folder):
        cfg = load_config("synthetic", TINY_RUN, run_root=str(folder))
        lines: list[str] = []
        summary = run_pipeline(cfg, echo=lines.append)
        return {"run_root": str(folder), "summary": summary, "lines": lines}

    shared = shared_fixture(tmp_path_factory, "tiny-run", build)
    return load_config("synthetic", TINY_RUN, run_root=shared["run_root"]), shared["summary"], shared["lines"]
