"""The bad-input corpus: every bad input gets a clear error naming it (or a documented skip), and a
failure never leaves a half-written artifact behind.

Decisions recorded here:

* **Duplicate paths** in one split of a manifest are an error (``DatasetError`` listing the paths),
  not a silent dedup: a duplicated row counts an image twice in training, k-means and evaluation and
  is almost always a manifest-building mistake. The same image in two different splits is allowed.
* **Manifest paths** relative to a dataset root must stay inside it (``../../etc/passwd`` is an error
  naming the file and line); absolute paths and ``s3://`` URIs stay allowed, as ``load_folder``
  documents (the manifest's author states the location explicitly).
* **Images**: greyscale, palette, RGBA, LA, CMYK, 1-bit, 16-bit and float images are converted to
  8-bit RGB (16-bit/float *scaled*, not clipped); corrupt, truncated, empty and decompression-bomb
  files raise ``ImageReadError`` naming the file; a 24-Mpixel photo decodes normally.
* **S3 throttling** is simulated by a loopback endpoint answering every request with 503 SlowDown
  (moto cannot throttle): pyarrow retries, then a ``StorageError`` says the requests were throttled.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from slsr_ray import storage
from slsr_ray.config import ConfigError
from slsr_ray.data import DatasetError, ImageReadError, load_dataset, read_image, read_image_array
from slsr_ray.extract import ExtractConfig, extract_features, is_complete, load_features
from slsr_ray.models import ModelConfig
from slsr_ray.pipeline import load_config, run_pipeline, stage_prepare
from slsr_ray.stages import read_record

from . import corpus

# name -> (file bytes, None when the file must decode to RGB, else a regex the error must match)
IMAGE_CORPUS = {
    "truncated.jpg": (corpus.truncated_jpeg(), r"truncated"),
    "zero_bytes.jpg": (b"", r"empty file \(0 bytes\)"),
    "text_named_jpg.jpg": (b"name,pid\nnot an image\n", r"not a decodable image"),
    "bomb.png": (corpus.decompression_bomb_png(), r"decompression bomb"),
    "grey_L.jpg": (corpus.image_bytes("L"), None),
    "palette_P.png": (corpus.image_bytes("P", fmt="PNG"), None),
    "rgba.png": (corpus.image_bytes("RGBA", fmt="PNG"), None),
    "grey_alpha_LA.png": (corpus.image_bytes("LA", fmt="PNG"), None),
    "cmyk.jpg": (corpus.image_bytes("CMYK"), None),
    "one_bit.png": (corpus.image_bytes("1", fmt="PNG"), None),
    "grey_16bit.png": (corpus.gradient_16bit_png(), None),
    "float.tiff": (corpus.float_tiff(), None),
}


def no_temp_files(folder) -> list[str]:
    return glob.glob(os.path.join(str(folder), "**", ".tmp-*"), recursive=True)


# ------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("name", sorted(IMAGE_CORPUS))
def test_image_corpus_decodes_to_rgb_or_names_the_file(name, tmp_path):
    data, error = IMAGE_CORPUS[name]
    path = corpus.write(tmp_path / name, data)
    if error is not None:
        with pytest.raises(ImageReadError, match=error) as err:
            read_image(path)
        assert path in str(err.value)  # the message names the bad file
        return
    arr = read_image_array(path, size=(64, 32))
    assert arr.shape == (64, 32, 3) and arr.dtype == np.uint8
    if name in ("grey_16bit.png", "float.tiff"):
        # a full-range ramp must stay a ramp: clipping to 255 would make it almost all white
        assert arr.min() <= 5 and arr.max() >= 250 and 110 < arr.mean() < 145


def test_huge_image_decodes_and_resizes(tmp_path):
    path = corpus.write(tmp_path / "huge_6000x4000.jpg", corpus.huge_jpeg())
    assert read_image(path).size == (6000, 4000)
    arr = read_image_array(path, size=(64, 32))
    assert arr.shape == (64, 32, 3) and np.abs(arr.astype(int) - (90, 140, 60)).max() <= 4


def test_missing_image_is_named(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(str(tmp_path / "gone.jpg"))


BAD_TRAIN_FILES = {
    "0002_c1s1_000010_00.jpg": corpus.truncated_jpeg(),
    "0002_c2s1_000011_00.jpg": b"",
    "0004_c1s1_000012_00.png": corpus.decompression_bomb_png(),  # id 4's only image
}
ODD_BUT_VALID = {
    "0001_c1s1_000020_00.png": corpus.gradient_16bit_png(),
    "0002_c1s1_000021_00.png": corpus.image_bytes("P", fmt="PNG"),
    "0001_c2s1_000022_00.jpg": corpus.huge_jpeg(),
}


def test_dataset_check_raises_listing_bad_files_or_skips_them(tmp_path):
    root = corpus.market_tree(tmp_path / "market", {**BAD_TRAIN_FILES, **ODD_BUT_VALID})
    with pytest.raises(DatasetError, match=r"3 of 10 images cannot be read") as err:
        load_dataset("market1501", root, on_bad_images="raise")
    for name in BAD_TRAIN_FILES:
        assert name in str(err.value)
    with pytest.warns(UserWarning, match="skipping 3 of 10 unreadable images"):
        ds = load_dataset("market1501", root, on_bad_images="skip")
    names = [os.path.basename(p) for p in ds.train["path"].to_pylist()]
    assert not set(BAD_TRAIN_FILES) & set(names) and set(ODD_BUT_VALID) <= set(names)
    # identity 4 lost its only image: the train ids are still 0..N-1 without a hole
    assert sorted(set(ds.train["pid"].to_pylist())) == [0, 1] and ds.extra["bad_train_images"] == 3


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("person.jpg", r"cannot parse file name .*person\.jpg.*expected '<pid>_c<camera>"),
        ("0001_x1s1_000001_00.jpg", r"cannot parse file name .*0001_x1s1"),
        ("0001_c7s1_000001_00.jpg", r"camera 7 out of range 1\.\.6 .*0001_c7s1"),
    ],
)
def test_wrong_file_names_are_named(name, error, tmp_path):
    root = corpus.market_tree(tmp_path / "market", {name: corpus.image_bytes()})
    with pytest.raises(DatasetError, match=error):
        load_dataset("market1501", root)


def test_non_image_files_are_ignored_by_extension(tmp_path):
    """Documented: only .jpg/.jpeg/.png/.bmp files are dataset images (Thumbs.db, README, .txt are not)."""
    root = corpus.market_tree(tmp_path / "market", {"Thumbs.db": b"\0" * 10, "notes.txt": b"hello"})
    assert load_dataset("market1501", root).train.num_rows == 4


def test_folder_layout_wrong_names(tmp_path):
    corpus.write(tmp_path / "a" / "train" / "bob" / "c1_x.jpg", corpus.image_bytes())
    with pytest.raises(DatasetError, match=r"bob: identity folders must be named by an integer pid"):
        load_dataset("folder", tmp_path / "a")
    corpus.write(tmp_path / "b" / "train" / "0001" / "front.jpg", corpus.image_bytes())
    with pytest.raises(DatasetError, match=r"cannot parse file name .*front\.jpg"):
        load_dataset("folder", tmp_path / "b")


# ------------------------------------------------------------------------------------------ manifests


def test_duplicate_paths_in_a_csv_manifest_are_an_error(tmp_path):
    root = corpus.folder_csv_dataset(tmp_path / "ds", ["imgs/a.jpg,1,0", "imgs/b.jpg,2,1", "imgs/a.jpg,1,0"])
    with pytest.raises(DatasetError, match=r"train split: 1 image path\(s\) listed more than once: .*a\.jpg' x2"):
        load_dataset("folder", root)
    # the same file spelled two ways is still the same file
    root = corpus.folder_csv_dataset(tmp_path / "ds2", ["imgs/a.jpg,1,0", "imgs/../imgs/a.jpg,1,1", "imgs/b.jpg,2,1"])
    with pytest.raises(DatasetError, match="listed more than once"):
        load_dataset("folder", root)
    # one image in two splits is fine (e.g. a query that also sits in a user's gallery list)
    root = corpus.folder_csv_dataset(tmp_path / "ds3", ["imgs/a.jpg,1,0", "imgs/b.jpg,2,1"],
                                     gallery_rows=["imgs/c.jpg,7,1", "imgs/d.jpg,7,1"])
    assert load_dataset("folder", root).gallery.num_rows == 2


def test_duplicate_paths_in_pipeline_manifests_are_an_error(synthetic_dataset, tmp_path):
    """``data.manifests`` (premade parquet manifests): duplicates stop the prepare stage before it writes."""
    man = tmp_path / "manifests"
    train = synthetic_dataset.train
    storage.write_table(str(man / "train.parquet"), pa.concat_tables([train, train.slice(3, 2)]))
    storage.write_table(str(man / "query.parquet"), synthetic_dataset.query)
    storage.write_table(str(man / "gallery.parquet"), synthetic_dataset.gallery)
    cfg = load_config("synthetic", [f"data.manifests={man}"], run_root=str(tmp_path / "run"))
    with pytest.raises(DatasetError, match=r"train manifest of dataset .*manifests: 2 image path\(s\) listed more"):
        stage_prepare(cfg)
    assert not os.path.exists(tmp_path / "run" / "prepare")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "imgs/../../outside.jpg", "../ds-sibling/a.jpg"])
def test_csv_paths_cannot_escape_the_dataset_root(bad, tmp_path):
    root = corpus.folder_csv_dataset(tmp_path / "ds", ["imgs/a.jpg,1,0", f"{bad},2,1"])
    with pytest.raises(DatasetError, match=r"train\.csv:3: path .* points outside the dataset root"):
        load_dataset("folder", root)


def test_csv_relative_paths_inside_the_root_are_normalised(tmp_path):
    root = corpus.folder_csv_dataset(tmp_path / "ds", ["imgs/a.jpg,1,0", "./imgs/sub/../b.jpg,2,1"])
    paths = load_dataset("folder", root).train["path"].to_pylist()
    assert paths == [os.path.join(root, "imgs", "a.jpg"), os.path.join(root, "imgs", "b.jpg")]


def test_msmt_list_paths_cannot_escape_the_image_folder(tmp_path):
    top = tmp_path / "MSMT17_V1"
    corpus.write(top / "train" / "0000" / "0000_000_01_0303morning_0015_0.jpg", corpus.image_bytes())
    (top / "test").mkdir()
    (top / "list_train.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n../../0000_000_01_x_0.jpg 1\n")
    for name in ("list_val.txt", "list_query.txt", "list_gallery.txt"):
        (top / name).write_text("")
    with pytest.raises(DatasetError, match=r"list_train\.txt:2: path .* points outside the dataset root"):
        load_dataset("msmt17", tmp_path)


# ------------------------------------------------------------------------------------------ S3


def test_s3_missing_bucket_is_named(moto_server):
    uri = "s3://slsr-no-such-bucket-7f3a/run/prepare/train.parquet"
    with pytest.raises(storage.StorageError, match="slsr-no-such-bucket-7f3a") as err:
        storage.read_table(uri)
    assert "does not exist" in str(err.value)
    with pytest.raises(storage.StorageError, match=r"run root s3://slsr-no-such-bucket-7f3a/run is not writable"):
        storage.check_writable("s3://slsr-no-such-bucket-7f3a/run")
    with pytest.raises(storage.StorageError, match="slsr-no-such-bucket-7f3a/cfg.yaml"):
        load_config("s3://slsr-no-such-bucket-7f3a/cfg.yaml")


def test_s3_without_credentials_fails_up_front(tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(storage.StorageError, match="no AWS credentials found"):
        storage.check_writable("s3://any-bucket/run")
    with pytest.raises(storage.StorageError, match="no AWS credentials found"):
        storage.read_bytes("s3://any-bucket/run/config.json")
    cfg = load_config("synthetic", run_root="s3://any-bucket/run")
    with pytest.raises(storage.StorageError, match="no AWS credentials found"):
        run_pipeline(cfg, echo=lambda *_: None)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_endpoint_is_named(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(storage.StorageError, match=r"S3 endpoint unreachable while accessing s3://b/run/config\.json"):
        storage.read_bytes("s3://b/run/config.json")
    with pytest.raises(storage.StorageError, match=r"run root s3://b/run is not writable: S3 endpoint unreachable"):
        storage.check_writable("s3://b/run")


class _SlowDown(BaseHTTPRequestHandler):
    """An S3 endpoint that throttles every request (HTTP 503, code SlowDown) and counts them."""

    hits: list[str] = []
    BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message><RequestId>1</RequestId></Error>")

    def _throttle(self):
        self.hits.append(f"{self.command} {self.path}")
        if int(self.headers.get("Content-Length") or 0):
            self.rfile.read(int(self.headers["Content-Length"]))
        body = b"" if self.command == "HEAD" else self.BODY
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _throttle

    def log_message(self, *args):
        pass


def test_s3_throttling_is_retried_then_named(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowDown)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        for action in (lambda: storage.write_json("s3://b/run/x.json", {"a": 1}),
                       lambda: storage.read_bytes("s3://b/run/x.json")):
            _SlowDown.hits.clear()
            with pytest.raises(storage.StorageError, match=r"S3 throttled the requests for s3://b/run/x\.json"):
                action()
            assert len(_SlowDown.hits) >= 2, _SlowDown.hits  # retried before giving up
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lr=fast", r"train\.lr: expected a number, got 'fast'"),
        ("cluster.ks=3", r"cluster\.ks: expected a list, got 3"),
        ("cluster.ks=[2, x]", r"cluster\.ks\[1\]: expected an integer, got 'x'"),
        ("data.check_images=maybe", r"data\.check_images: expected true/false, got 'maybe'"),
        ("gan.epochs=1.5", r"gan\.epochs: expected an integer, got 1\.5"),
        ("pretrain.batch_size=true", r"pretrain\.batch_size: expected an integer, got True"),
        ("evaluate.rerank=1", r"evaluate\.rerank: expected true/false, got 1"),
        ("generate.count=null", r"generate\.count: expected an integer, got None"),
        ("data=5", r"data: expected a mapping for DataSection, got 5"),
        ("baselines=slsr", r"baselines: expected a list, got 'slsr'"),
        ("data.synthetic.num_ids=[1]", r"data\.synthetic\.num_ids: expected an integer"),
        ("extract.batch_size=0", r"extract.*batch_size must be a positive integer, got 0"),
        ("train_init=scratch", r"train_init must be 'imagenet' or 'pretrain', got 'scratch'"),
        ("train.epochs", r"override 'train\.epochs' must look like section\.key=value"),
        ("data.root.x=1", r"data\.root: expected str or NoneType, got \{'x': 1\}"),
        ("data.synthetic.seed.x=1", r"override 'data\.synthetic\.seed\.x=1': seed is not a section"),
    ],
)
def test_wrong_config_types_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config("synthetic", [override])


@pytest.mark.parametrize(
    ("text", "named"),
    [("train: {epochs: [1, 2\n", r"not valid YAML"), ("- a\n- b\n", r"expected a mapping at the top level")],
)
def test_broken_yaml_config_files(text, named, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named) as err:
        load_config(str(path))
    assert "bad.yaml" in str(err.value)


# ------------------------------------------------------------------------------------------ atomic writes


def test_failed_serialisation_keeps_the_previous_file(tmp_path):
    uri = str(tmp_path / "stage" / "summary.json")
    storage.write_json(uri, {"version": 1})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        storage.write_json(uri, {"version": 2, "bad": object()})
    table_uri = str(tmp_path / "stage" / "table.parquet")
    storage.write_table(table_uri, pa.table({"x": [1, 2, 3]}))
    with pytest.raises(Exception):  # noqa: B017 - pyarrow's own error; the point is what stays on disk
        storage.write_table(table_uri, pa.table({"x": pa.array([object()], pa.null())}))
    assert storage.read_json(uri) == {"version": 1}
    assert storage.read_table(table_uri)["x"].to_pylist() == [1, 2, 3]
    assert no_temp_files(tmp_path) == []


def test_write_failing_half_way_keeps_the_previous_file(tmp_path):
    """A real mid-write failure: the file-size limit (RLIMIT_FSIZE) stops the write after 4 KiB."""
    target = tmp_path / "artifact.bin"
    target.write_bytes(b"previous")
    script = textwrap.dedent(f"""
        import resource, signal
        from slsr_ray import storage
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG as an OSError instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            storage.write_bytes({str(target)!r}, b"x" * 100_000)
        except storage.StorageError as e:
            print("StorageError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "StorageError: cannot write" in out.stdout and str(target) in out.stdout, out.stdout + out.stderr
    assert target.read_bytes() == b"previous"
    assert no_temp_files(tmp_path) == []


def test_failed_forced_rerun_leaves_no_stale_marker(tmp_path):
    """A stage that fails half-way must not keep the marker of its previous success (else the next run
    would skip it over half-rewritten artifacts); its earlier artifacts stay intact."""
    root = corpus.market_tree(tmp_path / "market")
    overrides = ["data.dataset=market1501", f"data.root={root}", "data.check_images=true"]
    cfg = load_config("synthetic", overrides, run_root=str(tmp_path / "run"))
    quiet = dict(until="prepare", echo=lambda *_: None)
    run_pipeline(cfg, **quiet)
    first = read_record(cfg.run_root, "prepare")
    before = storage.read_table(os.path.join(cfg.run_root, "prepare", "train.parquet"))
    bad = os.path.join(root, "bounding_box_train", "0002_c2s1_000004_00.jpg")
    corpus.write(bad, corpus.truncated_jpeg())
    with pytest.raises(DatasetError, match=r"1 of 4 images cannot be read: .*0002_c2s1_000004_00\.jpg"):
        run_pipeline(cfg, from_stage="prepare", **quiet)
    assert first is not None and read_record(cfg.run_root, "prepare") is None
    assert storage.read_table(os.path.join(cfg.run_root, "prepare", "train.parquet")).equals(before)
    assert not os.path.exists(os.path.join(cfg.run_root, ".prepare.previous"))  # the set-aside copy went back
    # on_bad_image=skip: the stage finishes without the bad image, train ids stay 0..N-1
    cfg = load_config("synthetic", [*overrides, "data.on_bad_image=skip"], run_root=str(tmp_path / "run"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_pipeline(cfg, **quiet)
    assert any("skipping 1 of 4" in str(w.message) for w in caught)
    train = storage.read_table(os.path.join(cfg.run_root, "prepare", "train.parquet"))
    assert train.num_rows == 3 and bad not in train["path"].to_pylist()
    assert sorted(set(train["pid"].to_pylist())) == [0, 1]
    assert no_temp_files(cfg.run_root) == [] and not os.path.exists(os.path.join(cfg.run_root, ".prepare.previous"))


# ------------------------------------------------------------------------------------------ extraction


def test_extraction_over_odd_images_and_over_a_corrupt_one(ray_session, tmp_path):
    """Odd-but-valid images (16-bit, palette, CMYK, 24 Mpixel) extract one row each; a corrupt image
    stops a rerun into the same folder with an error naming it, and the earlier extraction stays there,
    complete and byte-identical (the rerun wrote into a staging folder that is deleted)."""
    files = {**ODD_BUT_VALID, "0003_c1s1_000030_00.jpg": corpus.image_bytes("CMYK"),
             "0003_c2s1_000031_00.png": corpus.image_bytes("LA", fmt="PNG")}
    paths = [corpus.write(tmp_path / "imgs" / name, data) for name, data in sorted(files.items())]
    manifest = pa.table({"path": paths, "pid": list(range(len(paths))), "camid": [0] * len(paths)})
    cfg = ExtractConfig(height=64, width=32, batch_size=4, num_actors=1)
    model = ModelConfig(num_classes=4, backbone="resnet18")
    out = extract_features(manifest, model, str(tmp_path / "features"), cfg)
    table, X = load_features(out)
    assert table["path"].to_pylist() == paths and X.shape[0] == len(paths) and np.isfinite(X).all()

    bad = corpus.write(tmp_path / "imgs" / "0005_c1s1_000040_00.jpg", corpus.truncated_jpeg())
    manifest = pa.table({"path": [*paths, bad], "pid": list(range(len(paths) + 1)), "camid": [0] * (len(paths) + 1)})
    before = {p.name: p.read_bytes() for p in Path(out).iterdir()}
    with pytest.raises(Exception, match=r"0005_c1s1_000040_00\.jpg.*truncated"):
        extract_features(manifest, model, out, cfg)
    assert is_complete(out) and {p.name: p.read_bytes() for p in Path(out).iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["features", "imgs"]  # no staging folder left behind
    with pytest.raises(ValueError, match="not a finished feature extraction"):
        load_features(tmp_path / "imgs")
