"""One storage layer for run artifacts: a local path or ``s3://bucket/prefix``.

Every stage reads and writes through these functions, so a run root can move from a laptop to S3
without touching stage code. Writes are atomic: local files go to a temporary name in the same folder
and are renamed; an S3 object only appears when its upload completes (S3 never shows a half-written
object).

S3 settings come from the usual AWS environment and config files (``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible
stores such as MinIO or moto). How long to wait for S3 is set by ``SLSR_S3_CONNECT_TIMEOUT`` (seconds,
default 3), ``SLSR_S3_READ_TIMEOUT`` (seconds without an answer, default 5) and ``SLSR_S3_RETRIES``
(attempts per request, default 2): an endpoint that accepts connections and never answers fails in
about 10 s, and the error names the endpoint.

Credentials never leave the process that found them: the S3 filesystem is built without explicit
keys (the AWS SDK's default chain reads the environment, profile or instance role of whichever process
uses it), so pickling it (Ray ships filesystems to Ray Data write tasks and Ray Train workers) carries
only the endpoint, region and timeouts. :func:`portable_filesystem` is the one to hand to Ray: the
node that unpickles it checks its own credentials first and names the URI when it has none.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tempfile
import threading
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import SlsrError


class StorageError(SlsrError, RuntimeError):
    """A run-root path could not be read or written (missing, no credentials, unreachable, ...)."""


class CorruptFileError(StorageError):
    """A file exists but its content does not parse (a truncated or hand-edited JSON file)."""


S3_TIMEOUT_ENV = {"connect": ("SLSR_S3_CONNECT_TIMEOUT", 3.0), "read": ("SLSR_S3_READ_TIMEOUT", 5.0),
                  "retries": ("SLSR_S3_RETRIES", 2)}


def s3_timeouts() -> dict[str, float]:
    """Connect / read timeouts (s) and attempts per request, from ``SLSR_S3_*`` or the defaults."""
    out = {}
    for name, (env, default) in S3_TIMEOUT_ENV.items():
        raw = os.environ.get(env)
        try:
            value = type(default)(raw) if raw not in (None, "") else default
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise StorageError(f"bad value {raw!r}", where=env, expected=f"a positive number (default {default})")
        out[name] = value
    return out


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def join(root: str | os.PathLike, *parts: str) -> str:
    """Join path parts under a local path or an ``s3://`` URI."""
    root = str(root)
    if is_s3(root):
        return posixpath.join(root, *[p.strip("/") for p in parts])
    return os.path.join(root, *parts)


def absolute(uri: str | os.PathLike | None) -> str | None:
    """``uri`` with a local path made absolute (Ray workers run in other working directories)."""
    if uri is None:
        return None
    uri = str(uri)
    return uri if is_s3(uri) else os.path.abspath(uri)


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_S3_LOCK = threading.Lock()
_S3_CACHE: dict[tuple, pafs.S3FileSystem] = {}


def check_s3_credentials(uri: str | None = None) -> None:
    """Fail early with a clear message (naming ``uri``) when no AWS credentials can be found here."""
    import boto3

    if boto3.Session().get_credentials() is None:
        import socket

        raise StorageError(
            f"no AWS credentials found on {socket.gethostname()} (pid {os.getpid()}) to access "
            f"{uri or 'the s3:// run root'}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE on "
            "every node, or run on nodes with an instance profile / IRSA role"
        )


def _s3_options() -> dict[str, Any]:
    """The non-secret settings of the S3 filesystem: region, endpoint, timeouts, retries."""
    import boto3

    region = boto3.Session().region_name or os.environ.get("AWS_REGION") or "us-east-1"
    waits = s3_timeouts()
    options: dict[str, Any] = dict(
        region=region, connect_timeout=waits["connect"], request_timeout=waits["read"],
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=int(waits["retries"])),
        # A small object (JSON, an image, a marker) is sent in one PUT when the stream closes instead of
        # a multipart upload opened up front (create, part, complete: three requests per object).
        allow_delayed_open=True,
    )
    endpoint = _s3_endpoint()
    if endpoint:
        options["endpoint_override"] = endpoint.split("://", 1)[-1]
        options["scheme"] = "https" if endpoint.startswith("https://") else "http"
    return options


