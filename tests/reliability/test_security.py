"""Security basics: no code execution from artifacts (``torch.load(weights_only=True)``, no pickle),
no credentials in logs or artifacts, no hard-coded keys, manifest paths confined to the dataset root."""

from __future__ import annotations

import ast
import logging
import os
import re
from pathlib import Path

import boto3
import pytest
import torch

from slsr_ray import storage
from slsr_ray.data import DatasetError
from slsr_ray.data.base import resolve_under
from slsr_ray.gan import GanCheckpointError
from slsr_ray.gan import load_checkpoint as load_gan_checkpoint
from slsr_ray.models import load_model
from slsr_ray.models.reid import WeightsError
from slsr_ray.pipeline import load_config, run_pipeline

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CODE = [REPO / "slsr_ray", REPO / "jobs"]  # what runs on a cluster and reads artifacts
SECRET_MARKER = "SLSR-TEST-SECRET-2d9e71"

# module -> functions that deserialise arbitrary objects (code execution from a crafted file)
UNSAFE_LOADERS = {
    "pickle": {"load", "loads", "Unpickler"},
    "cPickle": {"load", "loads", "Unpickler"},
    "_pickle": {"load", "loads", "Unpickler"},
    "cloudpickle": {"load", "loads"},
    "dill": {"load", "loads"},
    "joblib": {"load"},
    "shelve": {"open"},
    "marshal": {"load", "loads"},
    "yaml": {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"},
    "pd": {"read_pickle"},
    "pandas": {"read_pickle"},
}


def _python_files() -> list[Path]:
    files = [p for root in SHIPPED_CODE for p in sorted(root.rglob("*.py"))]
    assert len(files) > 20
    return files


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, node.func.value.id, node.func.attr


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<not a literal>"
    return None


def test_every_torch_load_passes_weights_only_true():
    found, bad = 0, []
    for path in _python_files():
        for node, mod, attr in _calls(path):
            if mod == "torch" and attr == "load":
                found += 1
                if _kw(node, "weights_only") is not True:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
        text = path.read_text()
        assert not re.search(r"from torch import [^\n]*\bload\b", text), f"{path}: import torch.load by name"
    assert found >= 4, "the scan found no torch.load calls: is it looking at the right files?"
    assert bad == [], f"torch.load without weights_only=True: {bad}"


def test_no_pickle_or_unsafe_deserialisation_of_artifacts():
    bad = []
    for path in _python_files():
        for node, mod, attr in _calls(path):
            if attr in UNSAFE_LOADERS.get(mod, ()):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno} {mod}.{attr}")
            if mod in ("np", "numpy") and attr == "load" and _kw(node, "allow_pickle") not in (None, False):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno} np.load(allow_pickle=...)")
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                    for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
        bad += [f"{path.relative_to(REPO)}: imports {m}" for m in imported & {"pickle", "cPickle", "dill", "shelve"}]
    assert bad == [], bad


class _Payload:
    """Unpickling this object would create ``flag`` (a stand-in for running an attacker's code)."""

    def __init__(self, flag: str):
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_crafted_checkpoints_do_not_run_code(tmp_path):
    flag = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(str(flag)), "config": {}, "format": 1, "arch": {}}, str(evil))
    with pytest.raises(WeightsError, match=r"evil\.pt: cannot be loaded with weights_only=True"):
        load_model(str(evil))
    with pytest.raises(GanCheckpointError, match=r"evil\.pt is not a readable DCGAN checkpoint"):
        load_gan_checkpoint(str(evil))
    assert not flag.exists()


def test_s3_stage_keeps_credentials_out_of_logs_and_artifacts(
    monkeypatch, s3_bucket, tiny_overrides, caplog, capsys
):
    """A real stage on an s3:// run root, signed with a marker secret (moto accepts any key): the marker
    appears in no log record, no printed line, no error message and no object the run wrote."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_MARKER)
    caplog.set_level(logging.DEBUG)
    run_root = f"{s3_bucket}/runs/secret"
    cfg = load_config("synthetic", tiny_overrides, run_root=run_root)
    run_pipeline(cfg, until="prepare", echo=print)
    with pytest.raises(storage.StorageError) as err:  # an error path prints what S3 said
        storage.read_table(f"{s3_bucket}-missing/runs/x.parquet")
    printed = capsys.readouterr()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "[slsr] prepare" in printed.out and storage.exists(f"{run_root}/prepare/_STAGE.json")
    for text in (printed.out, printed.err, logs, str(err.value), repr(storage.s3_filesystem())):
        assert SECRET_MARKER not in text
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket[5:])
            for o in page.get("Contents", [])]
    assert len(keys) > 20 and "runs/secret/config.json" in keys
    leaked = [k for k in keys if SECRET_MARKER.encode() in s3.get_object(Bucket=s3_bucket[5:], Key=k)["Body"].read()]
    assert leaked == []


AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_ASSIGNMENT = re.compile(r"(aws_secret_access_key|AWS_SECRET_ACCESS_KEY)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}\b")


def test_no_hard_coded_cloud_credentials_in_shipped_files():
    roots = [*SHIPPED_CODE, REPO / "cluster_configs", REPO / "notebooks"]
    files = [p for r in roots for p in r.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".json", ".ipynb", ".md", ".sh")]
    files += [p for p in (REPO / "README.md", REPO / "pyproject.toml", REPO / "Makefile") if p.exists()]
    assert len(files) > 20
    bad = [str(p.relative_to(REPO)) for p in files
           if AWS_KEY_ID.search(p.read_text(errors="ignore")) or SECRET_ASSIGNMENT.search(p.read_text(errors="ignore"))]
    assert bad == [], f"files with what looks like an AWS key: {bad}"


@pytest.mark.parametrize(
    "attack",
    ["../../etc/passwd", "imgs/../../../etc/shadow", "/etc/passwd", "../ds-evil/a.jpg", "imgs/../../ds/../x.jpg"],
)
def test_manifest_paths_cannot_escape_the_dataset_root(attack, tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    with pytest.raises(DatasetError, match="points outside the dataset root"):
        resolve_under(str(root), attack, "train.csv:2")


def test_manifest_paths_inside_the_root_resolve_there(tmp_path):
    root = str(tmp_path / "ds")
    assert resolve_under(root, "imgs/a.jpg", "x") == os.path.join(root, "imgs", "a.jpg")
    assert resolve_under(root, "./imgs/../b.jpg", "x") == os.path.join(root, "b.jpg")
    assert resolve_under(root, "..ds/a.jpg", "x") == os.path.join(root, "..ds", "a.jpg")  # a name, not a climb
