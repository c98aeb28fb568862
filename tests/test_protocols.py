"""The pipeline runs the protocol its config names: Market multi-query through the evaluate stage, and
CUHK03 classic as trials (one whole pipeline per split, mean and std over them), on fake trees."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from test_datasets import CUHK_PAIRS, make_cuhk03_mat
from typer.testing import CliRunner

from slsr_ray import storage
from slsr_ray.cli import app
from slsr_ray.config import ConfigError
from slsr_ray.pipeline import load_config, stage_evaluate, stage_hashes, stage_prepare
from slsr_ray.stages import write_record
from slsr_ray.trials import check_trials, run_protocol, trial_config

runner = CliRunner()


def test_presets_name_their_protocol_and_trials():
    expected = {"market1501": ("single_query", 1), "dukemtmcreid": ("standard", 1), "msmt17": ("standard", 1),
                "cuhk03": ("classic", 20), "viper": ("ten_trials", 10), "synthetic": ("single_query", 1)}
    for name, (protocol, trials) in expected.items():
        cfg = load_config(name)
        assert (cfg.data.protocol, cfg.evaluate.trials) == (protocol, trials), name
    assert load_config("cuhk03").data.cuhk03_labeled is False  # the paper uses the detected boxes


def test_bad_protocol_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="protocol 'classic' is not defined for dataset 'viper'"):
        load_config("viper", ["data.protocol=classic"])
    with pytest.raises(ConfigError, match="split_id 1 is out of range for market1501 protocol single_query"):
        load_config("market1501", ["data.split_id=1"])
    with pytest.raises(ConfigError, match="evaluate.trials=11 but viper protocol ten_trials has 10 split"):
        check_trials(load_config("viper", ["evaluate.trials=11"]))
    with pytest.raises(ConfigError, match="evaluate.trials=2 but market1501 protocol single_query has 1"):
        check_trials(load_config("market1501", ["evaluate.trials=2"]))
    with pytest.raises(ConfigError, match=r"put \{split_id\} in data.manifests"):
        check_trials(load_config("cuhk03", ["data.manifests=s3://b/cuhk03"]))
    make_cuhk03_mat(tmp_path, [[[1, 1]], [[2, 1]]])  # a mat with 2 classic splits
    res = runner.invoke(app, ["run", "-c", "cuhk03", "-o", str(tmp_path / "run"), "--set", f"data.root={tmp_path}"])
    assert res.exit_code == 2 and "evaluate.trials=20 but the cuhk03 data" in res.output
    assert "defines 2 classic split(s)" in res.output and not os.path.exists(tmp_path / "run" / "split0")


def test_trial_config_is_the_single_split_run():
    """A trial is exactly `slsr run --set data.split_id=i --set evaluate.trials=1` under split<i>/."""
    cfg = load_config("cuhk03", ["data.root=/data/cuhk03"], run_root="/runs/c")
    trial = trial_config(cfg, 3)
    single = load_config("cuhk03", ["data.root=/data/cuhk03", "data.split_id=3", "evaluate.trials=1"],
                         run_root="/runs/c/split3")
    assert trial.run_root == "/runs/c/split3" and stage_hashes(trial) == stage_hashes(single)
    assert stage_hashes(trial)["prepare"] != stage_hashes(trial_config(cfg, 4))["prepare"]


def test_evaluate_stage_runs_market_multi_query(tmp_path, ray_session, tiny_overrides):
    """prepare writes the gt_bbox manifest; evaluate pools each query (id, camera) with its gt_bbox
    features and scores the pooled queries, plus single-query; recomputed here from the stored features."""
    from slsr_ray.evaluate import evaluate_features
    from slsr_ray.extract import load_features
    from slsr_ray.models import ModelConfig, build_model, save_checkpoint

    cfg = load_config("synthetic", [*tiny_overrides, "data.protocol=multi_query", "train.strategy=none",
                                    "baselines=[]", "extract.batch_size=256"], run_root=str(tmp_path / "run"))
    prepared = stage_prepare(cfg)
    query = storage.read_table(prepared["query"])
    extra = storage.read_table(prepared["multi_query"])
    assert extra.num_rows == 2 * query.num_rows  # make_synthetic: each query + 2 more boxes in gt_bbox/
    assert all("/gt_bbox/" in p for p in extra["path"].to_pylist())

    import torch

    model_cfg = ModelConfig(num_classes=8, backbone="resnet18")
    torch.manual_seed(0)
    ckpt = storage.join(cfg.run_root, "model.pt")
    save_checkpoint(ckpt, build_model(model_cfg), model_cfg)
    write_record(cfg.run_root, "train/none", "untrained", time.time(), {"checkpoint": ckpt})
    out = stage_evaluate(cfg, "none")

    assert set(out) == {"plain", "rerank", "single_query", "single_query_rerank"}
    saved = json.loads((tmp_path / "run" / "evaluate" / "none" / "plain.json").read_text())
    assert saved["protocol"] == "multi_query" and saved["num_trials"] == 1 and saved["split_id"] == 0

    table, feats = load_features(storage.join(cfg.run_root, "evaluate", "none", "features"))
    split = np.asarray(table["split"].to_pylist())
    pids, cams = table["pid"].to_numpy(), table["camid"].to_numpy()
    q, g, m = split == "query", split == "gallery", split == "multi_query"
    groups = sorted(set(zip(pids[q], cams[q], strict=True)))
    pooled = np.stack([feats[(q | m) & (pids == p) & (cams == c)].mean(0) for p, c in groups])
    assert all(((q | m) & (pids == p) & (cams == c)).sum() == 3 for p, c in groups)
    mq = evaluate_features(pooled, feats[g], [p for p, _ in groups], pids[g], [c for _, c in groups], cams[g])
    sq = evaluate_features(feats[q], feats[g], pids[q], pids[g], cams[q], cams[g])
    assert out["plain"]["num_valid_queries"] == mq["num_valid_queries"] == len(groups)
    np.testing.assert_allclose(out["plain"]["cmc"], mq["cmc"], atol=1e-6)
    assert out["plain"]["mAP"] == pytest.approx(mq["mAP"], abs=1e-6)
    np.testing.assert_allclose(out["single_query"]["cmc"], sq["cmc"], atol=1e-6)
    assert out["single_query"]["mAP"] == pytest.approx(sq["mAP"], abs=1e-6)

    # `slsr evaluate` rescores the stage's saved features (a folder of parquet shards) the same way
    rescored = tmp_path / "rescored.json"
    res = runner.invoke(app, ["evaluate", "-f", storage.join(cfg.run_root, "evaluate", "none", "features"),
                              "--protocol", "multi_query", "--out", str(rescored)])
    assert res.exit_code == 0, res.output
    again = json.loads(rescored.read_text())["results"]["multi-query (mean)"]
    np.testing.assert_allclose(again["cmc"], out["plain"]["cmc"], atol=1e-6)


@pytest.mark.slow
def test_cuhk03_classic_runs_as_trials_with_mean_and_std(tmp_path, ray_session, tiny_overrides):
    """evaluate.trials=2 on a fake cuhk-03.mat: two whole pipelines, each trained without its split's
    test ids and scored single-shot on them; trials/results.json holds their mean and std."""
    testsets = [[[1, 2], [3, 1]], [[2, 2], [5, 1]]]
    make_cuhk03_mat(tmp_path / "data", testsets)
    cfg = load_config("synthetic", [*tiny_overrides, "data.dataset=cuhk03", f"data.root={tmp_path / 'data'}",
                                    "data.protocol=classic", "evaluate.trials=2", "train.strategy=none",
                                    "baselines=[]", "cluster.ks=[2]", "evaluate.k1=4", "evaluate.k2=2"],
                      run_root=str(tmp_path / "run"))
    summary = run_protocol(cfg, echo=lambda *_: None)
    assert summary["protocol"] == "classic" and summary["num_trials"] == 2 and summary["splits"] == [0, 1]

    offset = [0, 3, 5, 7, 9]
    per_split = []
    for i, pairs in enumerate(testsets):
        root = tmp_path / "run" / f"split{i}"
        train = storage.read_table(str(root / "prepare" / "train.parquet"))
        query = storage.read_table(str(root / "prepare" / "query.parquet"))
        assert sorted(set(query["pid"].to_pylist())) == sorted(offset[c - 1] + p for c, p in pairs)
        train_pairs = {os.path.basename(p)[:5] for p in train["path"].to_pylist()}
        assert not train_pairs & {f"{c}_{p:03d}" for c, p in pairs}
        assert len(set(train["pid"].to_pylist())) == sum(CUHK_PAIRS) - 2
        plain = json.loads((root / "evaluate" / "none" / "plain.json").read_text())
        assert (plain["protocol"], plain["split_id"], plain["num_trials"]) == ("classic", i, 1)
        assert plain["num_valid_queries"] == query.num_rows  # every test image has a match in the other view
        per_split.append(plain)

    results = json.loads((tmp_path / "run" / "trials" / "results.json").read_text())
    assert (results["protocol"], results["num_trials"], results["dataset"]) == ("classic", 2, "cuhk03")
    agg = results["strategies"]["none"]["plain"]
    for key in ("rank1", "mAP", "mINP"):
        values = [p[key] for p in per_split]
        assert agg[key] == pytest.approx(np.mean(values)) and agg["std"][key] == pytest.approx(np.std(values))
    assert [t["split_id"] for t in agg["trials"]] == [0, 1] and agg["num_trials"] == 2
    assert set(results["strategies"]["none"]) == {"plain", "rerank"}
    assert "±" in (tmp_path / "run" / "trials" / "results.md").read_text()
