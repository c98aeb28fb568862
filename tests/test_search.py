"""``slsr embed`` / ``slsr search`` / ``slsr export`` on one tiny real pipeline run (the demo's layout),
plus the faiss index alone (IVF recall against the exact index) and the bad inputs of the issue."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from slsr_ray import storage
from slsr_ray.cli import app
from slsr_ray.config import config_hash
from slsr_ray.embed import embed_images, read_gallery_metadata
from slsr_ray.export import card_path, load_reference
from slsr_ray.extract import features_column
from slsr_ray.faiss_index import FeatureIndex, cache_uri
from slsr_ray.search import (
    SearchError,
    SearchSettings,
    load_gallery,
    read_queries,
    search,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(ray_session, tiny_run_root, tmp_path_factory):
    """A finished tiny pipeline run (SLSR, with re-ranking), like ``make demo``'s runs/demo: a copy of the
    session's shared run whose SLSR model is trained again for 3 epochs (its upstream stages are reused),
    so that the matches in the top 5 are neither none nor all (one epoch ranks no identity in the top 5)."""
    import shutil

    from conftest import TINY_RUN

    from slsr_ray.pipeline import load_config, run_pipeline

    run_root = str(tmp_path_factory.mktemp("serve-run") / "run")
    shutil.copytree(tiny_run_root[0].run_root, run_root)
    cfg = load_config("synthetic", [*TINY_RUN, "baselines=[]", "train.epochs=3"], run_root=run_root)
    run_pipeline(cfg, echo=lambda *_: None)
    return cfg


@pytest.fixture(scope="module")
def gallery_file(tiny_run, tmp_path_factory):
    """The run's test gallery embedded with its SLSR model by ``slsr embed`` (the CLI)."""
    out = str(tmp_path_factory.mktemp("embed") / "gallery.parquet")
    manifest = os.path.join(tiny_run.run_root, "prepare", "gallery.parquet")
    res = runner.invoke(app, ["embed", "--model", tiny_run.run_root, "--images", manifest, "--output", out])
    assert res.exit_code == 0, res.output
    return out


def _evaluation(run_root: str, kind: str) -> dict:
    return storage.read_json(os.path.join(run_root, "evaluate", "slsr", f"{kind}.json"))


def test_top1_is_the_identity_as_often_as_the_evaluation_rank1_says(tiny_run, gallery_file):
    run_root = tiny_run.run_root
    gallery_manifest = storage.read_table(os.path.join(run_root, "prepare", "gallery.parquet"))
    gal = load_gallery(gallery_file)
    assert gal.table["path"].to_pylist() == gallery_manifest["path"].to_pylist()  # one row per image, in order
    assert gal.meta["feature"] == "pool" and gal.meta["input_size"] == [64, 32]
    assert gal.meta["model"] == os.path.join(run_root, "train", "slsr", "model.pt")

    loaded = load_reference(run_root)
    queries = read_queries(os.path.join(run_root, "prepare", "query.parquet"))
    assert len(queries) > 10 and all(q.pid is not None for q in queries)
    ev = tiny_run.evaluate
    for kind, rerank in (("plain", False), ("rerank", True)):
        settings = SearchSettings(top=5, rerank=rerank, skip_same_camera=True, k1=ev.k1, k2=ev.k2,
                                  lambda_value=ev.lambda_value)
        hits, index = search(loaded, gal, queries, settings)
        expected = _evaluation(run_root, kind)
        assert expected["num_valid_queries"] == len(queries)
        # the share of queries with their identity in the top k is the evaluation's CMC at k, k = 1..5
        found = np.array([[h.pid == q.pid for h in row] for q, row in zip(queries, hits, strict=True)])
        cmc = np.cumsum(found, axis=1).clip(max=1).mean(axis=0)
        np.testing.assert_allclose(cmc, expected["cmc"][:5], atol=1e-9, err_msg=kind)
        assert index.kind.startswith("exact")
        for q, row in zip(queries, hits, strict=True):
            assert [h.rank for h in row] == [1, 2, 3, 4, 5]
            assert all(a.distance <= b.distance for a, b in zip(row, row[1:], strict=False))
            assert not any(h.pid == q.pid and h.camid == q.camid for h in row)  # the evaluation's rule
    plain = _evaluation(run_root, "plain")
    assert 0 < plain["cmc"][4] < 1  # matched numbers that are neither all zeros nor all ones
    print(f"\ntop-1 = evaluation rank-1: plain {_evaluation(run_root, 'plain')['rank1']:.4f}, "
          f"re-ranked {_evaluation(run_root, 'rerank')['rank1']:.4f} ({len(queries)} queries)")


