"""``slsr search`` index: IVF (what galleries over 100k images get) vs the exact faiss index, with recall.

The gallery imitates re-id features: ``N / 10`` identities of 10 images each around an identity centre
(non-negative, like pooled ReLU features), queries are other images of those identities. Both
indexes are :class:`slsr_ray.faiss_index.FeatureIndex` (Euclidean); ``ours`` is the IVF index at its default
``nlist`` / ``nprobe``, the peer the exact ``IndexFlatL2`` (``ratio`` = ours / peer time: below 1, IVF
is faster); recall@10 is the share of the exact top-10
the IVF index returns. Build time (IVF k-means training) is reported apart from the query time. Both
run on one faiss thread.
Sizes: ``small`` N = 20,000 (IVF forced by lowering the threshold to 10,000), ``market`` N = 200,000
(the default 100k threshold applies).

    python benchmarks/bench_search.py --size small
"""

from __future__ import annotations

import time

import numpy as np
from common import chosen_size, report, size_parser

SIZES = {"small": 20_000, "market": 200_000}
DIM = 512
QUERIES = 1_000
TOP = 10


def make_gallery(n: int, d: int = DIM, per_id: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(gallery [n, d], queries [QUERIES, d]) with identity structure."""
    rng = np.random.default_rng(seed)
    ids = max(1, n // per_id)
    centres = rng.gamma(2.0, 0.5, size=(ids, d)).astype(np.float32)

    def draw(which: np.ndarray) -> np.ndarray:
        out = np.empty((len(which), d), np.float32)
        for s in range(0, len(which), 20_000):
            w = which[s : s + 20_000]
            out[s : s + len(w)] = np.maximum(centres[w] + rng.standard_normal((len(w), d), dtype=np.float32), 0)
        return out

    return draw(np.arange(n) % ids), draw(rng.integers(0, ids, QUERIES))


def run(size: str) -> list[dict]:
    import faiss

    from slsr_ray.faiss_index import IVF_THRESHOLD, FeatureIndex

    faiss.omp_set_num_threads(1)  # one thread for both: a shared 2-core machine makes OpenMP timings noise

    n = SIZES[size]
    gallery, queries = make_gallery(n)
    threshold = min(IVF_THRESHOLD, n // 2)
    t0 = time.perf_counter()
    exact = FeatureIndex.build(gallery)
    exact_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, i_exact = exact.search(queries, TOP)
    exact_s = time.perf_counter() - t0
    rows = []
    for nprobe in (None, 16, 4):  # the default, and cheaper settings to show the trade-off
        t0 = time.perf_counter()
        ivf = FeatureIndex.build(gallery, ivf_threshold=threshold, nprobe=nprobe)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, i_ivf = ivf.search(queries, TOP)
        ivf_s = time.perf_counter() - t0
        recall = float(np.mean([len(set(a) & set(b)) / TOP for a, b in zip(i_exact, i_ivf, strict=True)]))
        rows.append({
            "name": f"top-{TOP} of {QUERIES} queries, N={n}, d={DIM}, nprobe={ivf.nprobe}"
                    + (" (default)" if nprobe is None else ""),
            "ours_s": round(ivf_s, 4), "peer": "faiss IndexFlatL2 (exact)", "peer_s": round(exact_s, 4),
            "ratio": round(ivf_s / exact_s, 3), "recall_at_10": round(recall, 4), "nlist": ivf.nlist,
            "ivf_build_s": round(build, 2), "exact_build_s": round(exact_build, 2),
        })
    return rows


if __name__ == "__main__":
    args = size_parser(__doc__, SIZES).parse_args()
    size = chosen_size(args)
    report("search", size, run(size), ["name", "ours_s", "peer_s", "ratio", "recall_at_10", "nlist", "ivf_build_s"])
