"""Step 2 of Algorithm 1: extract a feature for every image of a manifest with Ray Data.

Pipeline (one Ray Data dataset, streaming, with progress bars)::

    manifest rows --(tasks: read + decode + resize to HxW uint8)--> --(actor pool: normalise, model.extract)-->
        parquet shards under output_dir   (all manifest columns, ``row_index``, ``feature``)

* The manifest (local or ``s3://`` parquet, or an in-memory ``pyarrow.Table``) is checked up front:
  every image must exist (one listing per folder, not one request per image), otherwise the error
  names a few missing paths and counts the rest.
* Decoding runs in its own Ray Data stage of tasks (``decode="tasks"``, the default: on GPU clusters
  the CPUs feed the GPUs; on CPU clusters a quarter of the CPUs, at least one, is left to decode
  tasks of 0.5 CPU and the rest hold model actors) or inside the model actors (``decode="actor"``).
  On 2 CPUs the separate stage measured faster (``benchmarks/bench_extract.py``).
* The model runs in ``ActorPoolStrategy(size=num_actors)`` actors with ``num_gpus`` each, chosen from
  ``ray.cluster_resources()``: 0 on CPU-only clusters (asking for a GPU there would hang forever).
  A checkpoint URI is loaded by each actor from the run root (nothing is read from the driver's
  disk); a :class:`~slsr_ray.models.ModelConfig` is built once on the driver (random init) and its
  weights are shared through the object store, so every actor computes the same features.
* An input that fits in one batch (an evaluation's query and gallery on a small dataset, a test) runs
  in one Ray task with the same resources, thread count and model code, on a worker that is usually
  warm, and gives the same features bit for bit: a pool of one actor would start a process (torch
  import, model build: about 7 CPU-seconds) and a Ray Data execution for a single batch.
* Output: parquet shards, then ``meta.json`` and finally an empty ``_SUCCESS`` marker; a folder
  without ``_SUCCESS`` is an unfinished extraction and :func:`load_features` refuses it.

The ``feature`` column is ``fixed_size_list<float32>[D]`` (2048 for the ResNet50 pooled feature).
``row_index`` is the row's position in the manifest, so :func:`load_features` returns rows in
manifest order whatever order the shards were written in.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from . import storage
from .errors import SlsrError
from .feature_shards import ClusteringError, _remote
from .raysetup import init_ray
from .staging import staged_folder
from .validate import check_model_checkpoint

log = logging.getLogger(__name__)


class FeatureColumnError(ClusteringError):
    """A ``feature`` column that is not one fixed-length float vector per row."""


def feature_matrix(table: pa.Table, column: str = "feature") -> np.ndarray:
    """The fixed-size-list (or list) float column ``column`` of ``table`` as a float32 [n, d] array."""
    if column not in table.column_names:
        raise FeatureColumnError(f"table has no {column!r} column; has {table.column_names}")
    arr = table[column].combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    if arr.null_count:
        raise FeatureColumnError(f"{arr.null_count} rows have a null {column!r}")
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    else:
        lengths = np.unique(arr.value_lengths().to_numpy())
        if len(lengths) != 1:
            raise FeatureColumnError(f"{column!r} rows have different lengths {lengths[:5].tolist()}")
        d = int(lengths[0])
    return np.ascontiguousarray(arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), d), np.float32)

DECODE_MODES = ("auto", "tasks", "actor")
SUCCESS_MARKER = "_SUCCESS"
META_FILE = "meta.json"


class ExtractError(SlsrError, ValueError):
    """Bad extraction input: missing images, a manifest without paths, impossible resources."""


@dataclass
class ExtractConfig:
    """Extraction settings.

    ``batch_size``: images per model forward (an int: Ray requires it with GPUs).
    ``num_actors``: model actors; None = one per GPU on GPU clusters; on CPU clusters one per CPU
    after reserving a quarter of the CPUs (at least one) for the decode tasks.
    ``num_gpus``: GPUs per actor; None = 1 when the cluster has GPUs, else 0.
    ``cpus_per_actor``: CPUs reserved per actor (also its torch thread count).
    ``feature``: ``pool`` (the pooled backbone feature the paper clusters) or ``bottleneck``.
    ``height`` / ``width``: input size (the test transform resizes to it).
    ``decode``: ``tasks`` (a separate decode stage), ``actor`` (decode in the model actors) or
    ``auto`` (``tasks`` on GPU clusters, ``actor`` on CPU clusters, where it measured faster).
    ``decode_concurrency``: max parallel decode tasks (None: Ray decides).
    ``decode_cpus``: CPUs per decode task. Ray Data fuses a decode stage into the actors when both ask
    for the same resources, so on CPU clusters keep it different from ``cpus_per_actor``.
    ``rows_per_file``: target rows per output parquet shard.
    ``check_images``: check every image exists before starting (one listing per folder).
    """

    batch_size: int = 64
    num_actors: int | None = None
    num_gpus: float | None = None
    cpus_per_actor: float = 1.0
    feature: str = "pool"
    height: int = 256
    width: int = 128
    decode: str = "auto"
    decode_concurrency: int | None = None
    decode_cpus: float = 0.5
    rows_per_file: int = 20_000
    check_images: bool = True

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ExtractError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.feature not in ("pool", "bottleneck"):
            raise ExtractError(f"feature must be 'pool' or 'bottleneck', got {self.feature!r}")
        if self.decode not in DECODE_MODES:
            raise ExtractError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if self.height < 1 or self.width < 1:
            raise ExtractError(f"image size must be positive, got {self.height}x{self.width}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ExtractError(f"num_actors must be >= 1, got {self.num_actors}")


# --------------------------------------------------------------------------------------------------
# Image decoding and preprocessing (shared by the decode tasks, the actors and the benchmark)
# --------------------------------------------------------------------------------------------------


def decode_resize(uri: str, height: int, width: int) -> np.ndarray:
    """Read and decode one image, resize it as the test transform does; HxWx3 uint8."""
    from torchvision import transforms as T

    from .data import read_image

    img = read_image(uri)
    return np.asarray(T.Resize((height, width))(img), dtype=np.uint8)


def _decode_batch(batch: dict, height: int, width: int) -> dict:
    batch["image"] = np.stack([decode_resize(str(p), height, width) for p in batch["path"]])
    return batch


def normalise(images: np.ndarray, norm: str = "imagenet"):
    """uint8 [B, H, W, 3] -> normalised float tensor [B, 3, H, W]; equal to the test transform's
    ``ToTensor`` + ``Normalize`` applied image by image (``norm``: the model's ``input_norm``)."""
    import torch

    from .transforms import normalization

    mean, std = normalization(norm)
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # Ray Data's zero-copy batches: torch warns on a read-only buffer
        images = images.copy()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def features_column(features: np.ndarray) -> pa.FixedSizeListArray:
    """float32 [n, d] -> ``fixed_size_list<float32>[d]`` arrow column."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1])


# --------------------------------------------------------------------------------------------------
# The model actor
# --------------------------------------------------------------------------------------------------


class Extractor:
    """Ray Data callable class: holds the model, turns a batch of images into a ``feature`` column."""

    def __init__(self, checkpoint: str | None, model_config: dict | None, state_ref: list | None,
                 feature: str, height: int, width: int, decode_in_actor: bool, use_gpu: bool, threads: int,
                 role: str = "extraction actor"):
        import torch

        torch.set_num_threads(max(1, threads))
        from .gpu import device_for

        self.device = device_for(use_gpu, role)
        if checkpoint is not None:
            from .models import load_model

            self.model, _, _ = load_model(checkpoint, map_location="cpu")
        else:
            import ray

            from .models import ModelConfig, ReidModel

            self.model = ReidModel(ModelConfig.from_dict(model_config))
            self.model.load_state_dict(ray.get(state_ref[0]))
        self.model.to(self.device).eval()
        self.feature, self.height, self.width = feature, height, width
        self.decode_in_actor = decode_in_actor

    def __call__(self, batch: dict) -> pa.Table:
        import torch

        if self.decode_in_actor:
            images = np.stack([decode_resize(str(p), self.height, self.width) for p in batch["path"]])
        else:
            images = batch.pop("image")
        with torch.inference_mode():
            feats = self.model.extract(normalise(images, self.model.cfg.input_norm).to(self.device),
                                       feature=self.feature)
        feats = feats.float().cpu().numpy()
        table = pa.table({name: pa.array(col) for name, col in batch.items() if name != "image"})
        return table.append_column("feature", features_column(feats))


def _extract_one_batch(table: pa.Table, extractor_kwargs: dict) -> pa.Table:
    """Ray task: a whole (one-batch) manifest through an :class:`Extractor` built here, as the actor pool
    would: the batch is the columns as numpy arrays, the way Ray Data hands them to the actors."""
    import torch

    previous = torch.get_num_threads()
    try:  # the worker may run other tasks later: leave its torch thread count as found
        batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
        return Extractor(**extractor_kwargs, role="extraction task")(batch)
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def read_manifest(manifest: str | pa.Table) -> pa.Table:
    """A manifest table from a parquet URI (local or s3://) or a table; it must have a ``path`` column."""
    table = storage.read_table(manifest) if isinstance(manifest, str | os.PathLike) else manifest
    if not isinstance(table, pa.Table):
        raise ExtractError(f"manifest must be a parquet path/URI or a pyarrow.Table, got {type(manifest).__name__}")
    if "path" not in table.column_names:
        raise ExtractError(f"manifest has no 'path' column; has {table.column_names}")
    if table.num_rows == 0:
        raise ExtractError("manifest has no rows: nothing to extract")
    if "row_index" in table.column_names or "feature" in table.column_names:
        raise ExtractError("manifest already has a 'row_index' or 'feature' column (is it a feature table?)")
    return table


def missing_images(paths: list[str]) -> list[str]:
    """The paths (local or s3://) that do not exist; one listing per folder, so it scales to S3."""
    return storage.missing_files(paths)


def check_images(paths: list[str], show: int = 5) -> None:
    """Raise :class:`ExtractError` listing a few missing images and the count of the rest."""
    missing = missing_images(paths)
    if missing:
        more = f" and {len(missing) - show} more" if len(missing) > show else ""
        raise ExtractError(
            f"{len(missing)} of {len(paths)} images in the manifest do not exist: "
            + ", ".join(missing[:show]) + more
        )


def _resources(cfg: ExtractConfig) -> tuple[int, float, str, float]:
    """(num_actors, gpus per actor, decode mode, cpus per actor) from the config and the cluster's nodes."""
    import ray

    from . import gpu

    cpus = float(ray.cluster_resources().get("CPU", 0))
    nodes = gpu.gpu_nodes()
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if gpu.slots(1.0, nodes) >= 1 else 0.0)
    try:
        gpu.check_request(num_gpus, 1, f"extraction (num_gpus={num_gpus:g} per actor)")
    except gpu.GpuRequestError as e:
        raise ExtractError(str(e)) from e
    # auto: on GPUs a separate CPU decode stage keeps the GPU fed; on CPU clusters decoding inside the
    # model actors is faster (measured: 0.87x vs 0.42x a plain DataLoader on 2 idle cores)
    decode = cfg.decode if cfg.decode != "auto" else ("tasks" if num_gpus > 0 else "actor")
    if num_gpus > 0:
        # one actor per GPU place, each with at most the CPUs its node has beside its GPU (an actor
        # asking for more CPUs than any GPU node has would wait forever)
        places = gpu.slots(num_gpus, nodes)
        num_actors = cfg.num_actors or places
        if num_actors > places:
            raise ExtractError(f"{num_actors} actors x {num_gpus:g} GPUs exceed the cluster's GPUs "
                               f"({sum(n.gpus for n in nodes):g} on {len(nodes)} node(s))")
        cpus_per_actor = gpu.cpus_beside(num_actors, num_gpus, cfg.cpus_per_actor, nodes)
        if decode == "tasks" and cpus - num_actors * cpus_per_actor < cfg.decode_cpus:
            if cfg.decode != "auto":
                raise ExtractError(f"decode='tasks' needs {cfg.decode_cpus:g} CPU free of the {num_actors} GPU "
                                   f"actors (cluster has {cpus:g} CPUs)")
            decode = "actor"  # no CPU left for decode tasks: the actors decode
        return num_actors, num_gpus, decode, cpus_per_actor
    decode_reserve = max(1.0, cpus // 4) if decode == "tasks" else 0.0
    num_actors = cfg.num_actors or max(1, int((cpus - decode_reserve) // cfg.cpus_per_actor))
    if num_actors * cfg.cpus_per_actor > cpus:
        raise ExtractError(
            f"{num_actors} actors x {cfg.cpus_per_actor:g} CPUs exceed the cluster's {cpus:g} CPUs (it would wait forever)"
        )
    fused = cfg.decode_cpus == cfg.cpus_per_actor  # Ray Data runs the decode in the actors
    if decode == "tasks" and not fused and num_actors * cfg.cpus_per_actor >= cpus:
        # Decode tasks need a free CPU next to the actors; keep one.
        if cfg.num_actors is not None:
            raise ExtractError(f"decode='tasks' needs a CPU free of the {num_actors} actors (cluster has {cpus:g})")
        num_actors = max(1, num_actors - 1)
    return num_actors, num_gpus, decode, cfg.cpus_per_actor


def _is_extraction_file(name: str) -> bool:
    """An earlier extraction's files (replaced by a new one; the folder may hold other files, kept)."""
    return name.endswith(".parquet") or name in (META_FILE, SUCCESS_MARKER)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def extract_features(manifest: str | pa.Table, checkpoint, output_dir: str, cfg: ExtractConfig | None = None) -> str:
    """Extract one feature per manifest image into parquet shards under ``output_dir``; returns it.

    ``checkpoint``: a checkpoint URI (local or s3://, written by ``models.save_checkpoint``) or a
    ``ModelConfig`` (random initialisation, for tests and demos). See the module docstring.
    """
    # Long because the Ray Data pipeline reads top to bottom: inputs, actor pool sizing, map_batches, write, meta.
    import ray

    from .models import ModelConfig, build_model

    cfg = cfg or ExtractConfig()
    table = read_manifest(manifest)
    paths = table["path"].to_pylist()
    if cfg.check_images:
        check_images(paths)
    init_ray()
    num_actors, num_gpus, decode, cpus_per_actor = _resources(cfg)

    if isinstance(checkpoint, ModelConfig):
        model = build_model(checkpoint)  # logs that the backbone is randomly initialised
        state_ref = [ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})]
        ckpt_uri, model_config, source = None, asdict(checkpoint), f"random-init {asdict(checkpoint)}"
    elif isinstance(checkpoint, str | os.PathLike):
        ckpt_uri, model_config, state_ref, source = str(checkpoint), None, None, str(checkpoint)
        if not storage.exists(ckpt_uri):
            raise ExtractError(f"checkpoint {ckpt_uri} does not exist")
        check_model_checkpoint(ckpt_uri, "checkpoint")  # on the driver, before any actor or output exists
    else:
        raise ExtractError(f"checkpoint must be a URI or a ModelConfig, got {type(checkpoint).__name__}")
    output_dir = storage.absolute(output_dir)

    n = table.num_rows
    table = table.append_column("row_index", pa.array(np.arange(n, dtype=np.int64)))
    one_batch = n <= cfg.batch_size
    if one_batch:  # one task, decoding in it: no pool, no Ray Data execution for a single batch
        num_actors, decode = 0, "task"
    extractor_kwargs = {
        "checkpoint": ckpt_uri, "model_config": model_config, "state_ref": state_ref,
        "feature": cfg.feature, "height": cfg.height, "width": cfg.width,
        "decode_in_actor": decode in ("actor", "task"), "use_gpu": num_gpus > 0,
        "threads": max(1, int(cpus_per_actor)),
    }
    if not one_batch:
        # No more actors than batches; at least one input block per actor, a few batches per block.
        num_actors = min(num_actors, math.ceil(n / cfg.batch_size))
        num_blocks = max(math.ceil(n / (4 * cfg.batch_size)), num_actors)
        rows_per_block = math.ceil(n / num_blocks)
        ds = ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, n, rows_per_block)])
        if decode == "tasks":
            ds = ds.map_batches(
                _decode_batch, fn_kwargs={"height": cfg.height, "width": cfg.width}, batch_size=cfg.batch_size,
                batch_format="numpy", num_cpus=cfg.decode_cpus, udf_modifying_row_count=False,
                compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency) if cfg.decode_concurrency else None,
            )
        ds = ds.map_batches(
            Extractor,
            fn_constructor_kwargs=extractor_kwargs,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            num_gpus=num_gpus,
            num_cpus=cpus_per_actor,
            udf_modifying_row_count=False,
        )
    # Written into a staging folder swapped in when complete: a failed or killed extraction never
    # costs the previous features in output_dir.
    with staged_folder(output_dir, marker=SUCCESS_MARKER, owned=_is_extraction_file) as stage:
        start = time.perf_counter()
        if one_batch:
            log.info("extracting %d images (one batch) in one task (%g GPU) -> %s", n, num_gpus, output_dir)
            task = _remote(_extract_one_batch, num_cpus=cpus_per_actor, num_gpus=num_gpus)
            storage.write_table(storage.join(stage, "part-000000.parquet"),
                                ray.get(task.remote(table, extractor_kwargs)))
        else:
            fs, fs_path = storage.portable_filesystem(stage)  # the write tasks build their own S3 client
            log.info("extracting %d images with %d actor(s) (%g GPU each, decode in %s) -> %s", n, num_actors,
                     num_gpus, decode, output_dir)
            # Rows land in the files in manifest order (file names sort in block order): the clustering
            # reads them in that order, so the same seed gives the same k-means run (k-means++ draws by
            # position).
            ds.context.execution_options.preserve_order = True
            ds.write_parquet(fs_path, filesystem=fs, min_rows_per_file=min(cfg.rows_per_file, n))
        seconds = time.perf_counter() - start

        files = [f for f in storage.listdir(stage) if f.endswith(".parquet")]
        written = sum(storage.read_table(storage.join(stage, f), columns=["row_index"]).num_rows for f in files)
        if written != n:
            raise ExtractError(f"extraction wrote {written} rows for {n} manifest rows in {output_dir}")
        dim = storage.read_table(storage.join(stage, files[0])).schema.field("feature").type.list_size
        storage.write_json(storage.join(stage, META_FILE), {
            "num_rows": n, "dim": dim, "feature": cfg.feature, "model": source,
            "manifest": "<table>" if isinstance(manifest, pa.Table) else str(manifest),
            "columns": table.column_names + ["feature"], "files": sorted(files), "config": asdict(cfg),
            "num_actors": num_actors, "num_gpus_per_actor": num_gpus, "decode": decode,
            "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else math.inf,
        })
        storage.write_bytes(storage.join(stage, SUCCESS_MARKER), b"")  # last: marks the output complete
    log.info("extracted %d features (%d-d) in %.1f s (%.1f images/s)", n, dim, seconds, n / max(seconds, 1e-9))
    return output_dir


