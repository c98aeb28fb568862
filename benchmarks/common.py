"""What every ``bench_*.py`` script shares: its command line, the checks on its figures, the printed
table and the JSON file."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

#: Fractions (rank-1, mAP, ...) must lie in [0, 1].
FRACTION_KEYS = ("R1", "mAP", "mAP_reference", "mAP_no_rerank", "R1_no_rerank", "mINP")
#: Suffixes of durations, memory sizes, counts and speed ratios: never negative, never infinite.
NONNEGATIVE_SUFFIXES = ("_s", "_mb", "_bytes", "_bytes_est", "ratio", "_iters", "_img_s", "_per_iter_ms")


class BenchmarkError(RuntimeError):
    """A benchmark produced a figure that cannot be right (or inputs that would make it meaningless)."""


def size_parser(doc: str, sizes) -> argparse.ArgumentParser:
    """``bench_x.py [small|market|...]`` (``--size`` works too)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("size", nargs="?", default=None, choices=sorted(sizes))
    p.add_argument("--size", dest="size_opt", default=None, choices=sorted(sizes))
    return p


def chosen_size(args) -> str:
    return args.size or args.size_opt or "small"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def check_rows(rows: list[dict]) -> None:
    """BenchmarkError naming the row and key of any impossible figure: a negative, infinite or zero
    duration, a negative memory size / count / ratio, a fraction outside [0, 1]. NaN is allowed only
    where the row's note says why (a peer that could not run)."""
    for r in rows:
        where = f"benchmark row {r.get('name', '?')!r} ({r.get('peer', '')})"
        for key, v in r.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if math.isnan(v):
                if not r.get("note"):
                    raise BenchmarkError(f"{where}: {key} is NaN and the row has no note saying why")
                continue
            if key in FRACTION_KEYS and not 0.0 <= v <= 1.0:
                raise BenchmarkError(f"{where}: {key} = {v} is not a fraction in [0, 1]")
            if key.endswith(NONNEGATIVE_SUFFIXES) and (v < 0 or math.isinf(v)):
                raise BenchmarkError(f"{where}: {key} = {v}; expected a finite value >= 0")
            if key in ("ours_s", "peer_s") and v == 0:
                raise BenchmarkError(f"{where}: {key} = 0 s; a measured run cannot take no time")


def report(name: str, size: str, rows: list[dict], cols: list[str]) -> list[dict]:
    """Check ``rows`` (:func:`check_rows`), print them as a table (notes below their row), record the
    machine load and the time, write ``results/<name>[_<size>].json``."""
    check_rows(rows)
    load = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    rows = [{**r, "load_avg_1m": r.get("load_avg_1m", load)} for r in rows]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(_fmt(r.get(c, "")) for c in cols))
        if r.get("note"):
            print(f"    note: {r['note']}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (f"{name}.json" if size == "small" else f"{name}_{size}.json")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path.write_text(json.dumps({"size": size, "measured_at": stamp, "rows": rows}, indent=2, default=str))
    print(f"wrote {path}")
    return rows
