"""Credentials stay home: what Ray serialises for other nodes (filesystems in Ray Data sinks, Ray Train
and Tune run configs) carries no AWS key, and each node builds its own S3 client from its own
environment: one without credentials gets a clear error naming the URI."""

from __future__ import annotations

import cloudpickle
import pytest

from slsr_ray import storage

SECRET = "SLSR-CREDENTIALS-MARKER-91f3c2"
KEY_ID = "SLSRKEYIDMARKER7741"


@pytest.fixture
def marked_credentials(monkeypatch, moto_server):
    """The driver's credentials, set to markers (moto accepts any key)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    storage._S3_CACHE.clear()
    yield
    storage._S3_CACHE.clear()


def _leaks(obj) -> list[str]:
    blob = cloudpickle.dumps(obj)
    return [m for m in (SECRET, KEY_ID) if m.encode() in blob]


def test_pickled_filesystems_and_run_configs_carry_no_keys(marked_credentials, s3_bucket):
    import ray.train
    import ray.tune
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink

    uri = f"{s3_bucket}/runs/r/pretrain"
    fs, path = storage.portable_filesystem(uri)
    storage.write_text(f"{uri}/probe.txt", "signed with the marker key")  # the filesystems do work
    with fs.open_input_stream(f"{path}/probe.txt") as f:
        assert f.read() == b"signed with the marker key"
    shipped = {
        "portable filesystem": fs,
        "the driver's own filesystem": storage.s3_filesystem(uri),
        "Ray Train RunConfig": ray.train.RunConfig(name="x", storage_path=path, storage_filesystem=fs),
        "Ray Tune RunConfig": ray.tune.RunConfig(name="x", storage_path=path, storage_filesystem=fs),
        "Ray Data parquet sink": ParquetDatasink(path, filesystem=fs),
    }
    assert {what: _leaks(obj) for what, obj in shipped.items()} == {what: [] for what in shipped}


def test_each_node_uses_its_own_credentials(s3_bucket, ray_session):
    """A task unpickles the filesystem with its own environment: with credentials it reads the object,
    without any it fails with an error that names the URI (not a silent anonymous request)."""
    import ray

    uri = f"{s3_bucket}/runs/r/train"
    storage.write_text(f"{uri}/probe.txt", "ok")
    fs, path = storage.portable_filesystem(uri)

    @ray.remote
    def read_probe(fs):
        with fs.open_input_stream(f"{path}/probe.txt") as f:
            return f.read()

    assert ray.get(read_probe.remote(fs)) == b"ok"
    no_credentials = {"env_vars": {
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
    }}
    with pytest.raises(Exception, match=rf"no AWS credentials found on .* to access {uri}"):
        ray.get(read_probe.options(runtime_env=no_credentials).remote(fs))
