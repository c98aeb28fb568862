"""Starting or joining Ray: the one way the CLI, the jobs, the notebooks, the tests and the stages do it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from . import console, layout, storage

log = logging.getLogger(__name__)

# Under a local run root; an s3:// run root's log goes to Ray's session log folder.
LOG_FILE = layout.LOG_FILE
# Ray Train settings for a Ray this process starts on its own machine (propagated by Ray Train to its
# controller and workers). A Train stage of a small run spent most of its ~23 s starting and stopping:
#  * the controller polls the workers every 2 s (Ray's default), and every state change (workers up,
#    training finished, shut down) waits for a poll: 0.5 s polls;
#  * a preemption watcher actor (one more Python process importing Ray Train, per worker group) watches
#    for nodes being drained -- a single local node is never drained by an autoscaler.
# Clusters (``ray job submit``, RAY_ADDRESS) keep Ray's defaults.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Where Ray's state API (served by the dashboard) is, for Ray Train's placement-group cleaner in the workers.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def run_log_path(run_root: str | None) -> str | None:
    """``<run_root>/logs/ray.log`` for a local run root, else None."""
    if run_root is None or storage.is_s3(run_root):
        return None
    return os.path.join(storage.absolute(run_root), *LOG_FILE)


def init_ray(address: str | None = None, *, run_root: str | None = None, quiet: bool | None = None, **kwargs) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS`` (set inside ``ray job submit``), or start a local
    Ray sized to this machine (never a ``ray start`` cluster found on the machine: ``address="local"``).
    Idempotent; always with Ray Train V2 (``RAY_TRAIN_V2_ENABLED``).

    ``quiet``: Ray's logs and the workers' output go to a log file (``<run_root>/logs/ray.log`` for a local
    ``run_root``, else Ray's session log folder; the path is printed once) and the console shows the
    run's own lines (:mod:`slsr_ray.console`); False: Ray's console output. None: the CLI's choice (quiet
    unless ``slsr -v``), Ray's console output in library use. ``kwargs`` go to ``ray.init``.
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # read when ray.train is imported
    import ray

    if ray.is_initialized():
        return
    if quiet is None:  # `slsr -v` still writes the log file, and shows everything on the console too
        route, quiet = console.configured(), console.quiet_by_default()
    else:
        route = quiet
    if route:
        console.open_log(run_log_path(run_root))
        kwargs.setdefault("log_to_driver", True)  # the worker lines reach the driver, which sorts them
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        _start_local(kwargs)
    if route:
        console.route_ray_output(_session_log_dir())
    try:
        from ray.data import DataContext

        # Ray Data's progress block repeats every few seconds in a log: only when Ray's output is wanted
        DataContext.get_current().enable_progress_bars = not quiet
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        pass


def _start_local(kwargs: dict) -> None:
    """A laptop run: no token auth prompt, a modest object store, and the dashboard on a free loopback
    port whose address every worker knows.

    Ray Train's placement-group cleaner (an actor) asks the state API, which the dashboard serves,
    whether the train controller still lives. Without a dashboard it warns "Failed to query Ray Train
    Controller actor state" every few seconds; and left to find the cluster itself it dies with "Found
    multiple active Ray instances" as soon as a second Ray runs on the machine. The raylet (so every
    worker) inherits ``RAY_API_SERVER_ADDRESS`` from this process during ``ray.init``; the driver drops
    it afterwards, where it would override the address of any job or state client it creates."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    set_local_train_env()
    kwargs.setdefault("object_store_memory", 512 * 1024 * 1024)
    if not kwargs.setdefault("include_dashboard", True):
        _init_local(kwargs)
        return
    kwargs.setdefault("dashboard_host", "127.0.0.1")
    kwargs.setdefault("dashboard_port", _free_port())
    before = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://{kwargs['dashboard_host']}:{kwargs['dashboard_port']}"
    try:
        _init_local(kwargs)
    finally:
        if before is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = before


def set_local_train_env() -> None:
    """:data:`LOCAL_TRAIN_ENV` into this process's environment (Ray Train reads it from the driver and
    passes it on to its controller and workers); a value the user set wins."""
    for name, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(name, value)


def _init_local(kwargs: dict) -> None:
    """``ray.init`` of a new local Ray, tried twice: Ray gives a new node a fixed 30 s to register, which
    an overloaded machine (shared CPUs, other Rays) can miss. The processes of a failed try are stopped
    (nothing else would stop them before this process exits)."""
    import ray  # noqa: I001  (before psutil: Ray ships it in ray/thirdparty_files)
    import psutil

    me = psutil.Process()
    for attempt in (1, 2):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            for p in me.children(recursive=True):
                if p.pid not in before:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
            log.warning("the local Ray did not start within Ray's 30 s (an overloaded machine?); trying again")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_log_dir() -> str | None:
    """Ray's log folder of this session (``/tmp/ray/session_*/logs`` for a local Ray)."""
    import ray

    try:
        return ray._private.worker._global_node.get_logs_dir_path()
    except AttributeError:  # a Ray Client connection has no local node
        return None