def s3_filesystem(uri: str | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from the AWS environment (cached per endpoint/region/waits);
    StorageError naming ``uri`` when this process has no credentials."""
    check_s3_credentials(uri)
    options = _s3_options()
    # the retry strategy is an object: the key holds its attempt count instead
    key = (*sorted((k, v) for k, v in options.items() if k != "retry_strategy"), s3_timeouts()["retries"])
    with _S3_LOCK:
        fs = _S3_CACHE.get(key)
        if fs is None:
            # No access_key/secret_key: the SDK's default chain resolves them in the process that uses
            # the filesystem, and pyarrow pickles such a filesystem without any credentials.
            fs = _S3_CACHE[key] = pafs.S3FileSystem(**options)
    return fs


class NodeLocalS3FileSystem(pafs.S3FileSystem):
    """An S3 filesystem to hand to Ray (Ray Data sinks, Ray Train / Tune storage): it pickles as its URI
    and non-secret options only, and the node that unpickles it checks its own credentials (a clear
    error naming the URI when it has none) and builds its own client."""

    def __init__(self, options: dict[str, Any], uri: str):
        super().__init__(**options)  # _s3_options() holds the retry strategy (SLSR_S3_RETRIES attempts)
        self._slsr_options, self._slsr_uri = dict(options), uri

    def __reduce__(self):
        return (_node_local_s3, (self._slsr_options, self._slsr_uri))


def _node_local_s3(options: dict[str, Any], uri: str) -> NodeLocalS3FileSystem:
    check_s3_credentials(uri)
    return NodeLocalS3FileSystem(options, uri)


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for ``uri``."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(uri), uri[len("s3://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def portable_filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Like :func:`filesystem`, for a filesystem Ray ships to other nodes (see
    :class:`NodeLocalS3FileSystem`): no credentials travel with it."""
    uri = str(uri)
    if is_s3(uri):
        check_s3_credentials(uri)
        return NodeLocalS3FileSystem(_s3_options(), uri), uri[len("s3://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _wrap(uri: str, err: Exception) -> StorageError:
    msg = str(err)
    if is_s3(uri):
        low = msg.lower()
        # connection errors first: their text also holds "bucket" and "not" ("Could not connect")
        if "curl" in low or "connect" in low or "timed out" in low or "timeout" in low:
            waits = s3_timeouts()
            return StorageError(
                f"S3 endpoint unreachable while accessing {uri}", where=_s3_endpoint() or "AWS S3",
                expected=f"an S3 endpoint answering within {waits['connect']:g} s (connect) / {waits['read']:g} s "
                f"(read), {int(waits['retries'])} attempt(s); set SLSR_S3_CONNECT_TIMEOUT, SLSR_S3_READ_TIMEOUT, "
                f"SLSR_S3_RETRIES to wait longer ({msg.strip().splitlines()[0][:200] if msg.strip() else ''})")
        if "slow_down" in low or "slowdown" in low or "throttl" in low or "http status 503" in low:
            return StorageError(f"S3 throttled the requests for {uri} (still failing after retries): {msg}")
        if "nosuchbucket" in low or "bucket does not exist" in low or "bucket" in low and "not" in low:
            return StorageError(f"S3 bucket for {uri} does not exist or is not accessible: {msg}")
    return StorageError(f"{uri}: {msg}")


def exists(uri: str | os.PathLike) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _wrap(str(uri), e) from e


def makedirs(uri: str | os.PathLike) -> None:
    if is_s3(uri):
        return  # S3 has no folders; objects create their prefixes
    try:
        os.makedirs(str(uri), exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create folder {uri}: {e}") from e


def read_bytes(uri: str | os.PathLike) -> bytes:
    uri = str(uri)
    if not is_s3(uri):
        try:
            with open(uri, "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            raise StorageError(f"{uri} does not exist") from e
        except OSError as e:
            raise StorageError(f"{uri}: {e}") from e
    fs, path = filesystem(uri)
    try:
        # A random-access file knows its size and reads it in one GET; an input stream's read() fetches
        # it in ranged GETs of ~130 KB (a 46 MB checkpoint: 351 requests; a 95 MB object: 22 s against
        # moto, 0.19 s in one GET; on S3 each request is a round trip too).
        with fs.open_input_file(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{uri} does not exist") from e
    except OSError as e:
        raise _wrap(uri, e) from e


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old content or the new one, never a partial file."""
    uri = str(uri)
    if not is_s3(uri):
        folder = os.path.dirname(os.path.abspath(uri))
        try:
            makedirs(folder)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(uri)[-40:])
        except (OSError, StorageError) as e:
            raise StorageError(f"cannot write {uri}: {e}") from e
        try:
            # mkstemp makes 0600 files; give the result the permissions a plain open() would.
            os.fchmod(fd, 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, uri)
        except BaseException as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise StorageError(f"cannot write {uri}: {e}") from e
            raise
        return
    fs, path = filesystem(uri)
    try:
        # The object becomes visible only when the upload completes (one PUT, or a completed
        # multipart upload for large objects: allow_delayed_open), so readers never see a partial object.
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise _wrap(uri, e) from e


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str | os.PathLike) -> Any:
    """Parse a JSON file; :class:`CorruptFileError` naming it when it does not parse."""
    data = read_bytes(uri)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{uri} is not valid JSON ({e})",
                               expected="a complete JSON file (truncated or edited by hand?)") from e


def write_json(uri: str | os.PathLike, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_table(uri: str | os.PathLike, table: pa.Table) -> None:
    """Write a parquet file atomically."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(uri, sink.getvalue())


def read_table(uri: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read one parquet file or a folder of parquet shards."""
    uri = str(uri)
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{uri} does not exist")
        return pq.read_table(path, filesystem=fs, columns=columns)
    except StorageError:
        raise
    except OSError as e:
        raise _wrap(uri, e) from e


def listdir(uri: str | os.PathLike) -> list[str]:
    """Names (not paths) directly under ``uri``; empty when it does not exist."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise _wrap(str(uri), e) from e
    return sorted(posixpath.basename(i.path) for i in infos)


def remove(uri: str | os.PathLike) -> None:
    """Delete a file or a folder tree; a missing path is fine."""
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise _wrap(str(uri), e) from e


def check_writable(root: str | os.PathLike) -> None:
    """Prove ``root`` accepts writes (and deletes the probe); raises StorageError naming the root."""
    root = str(root)
    if is_s3(root):
        check_s3_credentials(root)
    probe = join(root, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
    except StorageError as e:
        raise StorageError(f"run root {root} is not writable: {e}") from e
    remove(probe)


def to_local(uri: str | os.PathLike, cache_dir: str | None = None) -> str:
    """A local path holding ``uri``'s bytes (downloads S3 objects into a cache folder)."""
    uri = str(uri)
    if not is_s3(uri):
        return uri
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "slsr-cache")
    local = os.path.join(cache_dir, uri[len("s3://") :])
    if not os.path.exists(local):
        write_bytes(local, read_bytes(uri))
    return local


def missing_files(paths: list[str]) -> list[str]:
    """The paths (local or s3://) that are not files; one listing per folder, so it scales to S3.
    A dangling symlink counts as missing."""
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        parent = posixpath.dirname(p) if is_s3(p) else os.path.dirname(os.path.abspath(p))
        by_dir.setdefault(parent, []).append(p)
    missing = []
    for folder, items in by_dir.items():
        fs, fpath = filesystem(folder)
        try:
            infos = fs.get_file_info(pafs.FileSelector(fpath, allow_not_found=True))
        except OSError as e:
            raise _wrap(folder, e) from e
        present = {posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File}
        missing.extend(p for p in items if os.path.basename(p) not in present)
    return missing


def require_folder(uri: str | os.PathLike, key: str, what: str = "a folder") -> None:
    """``uri`` must be an existing folder (for ``s3://``: its bucket must exist); StorageError naming
    ``key`` (the option or config key that gave it) otherwise."""
    uri = str(uri)
    if not is_s3(uri):
        if os.path.isfile(uri):
            raise StorageError(f"{uri} is a file", where=key, expected=f"{what}, not a file")
        if not os.path.isdir(uri):
            raise StorageError(f"{uri} does not exist", where=key, expected=f"an existing folder ({what})")
        return
    bucket = uri[len("s3://"):].split("/", 1)[0]
    fs = s3_filesystem()
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise _wrap(uri, e) from e
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"S3 bucket {bucket} does not exist", where=key, expected=f"an existing bucket ({what})")