def test_cli_search_one_image_prints_a_table_and_writes_json_and_a_strip(tiny_run, gallery_file, tmp_path):
    query = storage.read_table(os.path.join(tiny_run.run_root, "prepare", "query.parquet"))["path"][0].as_py()
    out = tmp_path / "results"
    res = runner.invoke(app, ["search", "--model", tiny_run.run_root, "--gallery", gallery_file, "--query", query,
                              "--top", "4", "--output", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["index"].startswith("exact") and doc["gallery_size"] == load_gallery(gallery_file).features.shape[0]
    (q,) = doc["queries"]
    assert q["path"] == query and [h["rank"] for h in q["hits"]] == [1, 2, 3, 4]
    for h in q["hits"]:  # the printed table holds every hit with its distance
        assert any(h["path"] in line and f"{h['distance']:.4f}" in line for line in res.stdout.splitlines())
    strip = Image.open(q["strip"])
    assert strip.format == "PNG" and strip.width > 5 * 64 and strip.height > 128
    assert np.asarray(strip.convert("RGB")).std() > 10

    # plain nearest neighbours: the same ranking as brute force on the gallery's features
    gal = load_gallery(gallery_file)
    loaded = load_reference(tiny_run.run_root)
    from slsr_ray.search import query_features

    qf = query_features(loaded, [query], "pool")
    brute = np.linalg.norm(gal.features - qf, axis=1)
    assert [h["index"] for h in q["hits"]] == np.argsort(brute)[:4].tolist()
    np.testing.assert_allclose([h["distance"] for h in q["hits"]], np.sort(brute)[:4], rtol=1e-4)


def test_export_of_a_run_root_carries_its_metrics_and_hashes(tiny_run, tmp_path):
    out = str(tmp_path / "model.onnx")
    res = runner.invoke(app, ["export", tiny_run.run_root, "--format", "onnx", "--output", out])
    assert res.exit_code == 0, res.output
    card = json.loads(Path(card_path(out)).read_text())
    plain = _evaluation(tiny_run.run_root, "plain")
    assert card["metrics"]["plain"] == {k: v for k, v in plain.items() if k != "cmc"}
    assert card["metrics"]["rerank"]["rank1"] == _evaluation(tiny_run.run_root, "rerank")["rank1"]
    record = storage.read_json(os.path.join(tiny_run.run_root, "train", "slsr", "_STAGE.json"))
    assert card["training"]["stage_hash"] == record["hash"]
    train_cfg = storage.read_json(os.path.join(tiny_run.run_root, "train", "slsr", "metrics.json"))["config"]
    assert card["training"]["config_hash"] == config_hash(train_cfg)
    assert card["source"]["strategy"] == "slsr" and card["input_size"] == [64, 32] and card["feature_dim"] == 512


def test_embed_a_folder_to_s3_then_search_it(tiny_run, s3_bucket, tmp_path):
    folder = os.path.join(tiny_run.data.root or os.path.join(tiny_run.run_root, "data"), "query")
    out = f"{s3_bucket}/embed/query.parquet"
    embed_images(os.path.join(tiny_run.run_root, "train", "slsr", "model.pt"), folder, out, batch_size=16)
    gal = load_gallery(out)
    names = sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))
    assert sorted(os.path.basename(p) for p in gal.table["path"].to_pylist()) == names
    assert read_gallery_metadata(pq.read_schema(storage.to_local(out)))["dim"] == 512
    assert not storage.listdir(out + ".parts")  # the extract shards were gathered and removed
    # a query that is in the gallery finds itself first, at distance ~0
    loaded = load_reference(tiny_run.run_root)
    hits, _ = search(loaded, gal, read_queries(gal.table["path"][3].as_py()), SearchSettings(top=2))
    assert hits[0][0].index == 3 and hits[0][0].distance < 1e-3


def test_ivf_index_is_trained_once_and_cached_beside_the_gallery(tiny_run, gallery_file, tmp_path):
    gallery = str(tmp_path / "gallery.parquet")
    Path(gallery).write_bytes(Path(gallery_file).read_bytes())
    loaded = load_reference(tiny_run.run_root)
    queries = read_queries(os.path.join(tiny_run.run_root, "prepare", "query.parquet"))
    settings = SearchSettings(top=3, ivf_threshold=40)  # IVF on this small gallery
    first, index = search(loaded, load_gallery(gallery), queries, settings)
    cached = Path(cache_uri(gallery, "euclidean"))
    assert index.kind.startswith("IVF") and cached.exists()
    stamp = cached.stat().st_mtime_ns
    again, index2 = search(loaded, load_gallery(gallery), queries, settings)
    assert cached.stat().st_mtime_ns == stamp and index2.kind == index.kind  # read back, not retrained
    assert [[h.index for h in row] for row in again] == [[h.index for h in row] for row in first]
    # other features under the same name: the cache is stale and is rebuilt
    table = pq.read_table(gallery)
    shifted = features_column(load_gallery(gallery).features[::-1].copy())
    storage.write_table(gallery, table.set_column(table.schema.get_field_index("feature"), "feature", shifted))
    search(loaded, load_gallery(gallery), queries, settings)
    assert cached.stat().st_mtime_ns != stamp


