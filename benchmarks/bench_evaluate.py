"""Evaluation and re-ranking, ours vs torchreid 0.2.5 (same inputs, same script).

Rows:
  evaluate_rank          ours (``slsr_ray.evaluate.evaluate_rank``) vs torchreid's Python ``eval_market1501``
                         (and its Cython ``evaluate_cy`` when ``rank_cylib`` imports -- it does not in the
                         pip wheel); max |CMC diff| and |mAP diff|.
  re_ranking (dense)     ours (exact, distance blocks in) vs torchreid's ``utils/rerank.py``.
  re_ranking_features    ours (features in, no (q+g)^2 matrix) vs the same reference given the three
                         distance matrices (their computation is not counted in the reference's time).

Sizes: evaluation small 1,000 x 5,000 / market 3,368 x 15,913; re-ranking small 500 x 2,500 / market
2,000 x 10,000. Every measured call runs in a fresh subprocess, so peak memory is the rise of that
process's peak RSS (VmHWM) over its RSS just before the call (torch allocations included).

    python benchmarks/bench_evaluate.py [small|market] [--max-ref-queries N]
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np
from common import chosen_size, report, size_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    "small": {"eval": (1000, 5000), "rerank": (500, 2500)},
    "market": {"eval": (3368, 15913), "rerank": (2000, 10000)},
}
NUM_CAMS = 6
FEATURE_DIM = 256


# -------------------------------------------------------------------------------------- inputs
def make_inputs(num_q: int, num_g: int, seed: int = 0, dim: int = FEATURE_DIM) -> dict[str, np.ndarray]:
    """Market-like features: ~num_q/4.5 test ids, each with queries and gallery images across cameras,
    plus distractor gallery images; noisy so that R1 is well below 100 %."""
    rng = np.random.default_rng(seed)
    num_ids = max(2, int(num_q / 4.5))
    centers = rng.normal(size=(num_ids, dim)).astype(np.float32)
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = np.where(rng.random(num_g) < 0.8, rng.integers(0, num_ids, num_g), -1 - rng.integers(0, num_g, num_g))
    def feats(pids):
        base = np.where(pids[:, None] >= 0, centers[np.maximum(pids, 0)], rng.normal(size=(len(pids), dim)))
        return (base + 1.1 * rng.normal(size=(len(pids), dim))).astype(np.float32)
    return {
        "qf": feats(q_pids), "gf": feats(g_pids), "q_pids": q_pids, "g_pids": g_pids,
        "q_camids": rng.integers(0, NUM_CAMS, num_q), "g_camids": rng.integers(0, NUM_CAMS, num_g),
    }


def _torchreid_module(rel: str):
    root = pathlib.Path(importlib.util.find_spec("torchreid").submodule_search_locations[0])
    path = next(p for p in (root / "reid" / rel, root / rel) if p.exists())
    spec = importlib.util.spec_from_file_location(f"_tr_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.loader.exec_module(mod)
    return mod


def _torchreid_cython():
    try:
        from torchreid.reid.metrics.rank_cylib.rank_cy import evaluate_cy  # noqa: F401

        return evaluate_cy
    except Exception:
        return None


# --------------------------------------------------------------------------- measured subprocess
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(task: str, workdir: str, kwargs: dict, conn) -> None:
    import torch  # noqa: F401  (imported before the baseline for both sides)

    from slsr_ray.evaluate import compute_distance_matrix, evaluate_rank, re_ranking, re_ranking_features

    data = {k: np.load(os.path.join(workdir, f"{k}.npy")) for k in
            ("qf", "gf", "q_pids", "g_pids", "q_camids", "g_camids", "qg", "qq", "gg") if
            os.path.exists(os.path.join(workdir, f"{k}.npy"))}
    ids = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    tr_rank = _torchreid_module("metrics/rank.py")
    tr_rerank = _torchreid_module("utils/rerank.py")
    _ = compute_distance_matrix(data["qf"][:2], data["gf"][:2])  # warm up torch
    base = _rss_mb("VmRSS")
    # VmHWM cannot be reset without privileges; the child is fresh, so HWM so far ~ base.
    out: dict = {}
    t0 = time.perf_counter()
    if task == "eval_ours":
        r = evaluate_rank(data["qg"], *ids, max_rank=50)
        out = {"cmc": r["cmc"].tolist(), "mAP": r["mAP"]}
    elif task == "eval_torchreid":
        n = kwargs.get("num_queries") or len(data["qg"])
        cmc, m_ap = tr_rank.eval_market1501(data["qg"][:n], *(x[:n] if i in (0, 2) else x for i, x in enumerate(ids)), 50)
        out = {"cmc": np.asarray(cmc).tolist(), "mAP": float(m_ap), "num_queries": n}
    elif task == "eval_ours_subset":
        n = kwargs["num_queries"]
        r = evaluate_rank(data["qg"][:n], *(x[:n] if i in (0, 2) else x for i, x in enumerate(ids)), max_rank=50)
        out = {"cmc": r["cmc"].tolist(), "mAP": r["mAP"]}
    elif task == "eval_cython":
        cy = _torchreid_cython()
        cmc, m_ap = cy(data["qg"], *ids, 50, False)
        out = {"cmc": np.asarray(cmc).tolist(), "mAP": float(m_ap)}
    elif task == "rerank_reference":
        dist = tr_rerank.re_ranking(data["qg"], data["qq"], data["gg"], k1=20, k2=6, lambda_value=0.3)
        np.save(os.path.join(workdir, "rr_reference.npy"), dist)
    elif task == "rerank_dense":
        dist = re_ranking(data["qg"], data["qq"], data["gg"], k1=20, k2=6, lambda_value=0.3)
        np.save(os.path.join(workdir, "rr_dense.npy"), dist)
    elif task == "rerank_features":
        dist = re_ranking_features(data["qf"], data["gf"], k1=20, k2=6, lambda_value=0.3)
        np.save(os.path.join(workdir, "rr_features.npy"), dist)
    else:
        raise ValueError(task)
    out["seconds"] = time.perf_counter() - t0
    out["peak_mem_mb"] = _rss_mb("VmHWM") - base
    conn.send(out)
    conn.close()


def _measure(task: str, workdir: str, **kwargs) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(task, workdir, kwargs, child))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    return result


# ------------------------------------------------------------------------------------------- run
def run(size: str = "small", max_ref_queries: int | None = None) -> list[dict]:
    """Benchmark rows for ``size`` ("small" or "market"). ``max_ref_queries`` times torchreid's Python
    evaluator on the first N queries only and extrapolates linearly (reported in the row)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    from slsr_ray.evaluate import compute_distance_matrix, evaluate_rank

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as workdir:
        # ---------------------------------------------------------------- evaluation
        nq, ng = SIZES[size]["eval"]
        data = make_inputs(nq, ng, seed=0)
        data["qg"] = compute_distance_matrix(data["qf"], data["gf"])
        for k, v in data.items():
            np.save(os.path.join(workdir, f"{k}.npy"), v)
        ours = _measure("eval_ours", workdir)
        n_ref = min(max_ref_queries or nq, nq)
        ref = _measure("eval_torchreid", workdir, num_queries=n_ref)
        note = ""
        if n_ref < nq:
            sub = _measure("eval_ours_subset", workdir, num_queries=n_ref)
            cmp_cmc, cmp_map = sub["cmc"], sub["mAP"]
            ref_s = ref["seconds"] * nq / n_ref
            note = f"torchreid timed on {n_ref}/{nq} queries, time extrapolated linearly; diffs on that subset"
        else:
            cmp_cmc, cmp_map = ours["cmc"], ours["mAP"]
            ref_s = ref["seconds"]
        rows.append({
            "name": f"evaluate_rank {nq}x{ng}", "ours_s": ours["seconds"], "peer": "torchreid eval_market1501 (Python)",
            "peer_s": ref_s, "ratio": ref_s / ours["seconds"],
            "peak_mem_mb": ours["peak_mem_mb"], "peer_peak_mem_mb": ref["peak_mem_mb"],
            "max_abs_diff_cmc": float(np.max(np.abs(np.asarray(cmp_cmc) - np.asarray(ref["cmc"])))),
            "abs_diff_mAP": abs(cmp_map - ref["mAP"]), "R1": ours["cmc"][0], "mAP": ours["mAP"], "note": note,
        })
        if _torchreid_cython() is not None:
            cy = _measure("eval_cython", workdir)
            rows.append({
                "name": f"evaluate_rank {nq}x{ng}", "ours_s": ours["seconds"], "peer": "torchreid evaluate_cy (Cython)",
                "peer_s": cy["seconds"], "ratio": cy["seconds"] / ours["seconds"],
                "peak_mem_mb": ours["peak_mem_mb"], "peer_peak_mem_mb": cy["peak_mem_mb"],
                "max_abs_diff_cmc": float(np.max(np.abs(np.asarray(ours["cmc"]) - np.asarray(cy["cmc"])))),
                "abs_diff_mAP": abs(ours["mAP"] - cy["mAP"]), "note": "",
            })
        else:
            rows.append({"name": f"evaluate_rank {nq}x{ng}", "ours_s": ours["seconds"],
                         "peer": "torchreid evaluate_cy (Cython)", "peer_s": float("nan"), "ratio": float("nan"),
                         "note": "torchreid.reid.metrics.rank_cylib does not import (not built in the pip wheel)"})
        for f in os.listdir(workdir):
            os.remove(os.path.join(workdir, f))

        # ---------------------------------------------------------------- re-ranking
        nq, ng = SIZES[size]["rerank"]
        data = make_inputs(nq, ng, seed=1)
        data["qg"] = compute_distance_matrix(data["qf"], data["gf"])
        data["qq"] = compute_distance_matrix(data["qf"], data["qf"])
        data["gg"] = compute_distance_matrix(data["gf"], data["gf"])
        for k, v in data.items():
            np.save(os.path.join(workdir, f"{k}.npy"), v)
        ids = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
        ref = _measure("rerank_reference", workdir)
        ref_dist = np.load(os.path.join(workdir, "rr_reference.npy"))
        ref_eval = evaluate_rank(ref_dist, *ids)
        plain = evaluate_rank(data["qg"], *ids)
        for task, label in (("rerank_dense", "re_ranking (dense, exact)"), ("rerank_features", "re_ranking_features")):
            ours = _measure(task, workdir)
            dist = np.load(os.path.join(workdir, f"rr_{task.split('_')[1]}.npy"))
            ev = evaluate_rank(dist, *ids)
            rows.append({
                "name": f"{label} {nq}x{ng}", "ours_s": ours["seconds"], "peer": "torchreid re_ranking",
                "peer_s": ref["seconds"], "ratio": ref["seconds"] / ours["seconds"],
                "peak_mem_mb": ours["peak_mem_mb"], "peer_peak_mem_mb": ref["peak_mem_mb"],
                "mem_ratio": ours["peak_mem_mb"] / max(ref["peak_mem_mb"], 1e-9),
                "max_abs_diff_dist": float(np.max(np.abs(dist - ref_dist))),
                "max_abs_diff_cmc": float(np.max(np.abs(ev["cmc"] - ref_eval["cmc"]))),
                "mAP_diff_points": 100 * (ev["mAP"] - ref_eval["mAP"]),
                "mAP": ev["mAP"], "mAP_reference": ref_eval["mAP"], "mAP_no_rerank": plain["mAP"],
                "note": "reference time excludes building its 3 distance matrices" if task == "rerank_features" else "",
            })
    return rows




def main(argv: list[str] | None = None) -> list[dict]:
    parser = size_parser(__doc__, SIZES)
    parser.add_argument("--max-ref-queries", type=int, default=None,
                        help="time torchreid's Python evaluator on this many queries and extrapolate")
    args = parser.parse_args(argv)
    size = chosen_size(args)
    cols = ["name", "ours_s", "peer", "peer_s", "ratio", "peak_mem_mb", "peer_peak_mem_mb",
            "max_abs_diff_cmc", "abs_diff_mAP", "mAP_diff_points", "max_abs_diff_dist"]
    return report("evaluate", size, run(size, args.max_ref_queries), cols)


if __name__ == "__main__":
    main()
