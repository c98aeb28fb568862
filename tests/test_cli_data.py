"""``slsr data synth`` and ``slsr data summary`` through the real typer app."""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from slsr_ray.cli import app
from slsr_ray.data import load_dataset

runner = CliRunner()


def test_synth_then_summary(tmp_path):
    root = str(tmp_path / "synth")
    args = ["data", "synth", root, "--num-ids", "8", "--cams", "3", "--images-per-id", "4"]
    result = runner.invoke(app, [*args, "--height", "32", "--width", "16", "--seed", "5"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_train_ids"] == 4 and summary["size"] == [32, 16]
    assert len(os.listdir(os.path.join(root, "bounding_box_train"))) == 4 * 4

    result = runner.invoke(app, ["data", "summary", "--dataset", "market1501", "--root", root])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in result.stdout.splitlines()[2:]}
    expected = load_dataset("market1501", root).split_stats()
    assert rows == {r["split"]: [r["ids"], r["images"], r["cameras"]] for r in expected}
    assert rows["train"][:2] == [4, 16] and rows["query"][0] == 4  # the 4 test identities
    assert root in result.stdout.splitlines()[0]


def test_summary_wrong_layout_exits_2(tmp_path):
    (tmp_path / "stuff").mkdir()
    result = runner.invoke(app, ["data", "summary", "-d", "market1501", "-r", str(tmp_path)])
    assert result.exit_code == 2
    assert (
        "error:" in result.stderr and "bounding_box_train" in result.stderr and str(tmp_path) in result.stderr
    )


def test_summary_missing_root_and_unknown_dataset_exit_2(tmp_path):
    result = runner.invoke(app, ["data", "summary", "-d", "viper", "-r", str(tmp_path / "none")])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = runner.invoke(app, ["data", "summary", "-d", "imagenet", "-r", str(tmp_path)])
    assert result.exit_code == 2 and "unknown dataset" in result.stderr


def test_summary_of_a_folder_dataset(tmp_path):
    for split, pid, names in (
        ("train", "3", ["c1_a.jpg", "c2_b.jpg"]),
        ("query", "9", ["c1_q.jpg"]),
        ("gallery", "9", ["c2_g.jpg", "c1_h.jpg"]),
    ):
        folder = tmp_path / split / pid
        folder.mkdir(parents=True)
        for n in names:
            (folder / n).write_bytes(b"")
    result = runner.invoke(app, ["data", "summary", "-d", "folder", "-r", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[2].split() == ["train", "1", "2", "2"]
    assert lines[4].split() == ["gallery", "1", "2", "2"]


def test_manifest_upload_to_s3_then_prepare_reads_it(synthetic_root, s3_bucket, tmp_path):
    """`slsr data manifest --upload-images s3://...` is how a cluster job gets a dataset: the
    manifests point at the S3 copies and the prepare stage of a run reads them as they are."""
    from slsr_ray import storage
    from slsr_ray.data import read_image
    from slsr_ray.pipeline import load_config, stage_prepare

    out = f"{s3_bucket}/datasets/syn/manifests"
    res = runner.invoke(app, ["data", "manifest", "-d", "market1501", "-r", synthetic_root, "-o", out,
                              "--upload-images", f"{s3_bucket}/datasets/syn"])
    assert res.exit_code == 0, res.output
    train = storage.read_table(f"{out}/train.parquet")
    assert train.num_rows > 0 and all(p.startswith(f"{s3_bucket}/datasets/syn/") for p in train["path"].to_pylist())
    assert read_image(train["path"][0].as_py()).mode == "RGB"
    cfg = load_config("market1501", [f"data.manifests={out}"], run_root=str(tmp_path / "run"))
    uris = stage_prepare(cfg)
    assert storage.read_table(uris["train"])["path"].equals(train["path"])
    res = runner.invoke(app, ["data", "manifest", "-d", "market1501", "-r", str(tmp_path / "nope"), "-o", out])
    assert res.exit_code == 2 and "does not exist" in res.output
