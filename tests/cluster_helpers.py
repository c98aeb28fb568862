"""Real Ray clusters on loopback for the job and multi-node tests: `ray start --block` processes, each
in its own process session, stopped by the pids this module started (`ray stop` would kill every Ray
on the machine, other test sessions' included), and `ray job submit` against their head."""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path

from slsr_ray import storage

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# a killed node is noticed in seconds, not the default ~30 s of missed health checks
# (still lenient enough for a heavily loaded machine: a node misses 4 checks of 5 s in a row to be dead)
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "2000", "RAY_health_check_period_ms": "2000",
                      "RAY_health_check_timeout_ms": "5000", "RAY_health_check_failure_threshold": "4"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(extra: dict | None = None) -> dict:
    """The environment of a `ray start`: the venv's bin first on PATH (jobs run `python` from it), no
    token auth, no inherited RAY_ADDRESS."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled", **(extra or {}))
    env.pop("RAY_ADDRESS", None)
    return env


def _own_ports() -> list[str]:
    # fixed default ports (e.g. the agent's 52365) clash with any other Ray on the machine
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: str
    workdir: str
    resources: dict = field(default_factory=dict)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the node's `ray start` output (for failure messages)."""
        try:
            with open(os.path.join(self.temp_dir, "ray-start.log")) as f:
                return f"\n--- ray start output of node {self.name}:\n" + f.read()[-chars:]
        except OSError:
            return ""

    def raylet_pid(self) -> int:
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if child.name() == "raylet":
                return child.pid
        raise AssertionError(f"node {self.name} has no raylet process (exit code {self.proc.poll()})")


