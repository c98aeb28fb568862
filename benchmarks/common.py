"""What every ``bench_*.py`` script shares: its command line, the printed table and the JSON file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))


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


def report(name: str, size: str, rows: list[dict], cols: list[str]) -> list[dict]:
    """Print ``rows`` as a table (notes below their row), record the machine load, write
    ``results/<name>[_<size>].json``."""
    load = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    rows = [{**r, "load_avg_1m": r.get("load_avg_1m", load)} for r in rows]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(_fmt(r.get(c, "")) for c in cols))
        if r.get("note"):
            print(f"    note: {r['note']}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (f"{name}.json" if size == "small" else f"{name}_{size}.json")
    path.write_text(json.dumps({"size": size, "rows": rows}, indent=2, default=str))
    print(f"wrote {path}")
    return rows
