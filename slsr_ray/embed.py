"""``slsr embed``: one feature per image of a folder or manifest, with a trained model, into one parquet.

The work is the extract stage's (:func:`slsr_ray.extract.extract_features`: Ray Data, a pool of model
actors, local or ``s3://`` images and output); this module only turns a folder into a manifest, picks
the model's own input size, and gathers the shards into a single gallery file whose schema metadata
(``slsr.gallery``) says which model and feature made it, so ``slsr search`` can refuse a mismatch.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.fs as pafs

from . import storage
from .errors import SlsrError
from .export import LoadedModel, load_reference

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
GALLERY_META_KEY = b"slsr.gallery"


class EmbedError(SlsrError, ValueError):
    """Images that cannot be embedded: no such folder or manifest, no images in it."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str) -> list[str]:
    """Every image (by extension) under ``folder`` (local or s3://, recursive), sorted."""
    fs, path = storage.filesystem(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise storage.StorageError(f"cannot list {folder}: {e}") from e
    prefix = "s3://" if storage.is_s3(folder) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and is_image_name(i.path))


def _kind(uri: str) -> pafs.FileType:
    fs, path = storage.filesystem(uri)
    try:
        return fs.get_file_info(path).type
    except OSError as e:
        raise storage.StorageError(f"{uri}: {e}") from e


def images_manifest(images: str) -> pa.Table:
    """A manifest table (``path`` and whatever else a manifest has) from a ``.parquet`` manifest, an
    image folder (recursive) or a single image; EmbedError naming ``images`` otherwise."""
    from .extract import ExtractError, read_manifest

    images = storage.absolute(str(images))
    kind = _kind(images)
    if kind == pafs.FileType.NotFound:
        raise EmbedError(f"images {images} do not exist (expected an image folder or a manifest .parquet)")
    if kind == pafs.FileType.File and images.endswith(".parquet"):
        try:
            return read_manifest(storage.read_table(images))
        except ExtractError as e:
            raise EmbedError(f"manifest {images}: {e}") from e
    if kind == pafs.FileType.File:
        if not is_image_name(images):
            raise EmbedError(f"{images} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a manifest .parquet")
        paths = [images]
    else:
        paths = list_images(images)
        if not paths:
            raise EmbedError(f"image folder {images} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return pa.table({"path": pa.array(paths, pa.string())})


def gallery_metadata(loaded: LoadedModel, feature: str, dim: int, images: str) -> dict:
    h, w = loaded.input_size
    return {"model": loaded.source.checkpoint, "run_root": loaded.source.run_root, "strategy": loaded.source.strategy,
            "backbone": loaded.config.backbone, "feature": feature, "dim": dim, "input_size": [h, w],
            "images": images}


def embed_images(model: str, images: str, output: str, feature: str = "pool", batch_size: int = 64,
                 num_actors: int | None = None, strategy: str | None = None, decode: str = "auto",
                 address: str | None = None) -> str:
    """Embed every image of ``images`` (folder, single image or manifest) with ``model`` (run root or
    checkpoint) into the parquet file ``output`` (local or s3://): the manifest's columns plus
    ``feature`` (``fixed_size_list<float32>[D]``). Ray is joined at ``address`` (or started) only once the
    inputs are known to be good. Returns ``output``."""
    from .extract import ExtractConfig, extract_features, features_column, load_features
    from .raysetup import init_ray

    loaded = load_reference(model, strategy)  # a bad model fails here, before Ray starts anything
    manifest = images_manifest(images)
    output = storage.absolute(str(output))
    if not output.endswith(".parquet"):
        raise EmbedError(f"--output {output} must be a .parquet file")
    h, w = loaded.input_size
    cfg = ExtractConfig(batch_size=batch_size, num_actors=num_actors, feature=feature, height=h, width=w,
                        decode=decode)
    init_ray(address)
    parts = output + ".parts"  # the extract stage's shards; gathered into one file, then removed
    extract_features(manifest, loaded.source.checkpoint, parts, cfg)
    table, features = load_features(parts)
    table = table.drop_columns([c for c in ("row_index",) if c in table.column_names])
    table = table.append_column("feature", features_column(features))
    meta = gallery_metadata(loaded, feature, int(features.shape[1]), storage.absolute(str(images)))
    table = table.replace_schema_metadata({GALLERY_META_KEY: json.dumps(meta).encode()})
    storage.write_table(output, table)
    storage.remove(parts)
    log.info("embedded %d images (%d-d %s features) into %s", table.num_rows, features.shape[1], feature, output)
    return output


def read_gallery_metadata(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(GALLERY_META_KEY)
    return json.loads(raw) if raw else {}

