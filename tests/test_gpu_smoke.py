"""benchmarks/gpu_smoke.py end to end without a GPU: with --allow-cpu Ray is told of one GPU that
every step falls back from (CPU tensors, faiss on CPU), so the script's own paths run here; the
training and whole-pipeline steps run on the multi-node fake-GPU cluster in test_multinode.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_smoke.py"


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_refuses_to_run_without_a_gpu_unless_allowed(tmp_path):
    out = _run("--output", str(tmp_path / "r.json"))
    assert out.returncode == 2 and "no CUDA GPU here" in out.stderr and "--allow-cpu" in out.stderr
    assert not (tmp_path / "r.json").exists()
    assert _run("--steps", "extract,bogus").returncode == 2


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_smoke_steps_run_with_allow_cpu(tmp_path):
    result = tmp_path / "gpu_smoke.json"
    out = _run("--allow-cpu", "--size", "tiny", "--steps", "extract,kmeans_search,gan", "--output", str(result))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["cuda"] is False and "no CUDA" in report["device"]
    steps = report["steps"]
    assert set(steps) == {"extract", "kmeans_search", "gan"}
    assert steps["extract"]["status"] == "ok" and steps["extract"]["images_per_s"] > 0
    assert steps["extract"]["gpu_vs_cpu"] > 0
    assert steps["kmeans_search"]["status"] == "fallback" and "slsr-ray[gpu]" in steps["kmeans_search"]["note"]
    assert steps["gan"]["status"] == "ok" and steps["gan"]["actors"] == 3 and steps["gan"]["devices"] == ["cpu"]
    assert abs(steps["gan"]["gpu_per_actor"] - 1 / 3) < 1e-6
    assert "[slsr] no CUDA" in out.stdout + out.stderr  # the fallback is said, not silent
