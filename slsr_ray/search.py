"""``slsr search``: the nearest gallery images of a query image, with a trained model and a faiss index.

* The gallery is a parquet file written by ``slsr embed`` (``path``, ``feature`` and whatever the
  manifest had, e.g. ``pid`` / ``camid``). Its metadata names the model and feature that made it; a
  model whose feature dimension differs is refused.
* Query images go through the extract stage's preprocessing (:func:`slsr_ray.extract.decode_resize`,
  :func:`~slsr_ray.extract.normalise`) and ``model.extract`` in this process (a few images).
* Index: exact (``IndexFlatL2`` for ``euclidean``, ``IndexFlatIP`` on L2-normalised features for
  ``cosine``) up to ``ivf_threshold`` gallery images (100k), ``IndexIVFFlat`` above it, trained once
  and cached beside the gallery (:mod:`slsr_ray.faiss_index`). Distances are those of the evaluation:
  Euclidean (not squared) or 1 - cosine.
* ``rerank``: k-reciprocal re-ranking (:func:`slsr_ray.evaluate.re_ranking_features`) over the whole
  gallery up to ``rerank_full`` images, else over the union of every query's ``rerank_candidates``
  nearest images.
* ``skip_same_camera``: drop the gallery images of the query's own identity seen by the query's own
  camera, the evaluation's rule (needs ``pid`` / ``camid`` for the queries, i.e. a query manifest,
  and in the gallery); with it, the share of queries whose top-1 is their identity is the
  evaluation's rank-1.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from . import storage
from .embed import images_manifest, read_gallery_metadata
from .errors import SlsrError
from .export import LoadedModel, first_line
from .faiss_index import IVF_THRESHOLD, METRICS, FeatureIndex, gallery_index

log = logging.getLogger(__name__)

RERANK_FULL = 20_000


class SearchError(SlsrError, ValueError):
    """Bad search input: a missing or empty gallery, an undecodable query, a model that does not fit."""


@dataclass
class Gallery:
    uri: str
    table: pa.Table  # every column but ``feature``
    features: np.ndarray  # float32 [n, d]
    meta: dict

    def column(self, name: str) -> np.ndarray | None:
        return self.table[name].to_numpy() if name in self.table.column_names else None


def load_gallery(uri: str) -> Gallery:
    """Read a gallery written by ``slsr embed``; SearchError naming the file when it is not one."""
    from .extract import FeatureColumnError, feature_matrix

    uri = storage.absolute(str(uri))
    if not storage.exists(uri):
        raise SearchError(f"gallery {uri} does not exist (write one with slsr embed)")
    try:
        table = storage.read_table(uri)
    except storage.StorageError as e:
        raise SearchError(f"gallery {uri} is not a readable parquet file: {first_line(e)}") from e
    missing = [c for c in ("path", "feature") if c not in table.column_names]
    if missing:
        raise SearchError(f"gallery {uri} lacks column(s) {missing}; expected a file written by slsr embed")
    if table.num_rows == 0:
        raise SearchError(f"gallery {uri} is empty (0 images)")
    try:
        features = feature_matrix(table)
    except FeatureColumnError as e:
        raise SearchError(f"gallery {uri}: {e}") from e
    if not np.isfinite(features).all():
        raise SearchError(f"gallery {uri} holds non-finite features")
    return Gallery(uri, table.drop_columns(["feature"]), features, read_gallery_metadata(table.schema))


def check_model_fits(loaded: LoadedModel, gallery: Gallery) -> str:
    """The feature kind to use for queries (the gallery's); SearchError when the dimensions differ."""
    feature = gallery.meta.get("feature", "pool")
    model_dim, gallery_dim = loaded.feature_dim(feature), gallery.features.shape[1]
    if model_dim != gallery_dim:
        raise SearchError(
            f"gallery {gallery.uri} holds {gallery_dim}-d features but model {loaded.source.checkpoint} gives "
            f"{model_dim}-d {feature} features; embed the gallery with this model (slsr embed)"
        )
    made_by = gallery.meta.get("model")
    if made_by and made_by != loaded.source.checkpoint:
        log.warning("gallery %s was embedded with %s, not %s: distances mix two models", gallery.uri, made_by,
                    loaded.source.checkpoint)
    return feature


# ------------------------------------------------------------------------------------------ queries


@dataclass
class Query:
    path: str
    pid: int | None = None
    camid: int | None = None


def read_queries(query: str) -> list[Query]:
    """Queries from one image, an image folder or a manifest parquet (with ``pid`` / ``camid`` if any)."""
    from .embed import EmbedError

    try:
        table = images_manifest(query)
    except EmbedError as e:
        raise SearchError(str(e).replace("images ", "query ", 1)) from e
    pids = table["pid"].to_pylist() if "pid" in table.column_names else [None] * table.num_rows
    cams = table["camid"].to_pylist() if "camid" in table.column_names else [None] * table.num_rows
    return [Query(p, pid, cam) for p, pid, cam in zip(table["path"].to_pylist(), pids, cams, strict=True)]


def query_features(loaded: LoadedModel, paths: list[str], feature: str, batch_size: int = 32) -> np.ndarray:
    """Features of query images with the extract stage's preprocessing; SearchError naming an image
    that does not decode."""
    import torch

    from .data.images import ImageReadError
    from .extract import decode_resize, normalise

    h, w = loaded.input_size
    out = []
    for start in range(0, len(paths), batch_size):
        images = []
        for p in paths[start : start + batch_size]:
            try:
                images.append(decode_resize(p, h, w))
            except ImageReadError as e:
                raise SearchError(f"query image {p} does not decode: {first_line(e)}") from e
        with torch.inference_mode():
            x = normalise(np.stack(images), loaded.config.input_norm)
            out.append(loaded.model.extract(x, feature=feature).float().numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------ search


@dataclass
class Hit:
    rank: int
    index: int
    path: str
    distance: float
    pid: int | None = None
    camid: int | None = None


@dataclass
class SearchSettings:
    top: int = 10
    metric: str = "euclidean"
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    skip_same_camera: bool = False
    ivf_threshold: int = IVF_THRESHOLD
    nprobe: int | None = None
    rerank_full: int = RERANK_FULL
    rerank_candidates: int = 500

    def __post_init__(self):
        if self.top < 1:
            raise SearchError(f"--top must be >= 1, got {self.top}")
        if self.metric not in METRICS:
            raise SearchError(f"--metric must be one of {METRICS}, got {self.metric!r}")
        if self.k1 < 1 or self.k2 < 1 or not 0 <= self.lambda_value <= 1:
            raise SearchError(f"re-ranking needs k1 >= 1, k2 >= 1 and 0 <= lambda <= 1, got k1 {self.k1}, "
                              f"k2 {self.k2}, lambda {self.lambda_value}")
        if self.nprobe is not None and self.nprobe < 1:
            raise SearchError(f"--nprobe must be >= 1, got {self.nprobe}")


def _excluded(queries: list[Query], gallery: Gallery, skip_same_camera: bool) -> list[np.ndarray]:
    """Per query, the gallery rows to leave out (the evaluation's same-identity same-camera rule)."""
    if not skip_same_camera:
        return [np.zeros(0, np.int64)] * len(queries)
    g_pids, g_cams = gallery.column("pid"), gallery.column("camid")
    if g_pids is None or g_cams is None:
        raise SearchError(f"--skip-same-camera needs pid and camid columns in the gallery {gallery.uri}")
    unknown = [q.path for q in queries if q.pid is None or q.camid is None]
    if unknown:
        raise SearchError(f"--skip-same-camera needs the queries' pid and camid (a query manifest); {unknown[0]} has none")
    return [np.flatnonzero((g_pids == q.pid) & (g_cams == q.camid)) for q in queries]


def _rank_rows(dist: np.ndarray, idx: np.ndarray, excluded: list[np.ndarray], top: int) -> list[list[tuple[int, float]]]:
    out = []
    for d_row, i_row, skip in zip(dist, idx, excluded, strict=True):
        keep = (i_row >= 0) & ~np.isin(i_row, skip) & np.isfinite(d_row)
        out.append([(int(i), float(d)) for i, d in zip(i_row[keep][:top], d_row[keep][:top], strict=True)])
    return out


def _reranked(qf: np.ndarray, gallery: Gallery, index: FeatureIndex, excluded: list[np.ndarray],
              s: SearchSettings) -> list[list[tuple[int, float]]]:
    from .evaluate import re_ranking_features

    n = len(gallery.features)
    if n <= s.rerank_full:
        cand = np.arange(n)
    else:
        _, idx = index.search(qf, s.rerank_candidates)
        cand = np.unique(idx[idx >= 0])
    dist = re_ranking_features(qf, gallery.features[cand], k1=s.k1, k2=s.k2, lambda_value=s.lambda_value,
                               metric=s.metric)
    order = np.argsort(dist, axis=1, kind="stable")
    rows = []
    for q, skip in enumerate(excluded):
        skip = set(skip.tolist())
        top = list(itertools.islice((c for c in order[q] if cand[c] not in skip), s.top))
        rows.append([(int(cand[c]), float(dist[q, c])) for c in top])
    return rows


def search(loaded: LoadedModel, gallery: Gallery, queries: list[Query], settings: SearchSettings | None = None,
           query_feats: np.ndarray | None = None) -> tuple[list[list[Hit]], FeatureIndex]:
    """Top-k gallery hits of every query; ``query_feats`` skips computing the query features."""
    s = settings or SearchSettings()
    feature = check_model_fits(loaded, gallery)
    qf = query_feats if query_feats is not None else query_features(loaded, [q.path for q in queries], feature)
    excluded = _excluded(queries, gallery, s.skip_same_camera)
    index = gallery_index(gallery.uri, gallery.features, s.metric, s.ivf_threshold, nprobe=s.nprobe)
    if s.rerank:
        rows = _reranked(qf, gallery, index, excluded, s)
    else:
        dist, idx = index.search(qf, s.top + max(len(e) for e in excluded))
        rows = _rank_rows(dist, idx, excluded, s.top)
    paths = gallery.table["path"].to_pylist()
    g_pids, g_cams = gallery.column("pid"), gallery.column("camid")
    hits = [[Hit(r + 1, i, paths[i], d, None if g_pids is None else int(g_pids[i]),
                 None if g_cams is None else int(g_cams[i])) for r, (i, d) in enumerate(row)] for row in rows]
    return hits, index


# ------------------------------------------------------------------------------------------ output


def format_hits(query: Query, hits: list[Hit]) -> str:
    """A plain-text table of one query's hits."""
    ident = "" if query.pid is None else f" (pid {query.pid}, camid {query.camid})"
    lines = [f"query {query.path}{ident}", f"{'rank':>4}  {'distance':>10}  {'pid':>6}  {'camid':>5}  path"]
    for h in hits:
        pid = "-" if h.pid is None else str(h.pid)
        cam = "-" if h.camid is None else str(h.camid)
        lines.append(f"{h.rank:>4}  {h.distance:>10.4f}  {pid:>6}  {cam:>5}  {h.path}")
    return "\n".join(lines)


def _tile(path: str, size: tuple[int, int]):
    """The image at ``size`` (w, h); a grey tile when it cannot be read any more (the strip still shows
    the ranking)."""
    from PIL import Image

    from .data.images import ImageReadError, read_image

    try:
        return read_image(path).resize(size, Image.BILINEAR)
    except ImageReadError as e:
        log.warning("strip: %s", first_line(e))
        return Image.new("RGB", size, (128, 128, 128))


def draw_strip(query: Query, hits: list[Hit], tile: tuple[int, int] = (64, 128)) -> bytes:
    """PNG bytes: the query, then its ranked hits left to right, each with its rank and distance; a
    green frame marks a hit of the query's identity, red another one (when identities are known)."""
    from PIL import Image, ImageDraw

    w, h = tile
    pad, caption = 6, 30
    canvas = Image.new("RGB", ((w + pad) * (len(hits) + 1) + pad, h + caption + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    items = [("query", query.path, (40, 90, 220))]
    for hit in hits:
        known = query.pid is not None and hit.pid is not None
        colour = ((30, 160, 60) if hit.pid == query.pid else (210, 40, 40)) if known else (160, 160, 160)
        items.append((f"{hit.rank}: {hit.distance:.3f}", hit.path, colour))
    for i, (label, path, colour) in enumerate(items):
        x = pad + i * (w + pad)
        canvas.paste(_tile(path, (w, h)), (x, pad))
        draw.rectangle([x - 2, pad - 2, x + w + 1, pad + h + 1], outline=colour, width=3)
        draw.text((x, pad + h + 6), label, fill=(0, 0, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def write_results(out_dir: str, queries: list[Query], hits: list[list[Hit]], info: dict) -> dict:
    """``results.json`` (every query's hits and the search settings) and one PNG strip per query under
    ``out_dir`` (local or s3://); returns the JSON document."""
    out_dir = storage.absolute(str(out_dir))
    doc = {**info, "queries": []}
    for n, (q, row) in enumerate(zip(queries, hits, strict=True)):
        stem = os.path.splitext(os.path.basename(q.path))[0]
        strip = storage.join(out_dir, f"{n:04d}_{stem}.png")
        storage.write_bytes(strip, draw_strip(q, row))
        doc["queries"].append({**asdict(q), "strip": strip, "hits": [asdict(h) for h in row]})
    storage.write_json(storage.join(out_dir, "results.json"), doc)
    return doc
