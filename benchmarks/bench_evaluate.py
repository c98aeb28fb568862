"""Evaluation and re-ranking, ours vs torchreid 0.2.5 (same inputs, same script).

Rows:
  evaluate_rank          ours (``slsr_ray.evaluate.evaluate_rank``, distance matrix in) vs torchreid's
                         Python ``eval_market1501`` (and its Cython ``evaluate_cy`` when it imports -- it
                         does not in the pip wheel); max |CMC diff| and |mAP diff|.
  evaluate_features      ours from features, distances made block by block (no q x g matrix held).
  re_ranking (dense)     ours (exact, distance blocks in) vs torchreid's ``utils/rerank.py``.
  re_ranking_features    ours (features in, no (q+g)^2 matrix) vs the same reference given the three
                         distance matrices (their computation is not counted in the reference's time).

Inputs: Market-like features (about num_q / 4.5 test ids, 20 % distractors, 6 cameras) with noise set
so that rank-1 is 50-80 % and mAP far below 1 -- checked before anything is timed (identical numbers
on inputs that every method gets right would prove nothing).

Sizes: ``small`` evaluation 1,000 x 5,000 / re-ranking 500 x 2,500 (d = 256); ``market`` 3,368 x
15,913 / 2,000 x 10,000 (d = 256); ``msmt17`` 11,659 x 82,161 (d = 2,048) for everything: torchreid's
evaluator runs on the first ``--max-ref-queries`` queries (time extrapolated linearly, numbers compared
on those queries); its dense re-ranking cannot run (its memory is computed from its code and stated).

Every measured call runs in a fresh subprocess, ``--repeat`` rounds of ours and the peer interleaved
(the machine may be shared: the minimum time is reported, all times are kept). Memory: ``peak_rss_mb`` is the process's peak resident
set (VmHWM, inputs and Python included), ``peak_rise_mb`` its rise over the RSS just before the call.

    python benchmarks/bench_evaluate.py [small|market|msmt17] [--repeat N] [--max-ref-queries N] [--part rerank]

``--part eval`` or ``--part rerank`` runs only those rows; the other part's rows are kept from the
previous JSON (each with its own ``measured_at``).
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np
from common import BenchmarkError, chosen_size, report, size_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    "small": {"eval": (1000, 5000), "rerank": (500, 2500), "dim": 256, "repeat": 3, "ref_queries": None},
    "market": {"eval": (3368, 15913), "rerank": (2000, 10000), "dim": 256, "repeat": 2, "ref_queries": 1000},
    "msmt17": {"eval": (11659, 82161), "rerank": None, "dim": 2048, "repeat": 1, "ref_queries": 300},
}
NUM_CAMS = 6
GIB = 1024**3


# -------------------------------------------------------------------------------------------- inputs
def noise_for(dim: int) -> float:
    """Per-dimension noise that keeps rank-1 at 50-80 % (the gap between same-id and other-id squared
    distances grows like d, their spread like sqrt(d) * noise^2, hence the fourth root)."""
    return 2.1 * (dim / 256) ** 0.25


def make_inputs(num_q: int, num_g: int, seed: int = 0, dim: int = 256) -> dict[str, np.ndarray]:
    """Market-like features: ~num_q/4.5 test ids, each with queries and gallery images across cameras,
    plus distractor gallery images (pid < 0); noisy enough that rank-1 is far from 100 %."""
    rng = np.random.default_rng(seed)
    num_ids = max(2, int(num_q / 4.5))
    centers = rng.standard_normal((num_ids, dim), dtype=np.float32)
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = np.where(rng.random(num_g) < 0.8, rng.integers(0, num_ids, num_g), -1 - rng.integers(0, num_g, num_g))
    noise = np.float32(noise_for(dim))

    def feats(pids: np.ndarray) -> np.ndarray:
        out = np.empty((len(pids), dim), np.float32)
        for a in range(0, len(pids), 8192):  # float32 and chunked: MSMT17 size stays < 1 GB
            p = pids[a : a + 8192]
            base = rng.standard_normal((len(p), dim), dtype=np.float32)
            known = p >= 0
            base[known] = centers[p[known]]
            out[a : a + len(p)] = base + noise * rng.standard_normal((len(p), dim), dtype=np.float32)
        return out

    return {
        "qf": feats(q_pids), "gf": feats(g_pids), "q_pids": q_pids, "g_pids": g_pids,
        "q_camids": rng.integers(0, NUM_CAMS, num_q), "g_camids": rng.integers(0, NUM_CAMS, num_g),
    }


def check_difficulty(data: dict, max_queries: int = 1000) -> dict:
    """R1 / mAP of the inputs on their first queries; BenchmarkError when they are too easy or too hard
    for "the same numbers as torchreid" to mean anything."""
    from slsr_ray.evaluate import evaluate_features

    n = min(max_queries, len(data["qf"]))
    r = evaluate_features(data["qf"][:n], data["gf"], data["q_pids"][:n], data["g_pids"],
                          data["q_camids"][:n], data["g_camids"])
    r1, m_ap = float(r["cmc"][0]), float(r["mAP"])
    if not (0.3 <= r1 <= 0.9 and m_ap <= 0.8):
        raise BenchmarkError(f"benchmark inputs give R1 {r1:.3f} and mAP {m_ap:.3f} on {n} queries; "
                             "expected R1 in [0.3, 0.9] and mAP <= 0.8 (adjust noise_for)")
    return {"R1": r1, "mAP": m_ap}


def write_distances(workdir: str, name: str, a: np.ndarray, b: np.ndarray) -> None:
    """The Euclidean distance matrix of a x b, written block by block to ``name``.npy (never whole in memory)."""
    import torch

    from slsr_ray.evaluate import pairwise_distance

    out = np.lib.format.open_memmap(os.path.join(workdir, f"{name}.npy"), mode="w+", dtype=np.float32,
                                    shape=(len(a), len(b)))
    tb = torch.from_numpy(b)
    step = max(1, (256 * 1024**2) // (4 * len(b)))
    for s in range(0, len(a), step):
        out[s : s + step] = pairwise_distance(torch.from_numpy(a[s : s + step]), tb).numpy()
    out.flush()
    del out


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


def torchreid_rerank_bytes(n: int) -> int:
    """What torchreid's ``re_ranking`` holds at its peak for N = q + g (read from its code): while
    ``initial_rank = np.argsort(original_dist).astype(np.int32)`` runs, the normalised float32
    ``original_dist``, the float32 ``V``, the int64 argsort and its int32 copy: 5 x N^2 x 4 bytes
    (its three input distance matrices not counted)."""
    return 5 * n * n * 4


def torchreid_eval_bytes(num_q: int, num_g: int) -> int:
    """torchreid ``eval_market1501``: the float32 distmat, its int64 argsort, the int32 matches."""
    return num_q * num_g * (4 + 8 + 4)


# ------------------------------------------------------------------------------ measured subprocess
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise BenchmarkError(f"/proc/self/status has no {field}")


def _child(task: str, workdir: str, kwargs: dict, conn) -> None:
    import torch  # noqa: F401  (imported before the baseline for both sides)

    from slsr_ray.evaluate import evaluate_features, evaluate_rank, re_ranking, re_ranking_features

    n = kwargs.get("num_queries")

    def load(name: str, rows: int | None = None) -> np.ndarray:
        path = os.path.join(workdir, f"{name}.npy")
        return np.array(np.load(path, mmap_mode="r")[:rows]) if rows else np.load(path)

    ids = tuple(load(k) for k in ("q_pids", "g_pids", "q_camids", "g_camids"))
    inputs = {"eval_rank": ("qg",), "eval_features": ("qf", "gf"), "eval_torchreid": ("qg",),
              "eval_cython": ("qg",), "rerank_reference": ("qg", "qq", "gg"), "rerank_dense": ("qg", "qq", "gg"),
              "rerank_features": ("qf", "gf")}[task]
    data = {k: load(k, n if k in ("qg", "qf") else None) for k in inputs}  # a query subset: its rows only
    if n:
        ids = (ids[0][:n], ids[1], ids[2][:n], ids[3])
    base = _status_mb("VmRSS")  # VmHWM cannot be reset; the child is fresh, so its HWM so far ~ base
    out: dict = {}
    t0 = time.perf_counter()
    if task == "eval_rank":
        r = evaluate_rank(data["qg"], *ids, max_rank=50)
        out = {"cmc": r["cmc"].tolist(), "mAP": r["mAP"]}
    elif task == "eval_features":
        r = evaluate_features(data["qf"], data["gf"], *ids, max_rank=50)
        out = {"cmc": r["cmc"].tolist(), "mAP": r["mAP"]}
    elif task == "eval_torchreid":
        cmc, m_ap = _torchreid_module("metrics/rank.py").eval_market1501(data["qg"], *ids, 50)
        out = {"cmc": np.asarray(cmc).tolist(), "mAP": float(m_ap)}
    elif task == "eval_cython":
        cmc, m_ap = _torchreid_cython()(data["qg"], *ids, 50, False)
        out = {"cmc": np.asarray(cmc).tolist(), "mAP": float(m_ap)}
    else:
        if task == "rerank_reference":
            tr = _torchreid_module("utils/rerank.py")
            dist = tr.re_ranking(data["qg"], data["qq"], data["gg"], k1=20, k2=6, lambda_value=0.3)
        elif task == "rerank_dense":
            dist = re_ranking(data["qg"], data["qq"], data["gg"], k1=20, k2=6, lambda_value=0.3)
        else:
            dist = re_ranking_features(data["qf"], data["gf"], k1=20, k2=6, lambda_value=0.3)
        out["seconds"] = time.perf_counter() - t0
        np.save(os.path.join(workdir, f"out_{task}.npy"), dist)
    out.setdefault("seconds", time.perf_counter() - t0)
    out["peak_rss_mb"] = _status_mb("VmHWM")
    out["peak_rise_mb"] = out["peak_rss_mb"] - base
    conn.send(out)
    conn.close()


def _measure_once(task: str, workdir: str, kwargs: dict) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(task, workdir, kwargs, child))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError as e:
        proc.join()
        raise BenchmarkError(f"measured subprocess {task!r} died (exit code {proc.exitcode}; out of memory?)") from e
    proc.join()
    return result


def measure(tasks: dict[str, tuple[str, dict]], workdir: str, repeat: int) -> dict[str, dict]:
    """Run every ``tasks[name] = (task, kwargs)`` in a fresh subprocess once per round, ``repeat``
    rounds (interleaved, so load from others on a shared machine hits all alike). Per name: the result
    of the fastest run, all its times, and the largest peaks."""
    runs: dict[str, list[dict]] = {name: [] for name in tasks}
    for _ in range(repeat):
        for name, (task, kwargs) in tasks.items():
            load = os.getloadavg()[0]  # a shared machine: how busy it was when this run started
            runs[name].append({**_measure_once(task, workdir, kwargs), "load_1m": load})
    out = {}
    for name, rs in runs.items():
        best = dict(min(rs, key=lambda r: r["seconds"]))
        best["all_seconds"] = [round(r["seconds"], 3) for r in rs]
        best["all_load_1m"] = [round(r["load_1m"], 2) for r in rs]
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        best["peak_rise_mb"] = max(r["peak_rise_mb"] for r in rs)
        out[name] = best
    return out


def _save(workdir: str, arrays: dict) -> None:
    for k, v in arrays.items():
        np.save(os.path.join(workdir, f"{k}.npy"), v)


def _clear(workdir: str) -> None:
    for f in os.listdir(workdir):
        os.remove(os.path.join(workdir, f))


def _diffs(ours: dict, ref: dict) -> dict:
    return {"max_abs_diff_cmc": float(np.max(np.abs(np.asarray(ours["cmc"]) - np.asarray(ref["cmc"])))),
            "abs_diff_mAP": abs(ours["mAP"] - ref["mAP"])}


# ------------------------------------------------------------------------------------------------ run
def _eval_rows(size: str, workdir: str, repeat: int, ref_queries: int | None) -> list[dict]:
    from slsr_ray.evaluate import evaluate_rank

    cfg = SIZES[size]
    nq, ng = cfg["eval"]
    data = make_inputs(nq, ng, seed=0, dim=cfg["dim"])
    difficulty = check_difficulty(data)
    _save(workdir, data)
    write_distances(workdir, "qg", data["qf"], data["gf"])
    ids = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    del data
    n_ref = min(ref_queries or nq, nq)
    got = measure({"ref": ("eval_torchreid", {"num_queries": n_ref if n_ref < nq else None}),
                   "eval_rank": ("eval_rank", {}), "eval_features": ("eval_features", {})}, workdir, repeat)
    ref = got["ref"]
    ref_s = ref["seconds"] * nq / n_ref
    if n_ref < nq:  # our numbers on the same queries, for the comparison
        qg = np.load(os.path.join(workdir, "qg.npy"), mmap_mode="r")
        sub = evaluate_rank(np.array(qg[:n_ref]), ids[0][:n_ref], ids[1], ids[2][:n_ref], ids[3])
        cmp = {"cmc": sub["cmc"], "mAP": sub["mAP"]}
        note = f"torchreid timed on {n_ref}/{nq} queries, time extrapolated linearly; diffs on those queries"
    else:
        cmp, note = None, ""
    peer_mem = {"peer_peak_rss_mb": ref["peak_rss_mb"], "peer_peak_rise_mb": ref["peak_rise_mb"]}
    if n_ref < nq:
        peer_mem["peer_full_size_bytes_est"] = torchreid_eval_bytes(nq, ng)
    rows, results = [], {}
    for task, label in (("eval_rank", "evaluate_rank (distance matrix in)"),
                        ("eval_features", "evaluate_features (features in, blocks)")):
        ours = results[task] = got[task]
        rows.append({
            "name": f"{label} {nq}x{ng}", "ours_s": ours["seconds"], "ours_all_s": ours["all_seconds"],
            "peer": "torchreid eval_market1501 (Python)", "peer_s": ref_s, "ratio": ref_s / ours["seconds"],
            "peak_rss_mb": ours["peak_rss_mb"], "peak_rise_mb": ours["peak_rise_mb"], **peer_mem,
            **_diffs(cmp or ours, ref), "R1": ours["cmc"][0], "mAP": ours["mAP"], "dim": cfg["dim"],
            "input_check": difficulty, "note": note,
        })
    if _torchreid_cython() is not None and n_ref == nq:
        cy = measure({"cy": ("eval_cython", {})}, workdir, repeat)["cy"]
        rows.append({"name": f"evaluate_rank {nq}x{ng}", "ours_s": rows[0]["ours_s"],
                     "peer": "torchreid evaluate_cy (Cython)", "peer_s": cy["seconds"],
                     "ratio": cy["seconds"] / rows[0]["ours_s"], **_diffs(results["eval_rank"], cy)})
    elif _torchreid_cython() is None:
        rows[0]["note"] = (rows[0]["note"] + "; " if rows[0]["note"] else "") + (
            "torchreid's Cython evaluator does not import (rank_cylib not built in the pip wheel)")
    _clear(workdir)
    return rows


def _rerank_rows(size: str, workdir: str, repeat: int) -> list[dict]:
    from slsr_ray.evaluate import compute_distance_matrix, evaluate_rank

    cfg = SIZES[size]
    nq, ng = cfg["rerank"]
    data = make_inputs(nq, ng, seed=1, dim=cfg["dim"])
    difficulty = check_difficulty(data)
    data["qg"] = compute_distance_matrix(data["qf"], data["gf"])
    data["qq"] = compute_distance_matrix(data["qf"], data["qf"])
    data["gg"] = compute_distance_matrix(data["gf"], data["gf"])
    _save(workdir, data)
    ids = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    got = measure({t: (t, {}) for t in ("rerank_reference", "rerank_dense", "rerank_features")}, workdir, repeat)
    ref = got["rerank_reference"]
    ref_dist = np.load(os.path.join(workdir, "out_rerank_reference.npy"))
    ref_eval = evaluate_rank(ref_dist, *ids)
    plain = evaluate_rank(data["qg"], *ids)
    rows = []
    for task, label in (("rerank_dense", "re_ranking (dense, exact)"), ("rerank_features", "re_ranking_features")):
        ours = got[task]
        dist = np.load(os.path.join(workdir, f"out_{task}.npy"))
        ev = evaluate_rank(dist, *ids)
        rows.append({
            "name": f"{label} {nq}x{ng}", "ours_s": ours["seconds"], "ours_all_s": ours["all_seconds"],
            "peer": "torchreid re_ranking", "peer_s": ref["seconds"], "peer_all_s": ref["all_seconds"],
            "ratio": ref["seconds"] / ours["seconds"], "ours_all_load_1m": ours["all_load_1m"],
            "peer_all_load_1m": ref["all_load_1m"],
            "peak_rss_mb": ours["peak_rss_mb"], "peak_rise_mb": ours["peak_rise_mb"],
            "peer_peak_rss_mb": ref["peak_rss_mb"], "peer_peak_rise_mb": ref["peak_rise_mb"],
            "max_abs_diff_dist": float(np.max(np.abs(dist - ref_dist))),
            "max_abs_diff_cmc": float(np.max(np.abs(ev["cmc"] - ref_eval["cmc"]))),
            "mAP_diff_points": 100 * (ev["mAP"] - ref_eval["mAP"]), "R1": float(ev["cmc"][0]),
            "mAP": ev["mAP"], "mAP_reference": ref_eval["mAP"], "mAP_no_rerank": plain["mAP"],
            "R1_no_rerank": float(plain["cmc"][0]), "dim": cfg["dim"], "input_check": difficulty,
            "note": "reference time excludes building its 3 distance matrices" if task == "rerank_features" else "",
        })
    _clear(workdir)
    return rows


def _msmt17_rerank_row(workdir: str, repeat: int) -> dict:
    """Feature re-ranking at MSMT17 size; torchreid's dense version cannot run here (memory stated)."""
    from slsr_ray.evaluate import evaluate_features, evaluate_rank

    nq, ng = SIZES["msmt17"]["eval"]
    data = make_inputs(nq, ng, seed=0, dim=SIZES["msmt17"]["dim"])
    _save(workdir, data)
    ids = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    plain = evaluate_features(data["qf"], data["gf"], *ids)
    del data
    ours = measure({"rr": ("rerank_features", {})}, workdir, repeat)["rr"]
    dist = np.load(os.path.join(workdir, "out_rerank_features.npy"))
    ev = evaluate_rank(dist, *ids)
    del dist
    need = torchreid_rerank_bytes(nq + ng)
    _clear(workdir)
    return {
        "name": f"re_ranking_features {nq}x{ng}", "ours_s": ours["seconds"], "ours_all_s": ours["all_seconds"],
        "peer": "torchreid re_ranking", "peer_s": float("nan"), "ratio": float("nan"),
        "peak_rss_mb": ours["peak_rss_mb"], "peak_rise_mb": ours["peak_rise_mb"],
        "peer_peak_bytes_est": need, "R1": float(ev["cmc"][0]), "mAP": ev["mAP"],
        "R1_no_rerank": float(plain["cmc"][0]), "mAP_no_rerank": plain["mAP"], "dim": SIZES["msmt17"]["dim"],
        "note": f"torchreid's dense re-ranking not run: it needs ~{need / GIB:.0f} GiB (N = {nq + ng}: "
                "original_dist, V, V_qe float32 and its argsort, N^2 each) on a 24 GB machine",
    }


