"""The run report and its figures, on one tiny real run (every stage, SLSR + the `none` baseline) built
once for this module: every PNG exists and shows something, every plotted value is the run's own number
(read back from the stage artifacts), the HTML page is self-contained, figures without inputs are
skipped, training histories land in TensorBoard (and MLflow when installed)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slsr_ray import figures, storage
from slsr_ray.report import log_to_mlflow, write_report

ALL_FIGURES = {"dataset_samples", "feature_pca", "silhouette", "gan_vs_real", "label_distributions", "training",
               "cmc", "ranked_gallery"}


@pytest.fixture(scope="module")
def tiny_run(tiny_run_root):
    """(config, summary, printed lines) of the session's tiny pipeline run, the report written at its end."""
    return tiny_run_root


def _image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_report_has_every_figure_as_a_non_trivial_png(tiny_run):
    cfg, summary, lines = tiny_run
    report = Path(cfg.run_root) / "report"
    assert set(summary["figures"]) == ALL_FIGURES
    for name, meta in summary["figures"].items():
        img = _image(report / meta["file"])
        h, w, _ = img.shape
        assert (w, h) == (meta["width"], meta["height"]), name
        assert w >= 300 and h >= 200, f"{name} is only {w}x{h}"
        # drawn content, not a blank canvas: many distinct colours and real contrast
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50, name
        assert img.std() > 10, name
    md = (report / "report.md").read_text()
    for name in ALL_FIGURES:
        assert f"]({name}.png)" in md
    assert "| slsr | no |" in md and "| none | yes |" in md
    assert any("report.md" in line for line in lines)


def test_html_report_is_self_contained(tiny_run):
    cfg, summary, _ = tiny_run
    report = Path(cfg.run_root) / "report"
    page = (report / "report.html").read_text()
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(inlined) == len(ALL_FIGURES)
    assert not re.findall(r'src="(?!data:)', page), "the page links files instead of inlining them"
    pngs = {(report / f"{name}.png").read_bytes() for name in ALL_FIGURES}
    assert {base64.b64decode(b) for b in inlined} == pngs
    assert "<table>" in page and "slsr" in page


def test_cmc_figure_plots_the_evaluate_json(tiny_run):
    cfg, summary, _ = tiny_run
    fig = figures.cmc_curves(cfg.run_root)
    for strategy in ("slsr", "none"):
        for mode, label in (("plain", strategy), ("rerank", f"{strategy} + re-rank")):
            saved = json.loads((Path(cfg.run_root) / "evaluate" / strategy / f"{mode}.json").read_text())
            assert fig.data["cmc"][label] == saved["cmc"][:20]
            assert summary["figures"]["cmc"]["data"]["cmc"][label] == saved["cmc"][:20]
            assert summary["metrics"][strategy][mode]["rank1"] == saved["rank1"]


def test_training_and_silhouette_figures_plot_the_run_json(tiny_run):
    cfg, summary, _ = tiny_run
    root = Path(cfg.run_root)
    data = figures.training_curves(cfg.run_root).data
    for name, stage in (("pretrain", "pretrain"), ("slsr", "train/slsr"), ("none", "train/none")):
        history = json.loads((root / stage / "metrics.json").read_text())["history"]
        assert history, stage
        for key in ("loss", "train_acc", "lr"):
            assert data[name][key] == [e[key] for e in history], (name, key)
        assert summary["figures"]["training"]["data"][name]["loss"] == [e["loss"] for e in history]
    sil = json.loads((root / "cluster" / "silhouette.json").read_text())
    fig = figures.silhouette_vs_k(cfg.run_root)
    assert fig.data["k"] == [2, 3]
    assert fig.data["silhouette"] == [sil["2"], sil["3"]]
    assert fig.data["k_used"] == summary["k"] == sil["best_k"]


def test_label_distributions_follow_the_cluster_membership(tiny_run):
    cfg, _, _ = tiny_run
    root = Path(cfg.run_root)
    data = figures.label_distributions(cfg.run_root, image_index=3).data
    train = storage.read_table(str(root / "prepare" / "train.parquet"))
    num_ids = len(set(train["pid"].to_pylist()))  # the synthetic split keeps half the identities for training
    assert data["num_classes"] == num_ids == max(train["pid"].to_pylist()) + 1
    lsro, slsr = np.array(data["lsro"]), np.array(data["slsr"])
    np.testing.assert_allclose(lsro, np.full(num_ids, 1 / num_ids), rtol=1e-6)
    membership = json.loads((root / "cluster" / f"k{cfg_k(root)}" / "membership.json").read_text())
    members = next(c["pids"] for c in membership["clusters"] if c["cluster"] == data["cluster"])
    assert sorted(np.flatnonzero(slsr).tolist()) == sorted(members) == data["members"]
    np.testing.assert_allclose(slsr[members], 1 / len(members), rtol=1e-6)
    assert slsr.sum() == pytest.approx(1.0)
    generated = storage.read_table(str(root / "generate" / "manifest.parquet"))
    assert generated["path"][3].as_py() == data["path"] and generated["cluster"][3].as_py() == data["cluster"]


def cfg_k(root: Path) -> int:
    return json.loads((root / "cluster" / "_STAGE.json").read_text())["outputs"]["k"]


