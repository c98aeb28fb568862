"""The notebooks run top to bottom (nbclient, the project's Python as the kernel) on their fast settings:
the walkthrough runs on a copy of the session's finished tiny run (the same settings) and shows every
figure; the cluster notebook starts a Ray head
on loopback, submits the pipeline on the walkthrough's run root as a Ray job (rerunning the evaluation),
reads the results back and stops its head."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

pytestmark = pytest.mark.slow


def execute(name: str, monkeypatch, **env: str) -> nbformat.NotebookNode:
    """Run a notebook in a fresh kernel (the kernel inherits this process's environment)."""
    for key, value in {"SLSR_NOTEBOOK_FAST": "1", "RAY_AUTH_MODE": "disabled", **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def outputs(nb, kind: str) -> list:
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "text" and out.get("name") == "stdout":
                found.append(out["text"])
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


def fast_settings(name: str) -> list[str]:
    """The notebook's ``TINY`` list, read from its code without running it."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "TINY = [" in cell.source:
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "TINY":
                    return ast.literal_eval(node.value)
    raise AssertionError(f"{name} has no TINY list")


@pytest.mark.parametrize("name", ["01_walkthrough.ipynb", "02_cluster_submit.ipynb"])
def test_fast_settings_are_the_suites_shared_tiny_run(name):
    # the walkthrough runs on a copy of the shared run root: with other settings it would retrain all
    from conftest import TINY_RUN

    assert fast_settings(name) == TINY_RUN


@pytest.fixture(scope="module")
def walkthrough(tiny_run_root, tmp_path_factory):
    """The walkthrough on a copy of the session's finished tiny run (the same settings): every stage is
    reused, the notebook's own code (config, Ray, figures, report) runs; the stages themselves are
    tested by the pipeline tests."""
    run_root = tmp_path_factory.mktemp("walkthrough") / "run"
    shutil.copytree(tiny_run_root[0].run_root, run_root)
    with pytest.MonkeyPatch.context() as mp:
        nb = execute("01_walkthrough.ipynb", mp, SLSR_NOTEBOOK_RUN_ROOT=str(run_root))
    return nb, run_root


def test_walkthrough_runs_and_shows_every_stage(walkthrough):
    nb, run_root = walkthrough
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    pictures = outputs(nb, "image/png")
    assert len(pictures) >= 8  # data, silhouette, PCA, GAN, labels, training, CMC, ranked gallery
    text = "".join(outputs(nb, "text"))
    assert "fast settings" in text and "| slsr | no |" in text
    assert "[slsr] train/slsr         done (skipped)" in text  # the shared run's stages were reused
    summary = json.loads((run_root / "report" / "summary.json").read_text())
    assert set(summary["metrics"]) == {"slsr", "none"}
    assert len(summary["figures"]) == 8 and (run_root / "report" / "report.html").exists()


def test_cluster_notebook_submits_a_job_and_reads_the_results(walkthrough, monkeypatch):
    _, run_root = walkthrough

    def marker(stage: str) -> dict:
        return json.loads((run_root / stage / "_STAGE.json").read_text())

    before = {s: marker(s) for s in ("pretrain", "train/slsr", "evaluate/slsr")}
    nb = execute("02_cluster_submit.ipynb", monkeypatch, SLSR_NOTEBOOK_RUN_ROOT=str(run_root),
                 SLSR_NOTEBOOK_JOB_FROM="evaluate")
    text = "".join(outputs(nb, "text"))
    assert "SUCCEEDED" in text and "--from evaluate" in text
    assert "| slsr | yes |" in text and "S3 variant skipped" in text
    assert "head stopped" in text
    # the job reused the finished stages and reran the evaluation
    assert marker("pretrain") == before["pretrain"] and marker("train/slsr") == before["train/slsr"]
    assert marker("evaluate/slsr")["finished"] > before["evaluate/slsr"]["finished"]
    assert outputs(nb, "image/png"), "the CMC picture read back from the run root"
