"""The storage layer on a local folder and on a real S3 API (moto's server on loopback)."""

from __future__ import annotations

import os
import stat

import boto3
import numpy as np
import pyarrow as pa
import pytest

from slsr_ray import storage
from slsr_ray.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/runs/r1"


def sample_table(n=50):
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "path": [f"img/{i:04d}.jpg" for i in range(n)],
            "pid": pa.array(rng.integers(0, 10, n), pa.int64()),
            "feat": pa.array(list(rng.standard_normal((n, 4)).astype(np.float32)), pa.list_(pa.float32())),
        }
    )


def test_bytes_json_parquet_roundtrip(run_root):
    uri = storage.join(run_root, "a", "blob.bin")
    data = bytes(range(256)) * 10
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    assert storage.exists(uri)

    obj = {"k": 3, "lam": np.float32(0.5), "ids": np.arange(3), "name": "slsr"}
    storage.write_json(storage.join(run_root, "meta.json"), obj)
    assert storage.read_json(storage.join(run_root, "meta.json")) == {
        "k": 3,
        "lam": 0.5,
        "ids": [0, 1, 2],
        "name": "slsr",
    }

    table = sample_table()
    storage.write_table(storage.join(run_root, "manifest", "train.parquet"), table)
    back = storage.read_table(storage.join(run_root, "manifest", "train.parquet"))
    assert back.equals(table)
    assert storage.read_table(
        storage.join(run_root, "manifest", "train.parquet"), columns=["pid"]
    ).column_names == ["pid"]

    # overwrite replaces the content
    storage.write_bytes(uri, b"new")
    assert storage.read_bytes(uri) == b"new"


def test_listdir_exists_remove(run_root):
    for name in ("x.parquet", "y.parquet"):
        storage.write_table(storage.join(run_root, "features", name), sample_table(5))
    storage.write_text(storage.join(run_root, "notes.txt"), "hello")
    assert storage.listdir(run_root) == ["features", "notes.txt"]
    assert storage.listdir(storage.join(run_root, "features")) == ["x.parquet", "y.parquet"]
    assert storage.listdir(storage.join(run_root, "nothing-here")) == []
    # a folder of parquet shards reads as one table
    assert storage.read_table(storage.join(run_root, "features")).num_rows == 10

    assert storage.exists(storage.join(run_root, "features"))
    storage.remove(storage.join(run_root, "notes.txt"))
    assert not storage.exists(storage.join(run_root, "notes.txt"))
    storage.remove(storage.join(run_root, "features"))
    assert not storage.exists(storage.join(run_root, "features", "x.parquet"))
    assert storage.listdir(run_root) == []
    storage.remove(storage.join(run_root, "never-existed"))  # fine

    with pytest.raises(StorageError, match="missing.json does not exist"):
        storage.read_json(storage.join(run_root, "missing.json"))
    with pytest.raises(StorageError, match="missing.parquet does not exist"):
        storage.read_table(storage.join(run_root, "missing.parquet"))


def test_large_object_roundtrip_s3(s3_bucket):
    # bigger than pyarrow's multipart part size: the object only appears once complete
    data = np.random.default_rng(1).integers(0, 255, 12 * 1024 * 1024, dtype=np.uint8).tobytes()
    uri = f"{s3_bucket}/big/blob.bin"
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    local = storage.to_local(uri, cache_dir=None)
    with open(local, "rb") as f:
        assert f.read() == data


@pytest.fixture
def counted_s3(monkeypatch, caplog):
    """A moto server of this test's own (in this process, under xdist too) and the requests it served,
    read from werkzeug's request log: ``(bucket URI, function returning "METHOD /path" per request)``;
    ``caplog.clear()`` starts a new count."""
    import logging
    import re

    from cluster_helpers import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    caplog.set_level(logging.INFO, logger="werkzeug")
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="counted")

    def requests() -> list[str]:
        lines = (re.search(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+ /\S*) HTTP', r.getMessage())
                 for r in caplog.records if r.name == "werkzeug")
        return [found.group(1) for found in lines if found]

    yield "s3://counted", requests
    server.stop()


