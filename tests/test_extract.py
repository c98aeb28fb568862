"""Feature extraction with Ray Data on the synthetic fixture dataset (local and S3 on moto)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from slsr_ray import storage
from slsr_ray.extract import (
    ExtractConfig,
    ExtractError,
    extract_features,
    is_complete,
    load_features,
)
from slsr_ray.models import ModelConfig, build_model, save_checkpoint
from slsr_ray.transforms import build_test_transform

SMALL = dict(height=64, width=32, batch_size=16)


def _reference_features(model, paths, feature="pool"):
    """Features computed image by image with the contract's test transform, no Ray."""
    from slsr_ray.data import read_image

    tf = build_test_transform(SMALL["height"], SMALL["width"])
    x = torch.stack([tf(read_image(p)) for p in paths])
    return model.extract(x, feature=feature).numpy()


def test_extract_from_checkpoint_one_row_per_image_ids_intact(ray_session, synthetic_dataset, tmp_path):
    cfg = ModelConfig(num_classes=12, backbone="resnet18")
    torch.manual_seed(0)
    model = build_model(cfg, announce=False).eval()
    ckpt = str(tmp_path / "model.pt")
    save_checkpoint(ckpt, model, cfg)
    manifest = synthetic_dataset.train
    # a separate decode stage (what "auto" picks on GPU clusters); "auto" on CPUs is tested below
    cfg = ExtractConfig(decode="tasks", cpus_per_actor=0.5, decode_cpus=0.25, **SMALL)
    out = extract_features(manifest, ckpt, str(tmp_path / "features"), cfg)

    assert is_complete(out)
    meta = storage.read_json(os.path.join(out, "meta.json"))
    assert meta["num_rows"] == manifest.num_rows and meta["dim"] == 512 and meta["decode"] == "tasks"
    shard = storage.read_table(os.path.join(out, meta["files"][0]))
    assert shard.schema.field("feature").type == pa.list_(pa.float32(), 512)

    table, X = load_features(out)
    assert table.num_rows == manifest.num_rows == X.shape[0] and X.shape[1] == 512
    for col in manifest.column_names:  # every manifest column, in manifest order
        assert table[col].to_pylist() == manifest[col].to_pylist()
    assert np.isfinite(X).all()
    # equal to a plain loop with the same model and the documented test transform
    idx = [0, 17, 50, manifest.num_rows - 1]
    ref = _reference_features(model, [manifest["path"][i].as_py() for i in idx])
    np.testing.assert_allclose(X[idx], ref, rtol=1e-4, atol=1e-5)


def test_extract_random_init_to_s3_two_actors_share_weights(ray_session, synthetic_dataset, s3_bucket):
    manifest_uri = f"{s3_bucket}/manifest/train.parquet"
    storage.write_table(manifest_uri, synthetic_dataset.train)
    out = f"{s3_bucket}/run/features"
    cfg = ExtractConfig(feature="bottleneck", num_actors=2, **SMALL)  # auto on a CPU cluster: decode in actors
    model_cfg = ModelConfig(num_classes=12, backbone="resnet18")
    torch.manual_seed(1)
    extract_features(manifest_uri, model_cfg, out, cfg)
    names = storage.listdir(out)
    assert "_SUCCESS" in names and "meta.json" in names
    meta = storage.read_json(f"{out}/meta.json")
    assert meta["num_actors"] == 2 and meta["decode"] == "actor"
    table, X = load_features(out)
    manifest = synthetic_dataset.train
    assert X.shape == (manifest.num_rows, 512)
    assert table["path"].to_pylist() == manifest["path"].to_pylist()
    # the driver built the random model once and the actors share its weights: rows of the first and
    # the last block equal the same model rebuilt from the same seed
    torch.manual_seed(1)
    model = build_model(model_cfg, announce=False).eval()
    idx = [0, 1, manifest.num_rows - 2, manifest.num_rows - 1]
    ref = _reference_features(model, [manifest["path"][i].as_py() for i in idx], feature="bottleneck")
    np.testing.assert_allclose(X[idx], ref, rtol=1e-4, atol=1e-5)


