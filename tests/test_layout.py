"""The run layout names every artifact path once (issue 15): its paths, and a guard that no other module
spells an artifact's file name or a per-K / per-cluster folder."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from slsr_ray import layout
from slsr_ray.layout import RunLayout, SweepLayout

PACKAGE = Path(layout.__file__).parent
# the artifacts one stage writes and another stage, the report, the sweep or `slsr status` reads
ARTIFACT_NAMES = {
    layout.MODEL_FILE, layout.METRICS_FILE, layout.ASSIGNMENTS, layout.MEMBERSHIP, layout.CENTROIDS,
    layout.SILHOUETTE, layout.GAN_CHECKPOINT, layout.GAN_LOSSES, layout.GAN_SAMPLES, layout.GENERATED_MANIFEST,
    layout.RUN_CONFIG, layout.STAGE_MARKER, "train.parquet", "query.parquet", "gallery.parquet",
}


@pytest.mark.parametrize("root", ["/runs/r1", "s3://bucket/runs/r1"])
def test_run_layout_paths(root):
    run = RunLayout(root)
    assert run.split("query") == f"{root}/prepare/query.parquet"
    assert run.features == f"{root}/extract/features"
    assert run.assignments(3) == f"{root}/cluster/k3/assignments.parquet"
    assert run.membership(3) == f"{root}/cluster/k3/membership.json"
    assert run.silhouette == f"{root}/cluster/silhouette.json"
    assert layout.gan_checkpoint(run.gan, 2) == f"{root}/gan/c2/ckpt.pt"
    assert run.gan_samples(0) == f"{root}/gan/c0/samples.png"
    assert run.generated_manifest == f"{root}/generate/manifest.parquet"
    assert layout.generated_images_dir(run.generate, 1) == f"{root}/generate/images/c1"
    assert run.model("train/slsr") == f"{root}/train/slsr/model.pt"
    assert run.model("pretrain") == f"{root}/pretrain/model.pt"
    assert run.metrics("lsro", "rerank") == f"{root}/evaluate/lsro/rerank.json"
    assert run.marker("train/none") == f"{root}/train/none/_STAGE.json"
    assert run.trial(4).metrics("slsr", "plain") == f"{root}/split4/evaluate/slsr/plain.json"
    sweep = SweepLayout(root)
    assert sweep.per_k(5).gan == f"{root}/sweep/shared/k5/gan"
    assert sweep.split_file("train") == f"{root}/sweep/split/train.parquet"


def test_gan_clusters_lists_cluster_folders_only(tmp_path):
    for name in ("c0", "c10", "c2", "cx", "gan.json", "c3.bak"):
        (tmp_path / name).mkdir()
    assert layout.gan_clusters(str(tmp_path)) == [0, 2, 10]
    assert layout.gan_clusters(str(tmp_path / "missing")) == []


def _artifact_spellings(path: Path) -> list[str]:
    """String literals naming a cross-stage artifact, and f-strings ``k{..}`` / ``c{..}`` / ``split{..}``
    that are path parts (not followed by more text, so display strings like ``f"c{c}={n}"`` pass)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ARTIFACT_NAMES:
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
        elif isinstance(node, ast.JoinedStr) and len(node.values) == 2:
            head, tail = node.values
            if isinstance(head, ast.Constant) and head.value in ("k", "c", "split") and isinstance(tail, ast.FormattedValue):
                found.append(f"{path.name}:{node.lineno} f\"{head.value}{{...}}\"")
    return found


def test_only_the_layout_module_spells_artifact_paths():
    offenders = [hit for p in sorted(PACKAGE.rglob("*.py")) if p.name != "layout.py" for hit in _artifact_spellings(p)]
    assert offenders == [], "artifact paths outside slsr_ray/layout.py:\n" + "\n".join(offenders)
    assert _artifact_spellings(PACKAGE / "layout.py")  # the guard does see the spellings where they belong