def is_complete(output_dir: str) -> bool:
    """True when ``output_dir`` holds a finished extraction (its ``_SUCCESS`` marker exists)."""
    return storage.exists(storage.join(str(output_dir), SUCCESS_MARKER))


def load_features(output_dir: str) -> tuple[pa.Table, np.ndarray]:
    """Read a finished extraction: (table of every column but ``feature``, in manifest order;
    float32 [N, D] features, row-aligned with the table)."""

    output_dir = str(output_dir)
    if not is_complete(output_dir):
        raise ExtractError(
            f"{output_dir} is not a finished feature extraction (no {SUCCESS_MARKER} marker): "
            "it is missing or was interrupted; run the extraction again"
        )
    files = [f for f in storage.listdir(output_dir) if f.endswith(".parquet")]
    table = pa.concat_tables([storage.read_table(storage.join(output_dir, f)) for f in files])
    if "row_index" in table.column_names:
        table = table.sort_by("row_index")
    X = feature_matrix(table)
    return table.drop_columns(["feature"]), X


def _finished_shards(output_dir: str) -> list[str]:
    if not is_complete(output_dir):
        raise ExtractError(
            f"{output_dir} is not a finished feature extraction (no {SUCCESS_MARKER} marker): "
            "it is missing or was interrupted; run the extraction again"
        )
    return [storage.join(output_dir, f) for f in storage.listdir(output_dir) if f.endswith(".parquet")]