class LocalCluster:
    """A head (with the job server) and worker nodes on 127.0.0.1, each with its own ``--temp-dir``
    (short: Ray's socket paths have a length limit), working directory and custom resource."""

    def __init__(self, env: dict | None = None):
        self.env = node_env(env)
        self.nodes: dict[str, Node] = {}
        self.retired: list[Node] = []  # failed starts, cleaned up with the rest
        self.port = free_port()
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.client = None

    def _start(self, name: str, args: list[str], num_cpus: float, num_gpus: float, resources: dict) -> Node:
        temp_dir = tempfile.mkdtemp(prefix=f"r{name[:2]}", dir="/tmp")
        workdir = tempfile.mkdtemp(prefix=f"w{name[:2]}", dir="/tmp")
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
               f"--num-cpus={num_cpus:g}", f"--num-gpus={num_gpus:g}", f"--resources={json.dumps(resources)}",
               "--disable-usage-stats", *_own_ports(), *args]
        with open(os.path.join(temp_dir, "ray-start.log"), "w") as log:
            proc = subprocess.Popen(cmd, env=self.env, cwd=workdir, start_new_session=True, stdout=log,
                                    stderr=subprocess.STDOUT)
        node = self.nodes[name] = Node(name, proc, temp_dir, workdir, resources)
        return node

    def start_head(self, num_cpus: float = 1, num_gpus: float = 0, resources: dict | None = None,
                   timeout: float = 180) -> None:
        from ray.job_submission import JobSubmissionClient

        port = self.dashboard.rsplit(":", 1)[1]
        self._start("head", ["--head", f"--port={self.port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={port}", "--include-dashboard=true"],
                    num_cpus, num_gpus, resources or {"node_h": 1})
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                client = JobSubmissionClient(self.dashboard)
                client.list_jobs()
                self.client = client
                return
            except Exception:
                time.sleep(2)
        self.stop()
        raise AssertionError(f"ray head did not come up in {timeout:.0f} s")

    def add_worker(self, name: str, num_cpus: float = 1, num_gpus: float = 0, resources: dict | None = None,
                   timeout: float = 240, attempts: int = 3) -> Node:
        """Start a worker node and wait until the head lists it alive. On a loaded machine a raylet can
        miss `ray start`'s fixed 30 s registration window and the start fails: it is retried."""
        resources = resources or {f"node_{name}": 1}
        resource = next(iter(resources))

        def joined():
            head = self.nodes["head"]
            assert head.proc.poll() is None, f"the head exited (code {head.proc.poll()}){head.log_tail()}"
            if node.proc.poll() is not None:
                return "exited"
            return any(n["state"] == "ALIVE" and resource in n["resources_total"] for n in self.node_list())

        for attempt in range(1, attempts + 1):
            node = self._start(name, [f"--address=127.0.0.1:{self.port}"], num_cpus, num_gpus, resources)
            if self.wait_for(joined, timeout, f"worker node {name} to join", node.log_tail) is True:
                return node
            if attempt == attempts:
                raise AssertionError(f"worker node {name} failed to start {attempts} times{node.log_tail()}")
            self.retired.append(self.nodes.pop(name))
        raise AssertionError("unreachable")

    def node_list(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [n.__dict__ if hasattr(n, "__dict__") else n for n in list_nodes(address=self.dashboard, detail=True)]

    def node_names(self) -> dict[str, str]:
        """Ray node id -> the name of the node this cluster started (by its custom resource)."""
        out = {}
        for n in self.node_list():
            for name, node in self.nodes.items():
                if next(iter(node.resources)) in n["resources_total"]:
                    out[n["node_id"]] = name
        return out

    def kill_raylet(self, name: str) -> None:
        """SIGKILL the node's raylet (a lost machine), then wait until the head marks the node dead."""
        node = self.nodes[name]
        os.kill(node.raylet_pid(), signal.SIGKILL)
        resource = next(iter(node.resources))
        self.wait_for(lambda: not any(n["state"] == "ALIVE" and resource in n["resources_total"]
                                      for n in self.node_list()), 120, f"the head to see node {name} die")

    @staticmethod
    def wait_for(cond, timeout: float, what: str, details=lambda: "", every: float = 1.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = cond()
            except AssertionError:
                raise
            except Exception:  # e.g. the state API or S3 busy: ask again
                value = None
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} {details()}")

    def stop(self) -> None:
        """Stop every node this cluster started (workers first), see :func:`stop_ray_start`."""
        everything = [*self.retired, *self.nodes.values()]
        stop_ray_start([n.proc for n in sorted(everything, key=lambda n: n.name == "head")])
        for node in everything:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
            shutil.rmtree(node.workdir, ignore_errors=True)


def stop_ray_start(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """Stop `ray start --block` processes started in their own session, with everything under them.

    SIGTERM to each process group, then SIGKILL to every process still alive after ``grace`` seconds,
    by pid: the processes each `ray start` spawned (GCS, raylet, dashboard, workers) and any in another
    session under them (a job's driver). A graceful `ray start` exit took about 30 s per node here (its
    children wind down one by one), time that bought a test nothing: these clusters' temp dirs are
    thrown away."""
    import psutil

    tree: list[psutil.Process] = []
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                tree += psutil.Process(proc.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.time()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


# Ray Train's controller polls its workers every 2 s by default, so every fit waits ~1 s after its train
# function returns; the tests run dozens of short fits (a missed poll is harmless: a worker counts as
# dead after 10 min of them). In the test session's environment (conftest) and every test job's.
FAST_TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
JOB_ENV = {"RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1", "RAY_TRAIN_V2_ENABLED": "1", **FAST_TRAIN_POLL}


def submit(address: str, run_root: str, overrides: list[str], config: str = "synthetic") -> str:
    """`ray job submit --no-wait` of jobs/run_pipeline.py; returns the submission id."""
    env = node_env()
    args = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"env_vars": JOB_ENV}), "--",
        "python", "jobs/run_pipeline.py", "--config", config, "--run-root", run_root,
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


def wait_job(client, job_id: str, until: set[str], timeout: float, also=lambda: False) -> str:
    """Poll until the job's status is in ``until`` (or ``also()`` is true); returns the status."""
    deadline = time.time() + timeout
    status = "?"
    while time.time() < deadline:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in until or also():
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s:\n{client.get_job_logs(job_id)[-3000:]}")


def while_running(client, job_id: str, cond, timeout: float, what: str, every: float = 0.5):
    """Poll ``cond()`` until it returns something true (returned) while the job runs; the job ending
    first, or ``cond`` raising AssertionError (too late), fails with the job's last log lines."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status not in ("PENDING", "RUNNING"):
            raise AssertionError(f"job {job_id} ended ({status}) before {what}:\n{client.get_job_logs(job_id)[-4000:]}")
        try:
            value = cond()
        except AssertionError as e:
            raise AssertionError(f"{e}:\n{client.get_job_logs(job_id)[-4000:]}") from e
        except Exception:  # the state API or S3 busy: ask again
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{client.get_job_logs(job_id)[-3000:]}")


# --- watching a pipeline job on such a cluster (to disturb it at the right moment)


def checkpoint_committed(run_root: str) -> bool:
    """Ray Train registered the first checkpoint of the pretraining (its manager snapshot lists one)."""
    pre = storage.join(run_root, "pretrain")
    for name in storage.listdir(pre):
        snap = storage.join(pre, name, "checkpoint_manager_snapshot.json")
        if name.startswith("ray_train-") and storage.exists(snap) and storage.read_json(snap)["checkpoint_results"]:
            return True
    return False


def gan_epochs_done(run_root: str) -> int:
    gan = storage.join(run_root, "gan")
    done = [len(storage.read_json(storage.join(gan, c, "losses.json"))) for c in storage.listdir(gan)
            if c.startswith("c") and storage.exists(storage.join(gan, c, "losses.json"))]
    return max(done, default=0)


def worker_node_of(cluster: LocalCluster, class_part: str) -> str | None:
    """The name of a worker node (not the head) that holds a live actor whose class name has ``class_part``
    (None when there is none)."""
    from ray.util.state import list_actors

    names = cluster.node_names()
    live = [a for a in list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")], limit=10000)
            if class_part in a.class_name]
    nodes = sorted({names.get(a.node_id) for a in live} - {None, "head"})
    return nodes[0] if nodes else None


def kill_job_driver(cluster: LocalCluster, run_root: str) -> int:
    """SIGKILL the job's driver process (a child of the head's `ray start`, started by this test)."""
    import psutil

    head = psutil.Process(cluster.nodes["head"].proc.pid)
    drivers = [p for p in head.children(recursive=True) if p.name().startswith("python")  # not its `sh -c`
               and "run_pipeline.py" in " ".join(p.cmdline()) and run_root in " ".join(p.cmdline())]
    assert len(drivers) == 1, drivers
    os.kill(drivers[0].pid, signal.SIGKILL)
    return drivers[0].pid
