"""Pipeline config handling, the stages a run has, and bad input (end-to-end runs: conftest.py's shared
tiny run, test_console.py, test_multinode.py)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from slsr_ray import storage
from slsr_ray.cli import app
from slsr_ray.config import ConfigError
from slsr_ray.data import DatasetError
from slsr_ray.pipeline import PRESETS, check_run_root, load_config, stage_hashes, stage_prepare

runner = CliRunner()


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_with_paper_settings(name):
    cfg = load_config(name)
    assert cfg.train.strategy == "slsr" and cfg.train.lam == 1.0
    if name == "scale":  # the scaling benchmark's preset: one training, one evaluation, 1 epoch per stage
        assert cfg.baselines == [] and cfg.pretrain.epochs == cfg.train.epochs == 1
        return
    assert "none" in cfg.baselines
    if name != "synthetic":  # the paper's hyperparameters (section 5.2)
        assert (cfg.train.epochs, cfg.train.lr, cfg.train.lr_policy, cfg.train.batch_size) == (130, 0.01, "inv", 32)
        assert (cfg.train.gamma, cfg.train.power, cfg.train.momentum, cfg.train.weight_decay) == (0.1, 0.025, 0.9, 5e-4)
        assert (cfg.pretrain.epochs, cfg.pretrain.lr) == (40, 0.001)
        assert (cfg.gan.epochs, cfg.gan.lr, cfg.gan.beta1, cfg.gan.image_size) == (30, 2e-4, 0.5, 128)
        assert cfg.train.model.backbone == "resnet50"
        # the paper fixes K=3 for every dataset (after the Table-2 silhouette study) and partitions ids
        assert cfg.cluster.ks == [2, 3, 4, 5] and cfg.cluster.k == 3 and cfg.cluster.rule == "majority"
        # generated images: 12,000 on Market (Table 4); elsewhere about the number of real train images
        want = {"market1501": 12000, "dukemtmcreid": 16500, "cuhk03": 13000, "msmt17": 30000, "viper": 632}
        assert cfg.generate.count == want[name]


def test_one_pretrained_setting_feeds_the_clustering_and_the_final_model(tmp_path):
    weights = tmp_path / "resnet50.pth"
    cfg = load_config("market1501", [f"pretrained={weights}"])
    # step 1's model (whose features are clustered) starts from the same ImageNet weights as step 6's
    assert cfg.pretrain.model.pretrained == cfg.train.model.pretrained == str(weights)
    # an explicit per-section value wins
    cfg = load_config("market1501", [f"pretrained={weights}", "train.model.pretrained=/other.pth"])
    assert cfg.pretrain.model.pretrained == str(weights) and cfg.train.model.pretrained == "/other.pth"
    assert load_config("market1501").pretrain.model.pretrained is None


def test_paper_input_pipeline_option():
    cfg = load_config("market1501", ["input_pipeline=paper"])
    for section in (cfg.pretrain, cfg.train):
        assert (section.height, section.width, section.crop, section.model.input_norm) == (224, 224, "resize", "symmetric")
    assert (cfg.extract.height, cfg.extract.width) == (224, 224)
    assert load_config("market1501").train.model.input_norm == "imagenet"
    with pytest.raises(ConfigError, match="input_pipeline"):
        load_config("market1501", ["input_pipeline=fancy"])


def test_unknown_key_and_wrong_type_name_the_key():
    with pytest.raises(ConfigError, match="epochz"):
        load_config("synthetic", ["train.epochz=3"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config("synthetic", ["train.epochs=many"])
    with pytest.raises(ConfigError, match="unknown key.*colour"):
        load_config("synthetic", ["colour=red"])
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("no-such-preset")


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    res = runner.invoke(app, ["run", "--run-root", str(tmp_path), "--set", "cluster.kk=3"])
    assert res.exit_code == 2
    assert "kk" in res.output


def test_yaml_file_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ntrain: {epochs: 3, strategy: lsro}\nbaselines: [none, slsr]\n")
    cfg = load_config(str(path), run_root=str(tmp_path / "run"))
    assert cfg.name == "mine" and cfg.train.epochs == 3 and cfg.strategies == ["lsro", "none", "slsr"]
    assert cfg.run_root == str(tmp_path / "run")


@pytest.mark.parametrize("change", ["gan.epochs=3", "gan.lr=0.001", "gan.seed=3"])
def test_hashes_chain_downstream_only(change):
    base = load_config("synthetic")
    changed = load_config("synthetic", [change])
    a, b = stage_hashes(base), stage_hashes(changed)
    for stage in ("prepare", "pretrain", "extract", "cluster", "train/none", "evaluate/none"):
        assert a[stage] == b[stage], stage  # the real-only baseline does not depend on the GANs
    for stage in ("gan", "generate", "train/slsr", "evaluate/slsr"):
        assert a[stage] != b[stage], stage


@pytest.mark.parametrize(("overrides", "stages"), [
    ([], ["prepare", "pretrain", "extract", "cluster", "gan", "generate", "train/slsr", "train/none",
          "evaluate/slsr", "evaluate/none"]),
    (["train.strategy=none", "baselines=[lsr]"], ["prepare", "pretrain", "train/none", "train/lsr", "evaluate/none",
                                                   "evaluate/lsr"]),
    (["train.strategy=none", "baselines=[]", "train_init=imagenet"], ["prepare", "train/none", "evaluate/none"]),
])
def test_a_run_has_only_the_stages_its_strategies_need(overrides, stages):
    """Clusters only feed the GANs, and the step-1 model only embeds what is clustered and starts a
    `train_init: pretrain` training: real-image strategies alone skip what they do not use."""
    from slsr_ray.commands.pipeline import stage_plan
    from slsr_ray.pipeline import plan

    cfg = load_config("synthetic", overrides, run_root="/nonexistent/run")
    assert [key for key, _ in plan(cfg)] == stages
    # --until a stage this run has no use for stops before the next stage it has (no training here)
    assert [key for key, _ in plan(cfg, until="gan")] == [s for s in stages if s.split("/")[0] in
                                                           ("prepare", "pretrain", "extract", "cluster", "gan")]
    # --from such a stage forces every later stage the run has
    rows = {r["stage"]: r for r in stage_plan(cfg, from_stage="cluster", until="train")}
    assert {s for s, r in rows.items() if "forced" in r["why"]} == {
        s for s in stages if s.split("/")[0] in ("cluster", "gan", "generate", "train")}
    assert {s for s, r in rows.items() if r["action"] == "-"} == {s for s in stages if s.startswith("evaluate/")}


@pytest.mark.parametrize(("change", "retrained"), [
    ("train.lr=0.02", ("slsr", "none")), ("train.epochs=2", ("slsr", "none")), ("train.lam=0.5", ("slsr",)),
])
def test_train_settings_reach_both_trainings_only(change, retrained):
    """A training setting retrains (and re-evaluates) the strategies it applies to, nothing upstream:
    lambda weighs the generated images only, which the real-only baseline has none of."""
    a, b = stage_hashes(load_config("synthetic")), stage_hashes(load_config("synthetic", [change]))
    for stage in ("prepare", "pretrain", "extract", "cluster", "gan", "generate"):
        assert a[stage] == b[stage], stage
    for s in ("slsr", "none"):
        for stage in (f"train/{s}", f"evaluate/{s}"):
            assert (a[stage] != b[stage]) == (s in retrained), stage


def test_run_root_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(storage.StorageError, match="not writable"):
        check_run_root(str(blocker / "run"))


def test_local_run_root_rejected_for_multi_node_job(tmp_path, monkeypatch, ray_session):
    """A job on a multi-node cluster cannot use a local run root: the other nodes cannot read it."""
    import ray

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    with pytest.raises(ConfigError, match="local path.*2-node.*s3://"):
        check_run_root(str(tmp_path / "run"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    check_run_root(str(tmp_path / "run"))  # single node: fine


def test_wrong_dataset_layout_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = load_config("market1501", [f"data.root={tmp_path / 'empty'}"], run_root=str(tmp_path / "run"))
    with pytest.raises(DatasetError, match="bounding_box_train"):
        stage_prepare(cfg)
    cfg = load_config("market1501", run_root=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="data.root is required"):
        stage_prepare(cfg)
    assert not os.path.exists(tmp_path / "run" / "prepare" / "train.parquet")


def test_status_of_an_empty_run_root(tmp_path):
    res = runner.invoke(app, ["status", str(tmp_path)])
    assert res.exit_code == 0
    assert "pending" in res.output and "prepare" in res.output


def test_relative_paths_become_absolute(tmp_path, monkeypatch, synthetic_root):
    """Ray workers run in another working directory: a relative run root or dataset root must not
    end up in manifests (the README's `make demo` uses runs/demo)."""
    from slsr_ray.data import load_dataset

    monkeypatch.chdir(tmp_path)
    cfg = load_config("synthetic", ["data.root=data/x"], run_root="runs/demo")
    assert cfg.run_root == str(tmp_path / "runs" / "demo")
    assert cfg.data.root == str(tmp_path / "data" / "x")
    assert load_config("synthetic", run_root="s3://bucket/run").run_root == "s3://bucket/run"
    monkeypatch.chdir(os.path.dirname(synthetic_root))
    ds = load_dataset("market1501", os.path.basename(synthetic_root))
    assert all(os.path.isabs(p) for p in ds.train["path"].to_pylist())