def test_one_batch_input_runs_in_one_task_with_the_pools_features(ray_session, synthetic_dataset, tmp_path):
    """An input of one batch is extracted by one Ray task, not an actor pool; it computes what the pool
    computes for the same batch, bit for bit, in the same table layout."""
    cfg = ModelConfig(num_classes=12, backbone="resnet18")
    torch.manual_seed(2)
    ckpt = str(tmp_path / "model.pt")
    save_checkpoint(ckpt, build_model(cfg, announce=False), cfg)
    manifest = synthetic_dataset.train.slice(0, 2 * SMALL["batch_size"])
    pool = extract_features(manifest, ckpt, str(tmp_path / "pool"), ExtractConfig(**SMALL))  # two batches
    task = extract_features(manifest.slice(0, SMALL["batch_size"]), ckpt, str(tmp_path / "task"), ExtractConfig(**SMALL))
    assert storage.read_json(os.path.join(pool, "meta.json"))["num_actors"] >= 1
    meta = storage.read_json(os.path.join(task, "meta.json"))
    assert (meta["num_actors"], meta["decode"], meta["num_rows"]) == (0, "task", SMALL["batch_size"])
    pool_table, pool_x = load_features(pool)
    task_table, task_x = load_features(task)
    assert task_table.schema == pool_table.schema
    assert task_table.equals(pool_table.slice(0, SMALL["batch_size"]))  # the same rows, features to the bit
    np.testing.assert_array_equal(task_x, pool_x[: SMALL["batch_size"]])


def test_missing_images_are_listed_before_any_work(synthetic_dataset, tmp_path):
    manifest = synthetic_dataset.train.slice(0, 20)
    paths = manifest["path"].to_pylist()
    gone = [str(tmp_path / f"gone_{i}.jpg") for i in range(7)]
    bad = manifest.set_column(0, "path", pa.array(gone + paths[7:]))
    with pytest.raises(ExtractError, match=r"7 of 20 images in the manifest do not exist: .*gone_0\.jpg.* and 2 more"):
        extract_features(bad, ModelConfig(backbone="resnet18"), str(tmp_path / "out"), ExtractConfig(**SMALL))
    assert not os.path.exists(tmp_path / "out")


def test_bad_configs_and_unfinished_outputs(ray_session, synthetic_dataset, tmp_path):
    with pytest.raises(ExtractError, match="no GPUs"):
        extract_features(synthetic_dataset.train, ModelConfig(backbone="resnet18"), str(tmp_path / "o"),
                         ExtractConfig(num_gpus=1, **SMALL))
    with pytest.raises(ExtractError, match="batch_size"):
        ExtractConfig(batch_size=0)
    with pytest.raises(ExtractError, match="no 'path' column"):
        extract_features(pa.table({"pid": [1]}), ModelConfig(backbone="resnet18"), str(tmp_path / "o"))
    done = tmp_path / "done"
    done.mkdir()
    (done / "_SUCCESS").write_bytes(b"")
    with pytest.raises(ExtractError, match="checkpoint .*nope.pt does not exist"):
        extract_features(synthetic_dataset.train, str(tmp_path / "nope.pt"), str(done), ExtractConfig(**SMALL))
    assert (done / "_SUCCESS").exists()  # a bad input leaves the earlier output alone
    half = tmp_path / "half"
    half.mkdir()
    storage.write_table(str(half / "part-0.parquet"), pa.table({"path": ["a"]}))
    with pytest.raises(ExtractError, match="not a finished feature extraction"):
        load_features(str(half))


def test_cli_extract_then_cluster(ray_session, synthetic_root, tmp_path):
    from typer.testing import CliRunner

    from slsr_ray.cli import app

    runner = CliRunner()
    feats, clusters = str(tmp_path / "features"), str(tmp_path / "clusters")
    res = runner.invoke(app, ["extract", "--dataset", "market1501", "--root", synthetic_root, "--random-init",
                              "--backbone", "resnet18", "--height", "64", "--width", "32", "--num-actors", "1", "--output", feats])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["cluster", "--features", feats, "--k", "2", "3", "--output", clusters,
                              "--n-init", "1"])
    assert res.exit_code == 0, res.output
    assert "silhouette %" in res.output
    sil = storage.read_json(os.path.join(clusters, "silhouette.json"))
    assert set(sil) == {"2", "3", "best_k"}
    res = runner.invoke(app, ["extract", "--manifest", "x.parquet", "--output", feats])
    assert res.exit_code != 0 and "--checkpoint or --random-init" in res.output