def load_feature_table(output_dir: str) -> pa.Table:
    """Every column of a finished extraction but ``feature``, in manifest order, without reading the
    features (what a figure needs to pick its rows on a large run)."""
    files = _finished_shards(str(output_dir))
    schema = storage.read_table(files[0]).schema if files else None
    columns = [c for c in (schema.names if schema else []) if c != "feature"]
    table = pa.concat_tables([storage.read_table(f, columns=columns) for f in files])
    return table.sort_by("row_index") if "row_index" in table.column_names else table


def iter_feature_shards(output_dir: str, columns: tuple[str, ...] = ("row_index", "feature")):
    """(manifest row positions, float32 features) of each shard of a finished extraction, one at a time."""
    for f in _finished_shards(str(output_dir)):
        shard = storage.read_table(f, columns=list(columns))
        yield shard["row_index"].to_numpy(), feature_matrix(shard)


def load_feature_rows(output_dir: str, rows) -> np.ndarray:
    """float32 [len(rows), D] features of the manifest rows ``rows`` (distinct positions, in that order),
    read one shard at a time: memory is one shard plus the rows asked for, not the whole feature matrix."""
    rows = np.asarray(rows, dtype=np.int64)
    where = {int(r): i for i, r in enumerate(rows)}
    out: np.ndarray | None = None
    found = 0
    for idx, X in iter_feature_shards(output_dir):
        hit = np.flatnonzero(np.isin(idx, rows))
        if out is None and len(X):
            out = np.zeros((len(rows), X.shape[1]), np.float32)
        for k in hit:
            out[where[int(idx[k])]] = X[k]
        found += len(hit)
    if out is None or found < len(where):
        raise ExtractError(f"{output_dir}: {len(where) - found} of the {len(where)} rows asked for are not in its shards")
    return out