def test_bad_inputs_are_one_line_errors_naming_the_file(tiny_run, gallery_file, tmp_path):
    query = storage.read_table(os.path.join(tiny_run.run_root, "prepare", "query.parquet"))["path"][0].as_py()

    def fails(args: list[str], *named: str) -> str:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        for name in named:
            assert name in lines[0], lines[0]
        return lines[0]

    base = ["search", "--model", tiny_run.run_root, "--output", str(tmp_path / "r")]
    not_ckpt = tmp_path / "model.pt"
    not_ckpt.write_bytes(b"\x00garbage" * 100)
    fails(["search", "--model", str(not_ckpt), "--gallery", gallery_file, "--query", query], str(not_ckpt))
    fails(["embed", "--model", str(not_ckpt), "--images", query, "--output", str(tmp_path / "e.parquet")],
          str(not_ckpt))

    empty = tmp_path / "empty.parquet"
    storage.write_table(str(empty), pa.table({"path": pa.array([], pa.string()),
                                              "feature": features_column(np.zeros((0, 512), np.float32))}))
    assert "empty" in fails([*base, "--gallery", str(empty), "--query", query], str(empty))

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    assert "does not decode" in fails([*base, "--gallery", gallery_file, "--query", str(broken)], str(broken))

    narrow = tmp_path / "narrow.parquet"
    storage.write_table(str(narrow), pa.table({"path": pa.array([query] * 3),
                                               "feature": features_column(np.ones((3, 7), np.float32))}))
    line = fails([*base, "--gallery", str(narrow), "--query", query], str(narrow), "model.pt")
    assert "7-d" in line and "512-d" in line

    fails([*base, "--gallery", str(tmp_path / "nope.parquet"), "--query", query], "nope.parquet")
    fails([*base, "--gallery", gallery_file, "--query", query, "--skip-same-camera"], "pid and camid")
    with pytest.raises(SearchError, match="holds no images"):
        (tmp_path / "no-images").mkdir()
        read_queries(str(tmp_path / "no-images"))
    assert not (tmp_path / "r").exists()  # nothing written by the failed searches


# ---------------------------------------------------------------------------------- the index alone


def _clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d)).astype(np.float32)).astype(np.float32)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ivf_above_the_threshold_keeps_recall_against_the_exact_index(metric):
    gallery = _clustered(6000, 64, 150, seed=0)
    queries = _clustered(200, 64, 150, seed=1)
    exact = FeatureIndex.build(gallery, metric)
    ivf = FeatureIndex.build(gallery, metric, ivf_threshold=1000)  # the 100k default, scaled down for a test
    assert exact.kind.startswith("exact") and ivf.kind.startswith("IVF") and ivf.nlist == 6000 // 39
    d_exact, i_exact = exact.search(queries, 10)
    d_ivf, i_ivf = ivf.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_exact, i_ivf, strict=True)])
    print(f"\nIVF recall@10 vs exact ({metric}, nlist {ivf.nlist}, nprobe {ivf.nprobe}): {recall:.3f}")
    assert recall >= 0.95
    # the exact index's distances are the evaluation's (Euclidean, or 1 - cosine)
    if metric == "euclidean":
        ref = np.linalg.norm(queries[:, None] - gallery[None], axis=2)
    else:
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        ref = 1 - qn @ gn.T
    np.testing.assert_allclose(d_exact, np.sort(ref, axis=1)[:, :10], rtol=1e-3, atol=1e-3)


def test_rerank_over_candidates_equals_the_full_rerank_when_they_cover_the_gallery(tmp_path):
    """Above ``rerank_full`` images, re-ranking runs over the union of the queries' nearest candidates:
    with candidates covering the gallery it is the full re-ranking; with few, hits come from them."""
    import torch

    from slsr_ray.models import ModelConfig, build_model, save_checkpoint
    from slsr_ray.search import Gallery, Query

    cfg = ModelConfig(num_classes=4, backbone="resnet18")
    save_checkpoint(str(tmp_path / "m.pt"), build_model(cfg, announce=False), cfg, {"height": 64, "width": 32})
    loaded = load_reference(str(tmp_path / "m.pt"))
    feats = _clustered(400, 512, 40, seed=2)
    gal = Gallery("mem", pa.table({"path": [f"g{i}.jpg" for i in range(400)]}), feats, {"feature": "pool"})
    qf = _clustered(6, 512, 40, seed=3)
    queries = [Query(f"q{i}.jpg") for i in range(6)]
    with torch.no_grad():
        full, _ = search(loaded, gal, queries, SearchSettings(top=8, rerank=True, k1=6, k2=3), query_feats=qf)
        covered, _ = search(loaded, gal, queries, SearchSettings(top=8, rerank=True, k1=6, k2=3, rerank_full=100,
                                                                rerank_candidates=400), query_feats=qf)
        few, _ = search(loaded, gal, queries, SearchSettings(top=8, rerank=True, k1=6, k2=3, rerank_full=100,
                                                            rerank_candidates=20), query_feats=qf)
    assert [[h.index for h in r] for r in covered] == [[h.index for h in r] for r in full]
    nearest = np.argsort(np.linalg.norm(qf[:, None] - feats[None], axis=2), axis=1)[:, :20]
    pool = set(nearest.ravel().tolist())
    assert all(h.index in pool for row in few for h in row) and all(len(row) == 8 for row in few)