def test_a_big_object_is_read_in_one_get_and_a_small_one_written_in_one_put(counted_s3, caplog):
    """A checkpoint read used to take one ranged GET per ~130 KB (a 46 MB checkpoint: 351 requests;
    a 95 MB object: 22 s against moto); a small object took a three-request multipart upload."""
    bucket, requests = counted_s3
    data = np.random.default_rng(2).integers(0, 255, 8 * 1024 * 1024, dtype=np.uint8).tobytes()
    storage.write_bytes(f"{bucket}/ckpt/model.pt", data)
    caplog.clear()
    assert storage.read_bytes(f"{bucket}/ckpt/model.pt") == data
    gets = [r for r in requests() if r.startswith("GET ")]
    assert len(gets) == 1, requests()
    caplog.clear()
    storage.write_json(f"{bucket}/small/record.json", {"a": 1})
    assert [r.split(" ")[0] for r in requests()] == ["PUT"], requests()
    assert storage.read_json(f"{bucket}/small/record.json") == {"a": 1}


def test_s3_objects_visible_to_boto3(s3_bucket):
    storage.write_text(f"{s3_bucket}/p/q.txt", "visible")
    bucket = s3_bucket[len("s3://") :]
    body = boto3.client("s3").get_object(Bucket=bucket, Key="p/q.txt")["Body"].read()
    assert body == b"visible"


def test_local_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    folder = tmp_path / "run"
    target = str(folder / "manifest.parquet")
    storage.write_table(target, sample_table())
    storage.write_json(str(folder / "m.json"), {"a": 1})
    assert sorted(os.listdir(folder)) == ["m.json", "manifest.parquet"]
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode == 0o666 & ~storage._UMASK  # not mkstemp's 0600

    # an exception while writing leaves the old file and no temporary file behind
    with pytest.raises(TypeError):
        storage.write_bytes(target, "a str, not bytes")
    assert storage.read_table(target).equals(sample_table())
    with pytest.raises(TypeError, match="not JSON serialisable"):
        storage.write_json(str(folder / "m.json"), {"a": object()})
    assert storage.read_json(str(folder / "m.json")) == {"a": 1}
    assert sorted(os.listdir(folder)) == ["m.json", "manifest.parquet"]


def test_check_writable_local(tmp_path):
    storage.check_writable(str(tmp_path / "new" / "root"))
    assert os.listdir(tmp_path / "new" / "root") == []  # the probe is removed
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # tests run as root, so chmod cannot make a folder read-only: a path under a file can never be written
    with pytest.raises(StorageError, match=f"run root {blocker}/run is not writable"):
        storage.check_writable(str(blocker / "run"))
    with pytest.raises(StorageError, match="a-file/x.bin"):
        storage.write_bytes(str(blocker / "x.bin"), b"1")


def test_check_writable_s3(s3_bucket, moto_server):
    storage.check_writable(f"{s3_bucket}/runs/ok")
    assert storage.listdir(f"{s3_bucket}/runs/ok") == []
    with pytest.raises(StorageError, match="s3://no-such-bucket-xyz/run is not writable.*does not exist"):
        storage.check_writable("s3://no-such-bucket-xyz/run")


def test_no_credentials(tmp_path, monkeypatch, moto_server):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "credentials").write_text("")
    (tmp_path / "config").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-profile lookup off EC2
    with pytest.raises(StorageError, match="no AWS credentials"):
        storage.check_writable("s3://some-bucket/run")
    with pytest.raises(StorageError, match="no AWS credentials"):
        storage.read_table("s3://some-bucket/run/manifest/train.parquet")
    # local paths do not need credentials
    storage.write_bytes(str(tmp_path / "ok.bin"), b"1")


def test_unreachable_endpoint(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match="s3://bucket-x/blob"):
        storage.read_bytes("s3://bucket-x/blob")


def test_join():
    assert storage.join("s3://b/run/", "/manifest/", "train.parquet") == "s3://b/run/manifest/train.parquet"
    assert storage.join("/tmp/run", "a", "b.json") == "/tmp/run/a/b.json"
    assert storage.is_s3("s3://b") and not storage.is_s3("/s3:/b")