PARTS = ("eval", "rerank")


def run(size: str = "small", max_ref_queries: int | None = None, repeat: int | None = None,
        parts: tuple[str, ...] = PARTS) -> list[dict]:
    """Benchmark rows for ``size``. ``max_ref_queries`` times torchreid's Python evaluator on the first N
    queries only and extrapolates linearly (said in the row); ``repeat``: runs per measurement (min kept);
    ``parts``: which rows (``eval``: the evaluators, ``rerank``: the re-rankings)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    cfg = SIZES[size]
    repeat = repeat or cfg["repeat"]
    ref_queries = max_ref_queries or cfg["ref_queries"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_", dir=os.environ.get("BENCH_TMP")) as workdir:
        if "eval" in parts:
            rows += _eval_rows(size, workdir, repeat, ref_queries)
        if "rerank" in parts:
            if cfg["rerank"] is not None:
                rows += _rerank_rows(size, workdir, repeat)
            else:
                rows.append(_msmt17_rerank_row(workdir, repeat))
    for r in rows:
        r["part"] = "rerank" if "re_ranking" in r["name"] else "eval"
    return rows


def _kept_rows(size: str, parts: tuple[str, ...]) -> list[dict]:
    """Rows of the parts not rerun now, from the previous JSON (each keeps its ``measured_at``)."""
    from common import RESULTS

    path = RESULTS / ("evaluate.json" if size == "small" else f"evaluate_{size}.json")
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    kept = []
    for r in old.get("rows", []):
        part = r.get("part") or ("rerank" if "re_ranking" in r.get("name", "") else "eval")
        if part not in parts:
            kept.append({**r, "part": part, "measured_at": r.get("measured_at", old.get("measured_at", "unknown"))})
    return kept


def main(argv: list[str] | None = None) -> list[dict]:
    parser = size_parser(__doc__, SIZES)
    parser.add_argument("--max-ref-queries", type=int, default=None,
                        help="time torchreid's Python evaluator on this many queries and extrapolate")
    parser.add_argument("--repeat", type=int, default=None, help="runs per measurement (the minimum is kept)")
    parser.add_argument("--part", choices=PARTS, default=None,
                        help="run only these rows; the other part's rows are kept from the previous JSON")
    args = parser.parse_args(argv)
    size = chosen_size(args)
    parts = (args.part,) if args.part else PARTS
    cols = ["name", "ours_s", "peer", "peer_s", "ratio", "peak_rss_mb", "peer_peak_rss_mb", "R1", "mAP",
            "max_abs_diff_cmc", "abs_diff_mAP", "mAP_diff_points", "max_abs_diff_dist"]
    rows = run(size, args.max_ref_queries, args.repeat, parts)
    return report("evaluate", size, _kept_rows(size, parts) + rows, cols)


if __name__ == "__main__":
    main()