def test_ranked_gallery_matches_the_evaluation_features(tiny_run):
    from slsr_ray.extract import load_features

    cfg, _, _ = tiny_run
    fig = figures.ranked_gallery(cfg.run_root, strategy="slsr", query_index=2)
    data = fig.data
    table, feats = load_features(str(Path(cfg.run_root) / "evaluate" / "slsr" / "features"))
    split = np.asarray(table["split"].to_pylist())
    q, g = np.flatnonzero(split == "query"), np.flatnonzero(split == "gallery")
    pids, cams = table["pid"].to_numpy(), table["camid"].to_numpy()
    qi = q[2]
    assert (data["query_pid"], data["query_camid"]) == (pids[qi], cams[qi])
    # the plain ranking, recomputed independently: Euclidean distance, same-id same-camera entries left out
    dist = np.linalg.norm(feats[g] - feats[qi], axis=1)
    keep = ~((pids[g] == pids[qi]) & (cams[g] == cams[qi]))
    expected = np.flatnonzero(keep)[np.argsort(dist[keep], kind="stable")][:10]
    assert data["plain"]["gallery_index"] == expected.tolist()
    np.testing.assert_allclose(data["plain"]["distance"], dist[expected], rtol=1e-4, atol=1e-4)
    for mode in ("plain", "rerank"):
        ranked = np.array(data[mode]["gallery_index"])
        assert len(ranked) == 10 and keep[ranked].all()
        assert data[mode]["correct"] == (pids[g][ranked] == pids[qi]).tolist()
        assert np.all(np.diff(data[mode]["distance"]) >= 0)
    # the borders: green for correct, red for wrong, in order along the strip
    img = np.asarray(Image.open(io.BytesIO(fig.png)).convert("RGB"))
    assert img.shape[1] > 600


def test_pca_and_dataset_figures_use_the_manifests(tiny_run):
    cfg, _, _ = tiny_run
    root = Path(cfg.run_root)
    train = storage.read_table(str(root / "prepare" / "train.parquet"))
    pca = figures.feature_pca(cfg.run_root).data
    assert len(pca["xy"]) == train.num_rows == len(pca["cluster"])
    assign = storage.read_table(str(root / "cluster" / f"k{pca['k']}" / "assignments.parquet"))
    assert np.bincount(pca["cluster"]).tolist() == np.bincount(assign["cluster"].to_numpy()).tolist()
    assert pca["explained_variance_ratio"][0] >= pca["explained_variance_ratio"][1] > 0
    assert len(pca["centroids_xy"]) == pca["k"]
    samples = figures.dataset_samples(cfg.run_root).data
    rows = set(zip(train["path"].to_pylist(), train["pid"].to_pylist(), train["camid"].to_pylist(), strict=True))
    assert samples["cameras"] == [0, 1, 2]
    for cam, paths in samples["paths"].items():
        for pid, path in zip(samples["pids"], paths, strict=True):
            assert path is None or (path, pid, int(cam)) in rows
    assert sum(samples["images_per_camera"].values()) == train.num_rows


def test_tensorboard_event_files_hold_the_history(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, summary, _ = tiny_run
    tb = Path(cfg.run_root) / "tensorboard"
    assert set(summary["tensorboard"]) == {"pretrain", "slsr", "none"}
    history = json.loads((Path(cfg.run_root) / "train" / "slsr" / "metrics.json").read_text())["history"]
    acc = EventAccumulator(str(tb / "slsr"))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [h["epoch"] for h in history]
    np.testing.assert_allclose([e.value for e in losses], [h["loss"] for h in history], rtol=1e-6)
    assert acc.Scalars("eval/plain/rank1")[0].value == pytest.approx(summary["metrics"]["slsr"]["plain"]["rank1"])


def test_slsr_report_command_rewrites_the_report(tiny_run):
    from typer.testing import CliRunner

    from slsr_ray.cli import app

    cfg, _, _ = tiny_run
    report = Path(cfg.run_root) / "report"
    (report / "cmc.png").unlink()
    (report / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", cfg.run_root])
    assert result.exit_code == 0, result.output
    assert (report / "cmc.png").stat().st_size > 10_000
    assert (report / "report.html").exists()
    assert "| slsr | no |" in result.output
    assert len(list((Path(cfg.run_root) / "tensorboard" / "slsr").iterdir())) == 1  # rewritten, not appended


def test_figures_without_inputs_are_skipped(tiny_run, tmp_path):
    """A run without the GAN/generate/evaluate stages (as a `none`-only run, or an unfinished one)."""
    import dataclasses

    cfg, _, _ = tiny_run
    partial = tmp_path / "partial"
    shutil.copytree(cfg.run_root, partial, ignore=shutil.ignore_patterns("gan", "generate", "evaluate", "report",
                                                                         "tensorboard"))
    with pytest.raises(figures.FigureInputMissing, match="generate"):
        figures.label_distributions(str(partial))
    summary = write_report(dataclasses.replace(cfg, run_root=str(partial)), echo=lambda *_: None)
    assert set(summary["figures"]) == {"dataset_samples", "feature_pca", "silhouette", "training"}
    assert summary["metrics"] == {}
    assert sorted(p.name for p in (partial / "report").glob("*.png")) == sorted(
        f"{n}.png" for n in summary["figures"])


def test_mlflow_is_off_without_a_tracking_uri(tiny_run, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert log_to_mlflow(tiny_run[1]) is None


def test_mlflow_logs_params_metrics_and_the_report(tiny_run, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    cfg, summary, _ = tiny_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    run_id = log_to_mlflow(summary, experiment="slsr-test")
    run = mlflow.tracking.MlflowClient().get_run(run_id)
    assert run.data.params["train.strategy"] == "slsr"
    assert run.data.metrics["slsr/plain/rank1"] == pytest.approx(summary["metrics"]["slsr"]["plain"]["rank1"])
    steps = mlflow.tracking.MlflowClient().get_metric_history(run_id, "train/slsr/loss")
    assert [m.value for m in steps] == pytest.approx([e["loss"] for e in summary["training"]["slsr"]])
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_id, "report")}
    assert "report/report.html" in artifacts
