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
BENCHES = ("evaluate", "kmeans", "extract", "train", "gan", "search")
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
    from common import check_rows

    check_rows(rows)  # a negative or impossible figure fails this benchmark, loudly
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for r in rows:
        r.setdefault("bench", name)
        r["bench_wall_s"] = round(time.perf_counter() - t0, 2)
        r["measured_at"] = stamp
    return rows


def scaling_curves(out_png: Path) -> dict:
    """How our time grows: evaluation and re-ranking with gallery size, k-means with N and with the
    number of Ray tasks (shards), extraction with the number of Ray Data actors. Plotted to one PNG."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from slsr_ray.cluster import kmeans
    from slsr_ray.evaluate import evaluate_rank, re_ranking_features
    from slsr_ray.raysetup import init_ray

    rng = np.random.default_rng(0)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return round(time.perf_counter() - t0, 3)

    curves: dict = {"evaluate vs gallery": [], "re-ranking vs gallery": [], "k-means vs N": [],
                    "k-means vs Ray tasks": [], "extraction vs actors": []}
    for g in (2_000, 5_000, 10_000, 20_000):
        q = 1_000
        dist = rng.random((q, g), dtype=np.float32)
        qp, gp, qc, gc = rng.integers(0, 500, q), rng.integers(0, 500, g), rng.integers(0, 6, q), rng.integers(0, 6, g)
        curves["evaluate vs gallery"].append((g, timed(lambda: evaluate_rank(dist, qp, gp, qc, gc))))  # noqa: B023
    for g in (1_000, 2_000, 4_000):
        qf, gf = rng.standard_normal((250, 128)).astype(np.float32), rng.standard_normal((g, 128)).astype(np.float32)
        curves["re-ranking vs gallery"].append((g, timed(lambda: re_ranking_features(qf, gf))))  # noqa: B023
    init_ray()
    for n in (5_000, 10_000, 20_000, 40_000):
        X = rng.standard_normal((n, 256)).astype(np.float32)
        curves["k-means vs N"].append((n, timed(lambda: kmeans(X, 8, n_init=1, max_iter=20, seed=0))))  # noqa: B023
    X = rng.standard_normal((40_000, 256)).astype(np.float32)
    for shards in (1, 2, 4):
        curves["k-means vs Ray tasks"].append(
            (shards, timed(lambda: kmeans(X, 8, n_init=1, max_iter=20, seed=0, num_shards=shards)))  # noqa: B023
        )
    from slsr_ray.data import load_dataset, make_synthetic
    from slsr_ray.extract import ExtractConfig, extract_features
    from slsr_ray.models import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic(tmp + "/data", num_ids=60, cams=4, images_per_id=10, seed=0)
        train = load_dataset("market1501", tmp + "/data").train
        model = ModelConfig(backbone="resnet18", num_classes=30)
        for actors in (1, 2):
            cfg = ExtractConfig(batch_size=32, num_actors=actors, height=128, width=64, cpus_per_actor=0.5,
                                decode_cpus=0.25)
            curves["extraction vs actors"].append(
                (actors, timed(lambda: extract_features(train, model, f"{tmp}/f{actors}", cfg)))  # noqa: B023
            )
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.3))
    for ax, (name, pts) in zip(axes, curves.items(), strict=True):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    return curves


def kept_rows(path: Path, rerun: list[str]) -> list[dict]:
    """Rows of the benchmarks *not* rerun now, from the previous ``all-<size>.json`` (each keeps its
    ``measured_at``), so ``--only kmeans`` does not drop the other benchmarks' numbers."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    stamp = old.get("measured_at", "unknown")
    return [{**r, "measured_at": r.get("measured_at", stamp)} for r in old.get("rows", [])
            if r.get("bench") not in rerun]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| bench | case | ours (s) | peer | peer (s) | ratio | notes |", "|---|---|---|---|---|---|---|"]
    skip = {"bench", "name", "ours_s", "peer", "peer_s", "ratio", "bench_wall_s", "ours_all_s", "peer_all_s",
            "input_check"}
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
    p.add_argument("--only-scaling", action="store_true", help="only the scaling curves")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    info = machine_info()
    rows, failures = [], {}
    if args.only_scaling:
        args.only = []
    for name in args.only:
        print(f"== {name} ({args.size})", flush=True)
        try:
            rows += run_bench(name, args.size)
        except Exception as e:  # one broken benchmark must not hide the others
            failures[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    path = RESULTS / f"all-{args.size}.json"
    rows = kept_rows(path, args.only) + rows
    out = {"size": args.size, "machine": info, "rows": rows, "failures": failures}
    path.write_text(json.dumps(out, indent=2, default=str))  # before the curves: keep what is measured
    if args.scaling or args.only_scaling:
        try:
            out["scaling"] = scaling_curves(RESULTS / "scaling.png")
        except Exception as e:
            failures["scaling"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        path.write_text(json.dumps(out, indent=2, default=str))
    table = markdown_table(rows)
    print(table)
    if not args.no_readme:
        update_readme(table, args.size, info)
    if failures:
        print(f"failed: {failures}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
