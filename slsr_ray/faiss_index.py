"""The faiss index ``slsr search`` ranks a gallery with.

Exact (``IndexFlatL2``; ``IndexFlatIP`` on L2-normalised features for cosine) up to ``ivf_threshold``
images, ``IndexIVFFlat`` above it (about 4 sqrt(N) lists, ``nprobe`` = 1/8 of them by default; recall
against the exact index: ``tests/test_search.py``, ``benchmarks/bench_search.py``). Training an IVF
index on a large gallery takes minutes, so :func:`gallery_index` keeps it beside the gallery
(``<gallery>.ivf-<metric>.faiss`` + ``.json`` with a hash of the features) and reuses it while the
features are the same.
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np

from . import storage

log = logging.getLogger(__name__)

METRICS = ("euclidean", "cosine")
IVF_THRESHOLD = 100_000


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def prepare(features: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous; rows L2-normalised for cosine (inner product = cosine similarity)."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x)


class FeatureIndex:
    """A faiss index and the metric its distances are reported in (see the module docstring)."""

    def __init__(self, index, metric: str, nprobe: int | None = None):
        import faiss

        _check_metric(metric)
        self.index, self.metric = index, metric
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:  # not an IVF index
            ivf = None
        self.nlist = ivf.nlist if ivf is not None else None
        self.nprobe = None
        if ivf is not None:
            ivf.nprobe = self.nprobe = min(self.nlist, nprobe or max(8, self.nlist // 8))

    @classmethod
    def build(cls, features: np.ndarray, metric: str = "euclidean", ivf_threshold: int = IVF_THRESHOLD,
              nlist: int | None = None, nprobe: int | None = None) -> FeatureIndex:
        import faiss

        _check_metric(metric)
        x = prepare(features, metric)
        n, d = x.shape
        flat = faiss.IndexFlatL2 if metric == "euclidean" else faiss.IndexFlatIP
        if n > ivf_threshold:
            # ~4 sqrt(n) lists, at least 39 training points each (faiss' minimum for a stable k-means)
            nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
            faiss_metric = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
            index = faiss.IndexIVFFlat(flat(d), d, nlist, faiss_metric)  # faiss' wrapper keeps the quantizer alive
            index.train(x)
        else:
            index = flat(d)
        index.add(x)
        return cls(index, metric, nprobe)

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, metric: str, nprobe: int | None = None) -> FeatureIndex:
        import faiss

        return cls(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), metric, nprobe)

    @property
    def kind(self) -> str:
        if self.nlist is None:
            return f"exact ({type(self.index).__name__})"
        return f"IVF (IndexIVFFlat, nlist={self.nlist}, nprobe={self.nprobe})"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices), each [q, k]; missing neighbours (IVF) have index -1 and distance inf."""
        k = min(k, self.index.ntotal)
        raw, idx = self.index.search(prepare(queries, self.metric), k)
        dist = np.sqrt(np.maximum(raw, 0.0)) if self.metric == "euclidean" else 1.0 - raw
        return np.where(idx < 0, np.inf, dist).astype(np.float32), idx


def features_key(features: np.ndarray) -> str:
    """A hash of the features (and their shape): the cached index belongs to exactly these."""
    h = hashlib.sha256(str(features.shape).encode())
    h.update(memoryview(np.ascontiguousarray(features, dtype=np.float32)).cast("B"))
    return h.hexdigest()[:32]


def cache_uri(gallery_uri: str, metric: str) -> str:
    return f"{gallery_uri}.ivf-{metric}.faiss"


def gallery_index(gallery_uri: str | None, features: np.ndarray, metric: str = "euclidean",
                  ivf_threshold: int = IVF_THRESHOLD, nprobe: int | None = None) -> FeatureIndex:
    """The index of a gallery file's features; an IVF index is read from / written to its cache beside
    the gallery (a cache that cannot be written is only a warning)."""
    if gallery_uri is None or len(features) <= ivf_threshold:
        return FeatureIndex.build(features, metric, ivf_threshold, nprobe=nprobe)
    uri, key = cache_uri(gallery_uri, metric), features_key(features)
    meta_uri = uri + ".json"
    if storage.exists(meta_uri) and storage.exists(uri) and storage.read_json(meta_uri).get("key") == key:
        index = FeatureIndex.from_bytes(storage.read_bytes(uri), metric, nprobe)
        log.info("using the IVF index cached at %s", uri)
        return index
    index = FeatureIndex.build(features, metric, ivf_threshold, nprobe=nprobe)
    try:
        storage.write_bytes(uri, index.to_bytes())
        storage.write_json(meta_uri, {"key": key, "metric": metric, "nlist": index.nlist, "ntotal": len(features)})
    except storage.StorageError as e:
        log.warning("could not cache the IVF index beside the gallery: %s", e)
    return index
