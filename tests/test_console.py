"""What `slsr` prints: a short console (a line per stage, rank 0's epoch metrics once, the table) while Ray's
own logs and the workers' output go to <run_root>/logs/ray.log; `-v` brings Ray's lines back. A second Ray
on the machine must not disturb a local run (it is stopped by its pid: `ray stop` would stop every Ray
on the machine). The CLI run here is the session's shared tiny config run again from scratch, so it
also shows that the same seed gives the same run, artifact for artifact."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cluster_helpers import stop_ray_start
from run_helpers import assert_same_run

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NOISE = ("Failed to query", "TrainingReport(", "Traceback", "multiple active Ray instances", "ConnectionError")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    return env


def _slsr(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    """Run the CLI; its output as written (no universal newlines: a progress bar's \\r stays a redraw)."""
    out = subprocess.run([sys.executable, "-m", "slsr_ray.cli", *args], env=_env(), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    out.stdout = out.stdout.decode("utf-8", errors="replace")
    return out


@pytest.fixture
def second_ray():
    """Another local Ray (`ray start --head`, own temp dir and ports), as another user's would be."""
    temp_dir = tempfile.mkdtemp(prefix="r2", dir="/tmp")  # short: Ray's socket paths have a length limit
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
        "--num-cpus=1", f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
        f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
    ]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address_file = Path(temp_dir) / "ray_current_cluster"  # written once the head is up
    deadline = time.time() + 180
    while not address_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(1)
    try:
        assert address_file.exists(), "the second Ray did not come up"
        yield proc
    finally:
        stop_ray_start([proc])
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_pipeline_console_is_short_and_the_same_seed_gives_the_same_run(second_ray, tiny_run_root, tmp_path):
    """`slsr run` of the session's shared tiny config from scratch, in another process with its own Ray
    (and a second Ray on the machine): a short console, Ray's lines in the run root's log, and every
    artifact equal to the shared run's (same seed, same clusters, images, weights and numbers)."""
    from conftest import TINY_RUN

    run_root = tmp_path / "run"
    sets = [a for o in TINY_RUN for a in ("--set", o)]
    out = _slsr("run", "--run-root", str(run_root), *sets)
    console = out.stdout
    assert out.returncode == 0, console[-4000:]
    assert second_ray.poll() is None, "the second Ray must have been running the whole time"
    lines = console.rstrip("\n").split("\n")  # as a terminal shows them: a progress bar redraws one line
    assert len(lines) <= 45, console  # Ray's stages used to print hundreds
    for noise in NOISE:
        assert noise not in console, noise
    assert "Started a local Ray instance" not in console  # Ray's own lines: only with -v (test below)
    log = run_root / "logs" / "ray.log"
    assert [ln for ln in lines if "Ray logs:" in ln] == [f"[slsr] Ray logs: {log}  (slsr -v shows them here)"]
    # one line per stage, and each training's epoch metrics once (rank 0's)
    for stage in ("prepare", "pretrain", "extract", "cluster", "gan", "generate", "train/slsr", "train/none",
                  "evaluate/slsr", "evaluate/none"):
        assert sum(ln.startswith(f"[slsr] {stage} ") and "finished in" in ln for ln in lines) == 1, stage
    epochs = [ln for ln in lines if "epoch 1/1" in ln]
    assert sorted(ln.split()[1] for ln in epochs) == ["pretrain", "train/none", "train/slsr"], epochs
    assert "| slsr | no |" in console and "| slsr | yes |" in console and "| none |" in console
    # Ray's lines are in the log file, with the workers' output; and Ray Train's placement-group cleaner
    # reached the state API even with a second Ray on the machine
    text = log.read_text()
    assert "Started a local Ray instance" in text and "TrainingReport(" in text
    assert "(RayTrainWorker pid=" in text and "epoch 1/1" in text
    assert "Failed to query" not in text and "multiple active Ray instances" not in text
    assert_same_run(tiny_run_root[0].run_root, str(run_root))  # in another process, on another Ray


def test_verbose_brings_ray_logs_back(tmp_path):
    """`-v` prints Ray's own lines (the quiet default is the test above: Ray's lines only in the log)."""
    overrides = ["--until", "prepare", "--set", "data.synthetic.num_ids=8", "--set", "data.synthetic.images_per_id=4",
                 "--set", "cluster.ks=[2,3]"]
    loud = _slsr("-v", "run", "--run-root", str(tmp_path / "loud"), *overrides, timeout=600)
    assert loud.returncode == 0, loud.stdout
    assert "[slsr] prepare " in loud.stdout
    assert "Started a local Ray instance" in loud.stdout
    assert "Started a local Ray instance" in (tmp_path / "loud" / "logs" / "ray.log").read_text()


def test_a_line_printed_under_a_progress_bar_starts_its_own_line():
    """`ray job logs` (stdout and stderr in one file, no terminal): a worker's line or a stage line printed
    while a tqdm bar is drawn starts a line of its own, not glued to the bar (seen: the generation task's
    CPU-fallback line came out as "generating 24 images: 0%|  |[slsr] generate no CUDA: ...")."""
    import contextlib
    import io

    from tqdm import tqdm

    from slsr_ray import console

    buf = io.StringIO()  # not a terminal: what a job's log file gets
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        bar = tqdm(total=3, desc="generating 24 images", file=sys.stderr, disable=False)
        bar.update()
        console._show_worker_line("no CUDA: generation task on vm (pid 1) was given GPU(s) 0")
        bar.update()
        console.echo("[slsr] generate           finished in 1.0s")
        bar.update()
        bar.close()
    lines = buf.getvalue().splitlines()
    assert any(ln.startswith("[slsr] ") and "no CUDA: generation task" in ln for ln in lines), lines
    assert "[slsr] generate           finished in 1.0s" in lines, lines
    assert any(ln.startswith("generating 24 images: 100%") for ln in lines), lines  # the bar is redrawn
