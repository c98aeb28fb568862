"""Every benchmark in one place: ours vs the peer measured in the same run, as a ratio.

    python benchmarks/run_all.py --size small            # a few minutes on a laptop
    python benchmarks/run_all.py --size market --only evaluate kmeans
    python benchmarks/run_all.py --scaling               # also the scaling curves (evaluation, k-means)

Each ``benchmarks/bench_<name>.py`` exposes ``run(size) -> list[dict]`` (rows with ``name``,
``ours_s``, ``peer``, ``peer_s``, ``ratio`` and extras such as peak memory or max abs difference).
Results go to ``benchmarks/results/all-<size>.json`` with machine info, and the table between the
``BENCH-TABLE`` markers of ``benchmarks/README.md`` is regenerated.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("evaluate", "kmeans", "extract", "train", "gan")
RESULTS = HERE / "results"


def machine_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def run_bench(name: str, size: str) -> list[dict]:
    sys.path.insert(0, str(HERE))
    module = importlib.import_module(f"bench_{name}")
    t0 = time.perf_counter()
    rows = module.run(size)
    for r in rows:
        r.setdefault("bench", name)
        r["bench_wall_s"] = round(time.perf_counter() - t0, 2)
    return rows


def scaling_curves(out_png: Path) -> dict:
    """Time vs gallery size (evaluation) and vs N (k-means): ours only, plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from slsr_ray.cluster import kmeans
    from slsr_ray.evaluate import evaluate_rank

    rng = np.random.default_rng(0)
    curves: dict = {"evaluate": [], "kmeans": []}
    for g in (2_000, 5_000, 10_000, 20_000):
        q = 1_000
        dist = rng.random((q, g), dtype=np.float32)
        qp, gp = rng.integers(0, 500, q), rng.integers(0, 500, g)
        qc, gc = rng.integers(0, 6, q), rng.integers(0, 6, g)
        t0 = time.perf_counter()
        evaluate_rank(dist, qp, gp, qc, gc)
        curves["evaluate"].append((g, time.perf_counter() - t0))
    for n in (5_000, 10_000, 20_000, 40_000):
        X = rng.standard_normal((n, 256)).astype(np.float32)
        t0 = time.perf_counter()
        kmeans(X, 8, n_init=1, max_iter=20, seed=0)
        curves["kmeans"].append((n, time.perf_counter() - t0))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (name, pts), xl in zip(axes, curves.items(), ("gallery size (1,000 queries)", "N (d=256, K=8)"), strict=True):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(name)
        ax.set_xlabel(xl)
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    return curves


def markdown_table(rows: list[dict]) -> str:
    lines = ["| bench | case | ours (s) | peer | peer (s) | ratio | notes |", "|---|---|---|---|---|---|---|"]
    skip = {"bench", "name", "ours_s", "peer", "peer_s", "ratio", "bench_wall_s"}
    for r in rows:
        notes = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in skip)
        fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
        lines.append(
            f"| {r.get('bench')} | {r.get('name')} | {fmt(r.get('ours_s'))} | {r.get('peer')} | "
            f"{fmt(r.get('peer_s'))} | {fmt(r.get('ratio'))} | {notes} |"
        )
    return "\n".join(lines)


def update_readme(table: str, size: str, info: dict) -> None:
    readme = HERE / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n\n<!-- BENCH-TABLE -->\n<!-- /BENCH-TABLE -->\n"
    start, end = "<!-- BENCH-TABLE -->", "<!-- /BENCH-TABLE -->"
    block = f"{start}\nSize `{size}`, {info['cpus']} CPUs, {info['platform']}, torch {info['torch']}" \
            f"{', GPU ' + info['cuda'] if info['cuda'] else ''}:\n\n{table}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=("small", "market", "msmt17"))
    p.add_argument("--only", nargs="*", choices=BENCHES, default=list(BENCHES))
    p.add_argument("--scaling", action="store_true", help="also time the scaling curves")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    info = machine_info()
    rows, failures = [], {}
    for name in args.only:
        print(f"== {name} ({args.size})", flush=True)
        try:
            rows += run_bench(name, args.size)
        except Exception as e:  # one broken benchmark must not hide the others
            failures[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    out = {"size": args.size, "machine": info, "rows": rows, "failures": failures}
    if args.scaling:
        out["scaling"] = scaling_curves(RESULTS / "scaling.png")
    (RESULTS / f"all-{args.size}.json").write_text(json.dumps(out, indent=2, default=str))
    table = markdown_table(rows)
    print(table)
    if not args.no_readme:
        update_readme(table, args.size, info)
    if failures:
        print(f"failed: {failures}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
