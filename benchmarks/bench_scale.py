"""The whole pipeline at 100, 300, 1,000 and 1,500 training identities: time, memory and artifacts per stage.

Runs the real pipeline (``run_pipeline`` with the ``scale`` preset: resnet18 at 128x64, one epoch per
training stage, one GAN epoch, K in {2, 3}, no baselines, re-ranking on) on synthetic datasets in the
Market-1501 proportions, one fresh run root per size, and records for every stage:

* ``seconds``: the stage marker's own timing (``_STAGE.json``, :func:`slsr_ray.stages.read_record`); the
  report is timed around ``write_report``;
* ``images`` and ``img_s``: the images the stage processes (see :data:`STAGE_DRIVER`) per second;
* ``driver_rss_peak_mb``: the driver's RSS, ``worker_rss_peak_mb``: the largest single Ray worker process
  (any process whose command line is a Ray worker: tasks, actors, Ray Train and Ray Data workers) with its
  process title, ``ray_rss_peak_mb``: all Ray processes together (raylet, GCS, workers; shared pages are
  counted once per process, so it overstates), all sampled with psutil every ``INTERVAL`` s over the
  driver's process tree while the stage runs;
* ``store_peak_mb``: the object store's bytes in use (the raylet's ``GetNodeStats`` reply,
  ``store_stats.object_store_bytes_used``, what ``ray memory --stats-only`` prints), polled every
  ``STORE_INTERVAL`` s; ``spilled_mb`` what Ray spilled to disk by the end of the stage;
* ``artifact_bytes`` / ``artifact_files``: everything under the stage's folder of the run root when done;
* ``load_avg``: the mean 1-minute load average while the stage ran (the machine is shared).

Dataset of size N (N = train identities): ``make_synthetic(num_ids=2N, cams=6, images_per_id=17,
num_distractors=round(3.72 N), num_junk=round(5.09 N), gt_bbox=False)``: half the ids train (17 images
each, Market has 17.2), half test (about 3 queries and 14 gallery images each; Market 4.5 and 17.5), plus
Market's distractors (2,793 for 751 ids) and junk (3,819). ``generate.count`` = round(0.928 x train
images), the paper's 12,000 for Market's 12,936. The dataset is built once per size under
``<workdir>/data/n<N>`` (timed as ``synth_s``, not a pipeline stage).

Per stage the growth exponent a (time ~ x^a) is fitted by least squares on log-log over the sizes present,
x being the stage's driver quantity (train images for most; the test images for evaluate; generated
images for generate; real + generated for train). Since every quantity grows in proportion to N here, a is
the exponent in N too. The fit extrapolates to Market-1501 and MSMT17 by those quantities (MSMT17 has
29 images per id, so images, not ids, are what it is extrapolated by).

    python benchmarks/bench_scale.py --sizes 100 300           # writes results/scale.json, scale.png
    python benchmarks/bench_scale.py --sizes 1000 --workdir /tmp/slsr-scale
    python benchmarks/bench_scale.py --report                  # fits, plot and the table from the JSON

Sizes already in the JSON are skipped (``--force`` reruns them); the JSON is written after each size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

from common import RESULTS, ROOT, check_rows

SIZES = (100, 300, 1000, 1500)
PRESET = "scale"
IMAGES_PER_ID = 17
CAMS = 6
# Market-1501: 751 train ids, 12,936 train images; 750 test ids, 3,368 queries, 19,732 gallery images of
# which 2,793 distractors (pid 0) and 3,819 junk (pid -1); MSMT17: 1,041 train ids, 30,248 train images,
# 11,659 queries, 82,161 gallery images.
DISTRACTORS_PER_ID = 2793 / 751
JUNK_PER_ID = 3819 / 751
GENERATED_PER_REAL = 12000 / 12936
TARGETS = {
    "market1501": {"train_ids": 751, "train": 12936, "test": 3368 + 19732, "generated": 12000},
    "msmt17": {"train_ids": 1041, "train": 30248, "test": 11659 + 82161, "generated": 30000},
}
# what a stage's work grows with: train images, test (query + gallery) images, generated, train + generated
STAGE_DRIVER = {"prepare": "all", "pretrain": "train", "extract": "train", "cluster": "train", "gan": "train",
                "generate": "generated", "train": "train+generated", "evaluate": "test", "report": "train"}
INTERVAL = 0.5
STORE_INTERVAL = 2.0
MB = 1024 * 1024


def size_overrides(n: int) -> list[str]:
    """The ``--set`` overrides of size N (N train identities, Market proportions)."""
    return [
        f"data.synthetic.num_ids={2 * n}", f"data.synthetic.cams={CAMS}",
        f"data.synthetic.images_per_id={IMAGES_PER_ID}",
        f"data.synthetic.num_distractors={round(DISTRACTORS_PER_ID * n)}",
        f"data.synthetic.num_junk={round(JUNK_PER_ID * n)}",
        f"generate.count={max(1, round(GENERATED_PER_REAL * IMAGES_PER_ID * n))}",
    ]


# ------------------------------------------------------------------------------------------ sampling


class Sampler(threading.Thread):
    """Samples the driver's process tree (psutil) and the object store until :meth:`stop`."""

    def __init__(self, interval: float = INTERVAL, store_interval: float = STORE_INTERVAL):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.interval, self.store_interval = interval, store_interval
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self._store_state = None
        self._last_store = (0.0, None, None)

    def _store(self) -> tuple[float | None, float | None]:
        """(bytes in use, bytes spilled so far) of the object store, or (None, None)."""
        import ray
        from ray._private import internal_api

        try:
            if self._store_state is None:
                self._store_state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
            reply = internal_api.get_memory_info_reply(self._store_state)
            return float(reply.store_stats.object_store_bytes_used), float(reply.store_stats.spilled_bytes_total)
        except Exception:  # noqa: BLE001 - a missed poll is a missing sample, not an error
            return None, None

    def sample(self) -> dict:
        ps = self.psutil
        now = time.time()
        row = {"t": now, "load": os.getloadavg()[0], "driver": self.me.memory_info().rss, "worker": 0,
               "worker_name": "", "ray_total": 0}
        with contextlib.suppress(ps.Error):
            for p in self.me.children(recursive=True):
                with contextlib.suppress(ps.Error):
                    cmd = " ".join(p.cmdline())
                    rss = p.memory_info().rss
                    row["ray_total"] += rss
                    is_worker = "default_worker.py" in cmd or cmd.startswith("ray::")
                    if is_worker and rss > row["worker"]:
                        row["worker"], row["worker_name"] = rss, cmd.split(" ")[0][:60]
        if now - self._last_store[0] >= self.store_interval:
            used, spilled = self._store()
            self._last_store = (now, used, spilled)
            row["store"], row["spilled"] = used, spilled
        return row

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(Exception):
                self.samples.append(self.sample())
            self._halt.wait(self.interval)

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join(10)
        return self.samples


def window(samples: list[dict], start: float, end: float) -> dict:
    """Peaks of the samples taken in [start, end] (the nearest sample when the stage was shorter)."""
    inside = [s for s in samples if start <= s["t"] <= end]
    if not inside and samples:
        inside = [min(samples, key=lambda s: abs(s["t"] - (start + end) / 2))]
    if not inside:
        return {}
    top = max(inside, key=lambda s: s["worker"])
    store = [s["store"] for s in inside if s.get("store") is not None]
    spilled = [s["spilled"] for s in inside if s.get("spilled") is not None]
    return {
        "driver_rss_peak_mb": round(max(s["driver"] for s in inside) / MB, 1),
        "worker_rss_peak_mb": round(top["worker"] / MB, 1),
        "worker_peak_process": top["worker_name"],
        "ray_rss_peak_mb": round(max(s["ray_total"] for s in inside) / MB, 1),
        "store_peak_mb": round(max(store) / MB, 1) if store else None,
        "spilled_mb": round(max(spilled) / MB, 1) if spilled else None,
        "load_avg": round(sum(s["load"] for s in inside) / len(inside), 2),
        "samples": len(inside),
    }


# ------------------------------------------------------------------------------------------ one size


def folder_size(path: str) -> tuple[int, int]:
    """(bytes, files) under a local folder."""
    total = files = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, name))
                files += 1
    return total, files


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def build_dataset(cfg, root: str) -> tuple[dict, float]:
    """The size's synthetic dataset under ``root`` (built once); returns its summary and build seconds."""
    from slsr_ray.data import make_synthetic
    from slsr_ray.data.synthetic import SUMMARY_FILE

    summary_file = os.path.join(root, SUMMARY_FILE)
    if os.path.exists(summary_file):
        return json.loads(Path(summary_file).read_text()), 0.0
    s = cfg.data.synthetic
    t0 = time.perf_counter()
    summary = make_synthetic(root, num_ids=s.num_ids, cams=s.cams, images_per_id=s.images_per_id, seed=s.seed,
                             size=(s.height, s.width), num_distractors=s.num_distractors, num_junk=s.num_junk,
                             gt_bbox=False)
    return summary, time.perf_counter() - t0


def run_size(n: int, workdir: str, overrides: list[str] = (), echo=print) -> dict:
    """Run the pipeline at size ``n`` in a fresh run root; returns the size's record."""
    import pyarrow.parquet as pq

    from slsr_ray.layout import RunLayout
    from slsr_ray.pipeline import USES_GENERATED, load_config, plan, run_pipeline
    from slsr_ray.report import write_report
    from slsr_ray.stages import read_record

    run_root = os.path.join(workdir, f"run-n{n}")
    data_root = os.path.join(workdir, "data", f"n{n}")
    cfg = load_config(PRESET, [*size_overrides(n), *overrides, f"data.root={data_root}"], run_root=run_root)
    dataset, synth_s = build_dataset(cfg, data_root)
    shutil.rmtree(run_root, ignore_errors=True)  # a fresh run root: every stage runs and is timed
    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    try:
        run_pipeline(cfg, echo=echo, report=False)
        t_report = time.time()
        write_report(cfg, echo=lambda *a, **k: None)
        t_end = time.time()
    finally:
        samples = sampler.stop()
    run = RunLayout(run_root)
    rows = {split: pq.ParquetFile(run.split(split)).metadata.num_rows for split in ("train", "query", "gallery")}
    generated = cfg.generate.count
    driver_images = {"all": sum(rows.values()), "train": rows["train"], "test": rows["query"] + rows["gallery"],
                     "generated": generated}
    stages: dict[str, dict] = {}
    keys = [key for key, _ in plan(cfg)]
    for key in keys:
        rec = read_record(run_root, key)
        family = key.split("/")[0]
        epochs = {"pretrain": cfg.pretrain.epochs, "gan": cfg.gan.epochs, "train": cfg.train.epochs}.get(family, 1)
        gen = generated if family == "train" and key.split("/")[-1] in USES_GENERATED else 0
        images = (rows["train"] + gen) * epochs if family == "train" else driver_images[
            STAGE_DRIVER[family]] * epochs
        nbytes, nfiles = folder_size(run.stage(key))
        stages[key] = {"seconds": rec.seconds, "images": images, "img_s": round(images / rec.seconds, 2),
                       "artifact_bytes": nbytes, "artifact_files": nfiles,
                       **window(samples, _ts(rec.started), _ts(rec.finished))}
    nbytes, nfiles = folder_size(run.report)
    stages["report"] = {"seconds": round(t_end - t_report, 3), "images": None, "img_s": None,
                        "artifact_bytes": nbytes, "artifact_files": nfiles, **window(samples, t_report, t_end)}
    watch = {  # single artifacts the issue asks about
        "manifest_bytes": {s: os.path.getsize(run.split(s)) for s in rows},
        "features_bytes": folder_size(run.features)[0],
        "generated_manifest_bytes": os.path.getsize(run.generated_manifest) if os.path.exists(run.generated_manifest) else None,
    }
    cluster_rec = read_record(run_root, "cluster")
    if cluster_rec:
        watch["membership_bytes"] = os.path.getsize(cluster_rec.outputs["membership"])
        watch["assignments_bytes"] = os.path.getsize(cluster_rec.outputs["assignments"])
        watch["k"] = cluster_rec.outputs["k"]
    return {
        "n_ids": n,
        "dataset": {"train_images": rows["train"], "query": rows["query"], "gallery": rows["gallery"],
                    "test_ids": dataset.get("num_test_ids"), "generated": generated,
                    "synth_s": round(synth_s, 1), "dataset_bytes": folder_size(data_root)[0]},
        "stages": stages,
        "total_s": round(t_end - t0, 1),
        "driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "watch": watch,
        "overrides": [*size_overrides(n), *overrides],
        "commit": _commit(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "run_root": run_root,
    }


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "slsr_ray"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------ analysis


def fit_exponent(xs: list[float], ys: list[float]) -> dict | None:
    """Least squares of log y = a log x + b; None with fewer than two distinct x."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x and y and x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    lx = [math.log(x) for x, _ in pts]
    ly = [math.log(y) for _, y in pts]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((u - mx) ** 2 for u in lx)
    a = sum((u - mx) * (v - my) for u, v in zip(lx, ly, strict=True)) / sxx
    b = my - a * mx
    return {"a": round(a, 3), "log_c": b, "points": len(pts)}


def _driver_value(size: dict, family: str) -> float:
    d = size["dataset"]
    return {"all": d["train_images"] + d["query"] + d["gallery"], "train": d["train_images"],
            "test": d["query"] + d["gallery"], "generated": d["generated"],
            "train+generated": d["train_images"] + d["generated"]}[STAGE_DRIVER[family]]


def _target_value(target: dict, family: str) -> float:
    return {"all": target["train"] + target["test"], "train": target["train"], "test": target["test"],
            "generated": target["generated"], "train+generated": target["train"] + target["generated"]}[
        STAGE_DRIVER[family]]


def analyse(results: dict) -> dict:
    """Per stage: the exponent of time (and of peak worker RSS, artifact bytes) in its driver quantity,
    and the time extrapolated to Market-1501 and MSMT17."""
    sizes = [results["sizes"][k] for k in sorted(results["sizes"], key=int)]
    keys = list(dict.fromkeys(k for s in sizes for k in s["stages"]))
    fits, extrap = {}, {t: {} for t in TARGETS}
    for key in keys:
        family = key.split("/")[0]
        have = [s for s in sizes if key in s["stages"]]
        xs = [_driver_value(s, family) for s in have]
        fit = {"driver": STAGE_DRIVER[family]}
        for metric in ("seconds", "worker_rss_peak_mb", "artifact_bytes"):
            f = fit_exponent(xs, [s["stages"][key].get(metric) for s in have])
            fit[metric] = f["a"] if f else None
            if metric == "seconds" and f:
                for t, target in TARGETS.items():
                    extrap[t][key] = float(f"{math.exp(f['log_c']) * _target_value(target, family) ** f['a']:.3g}")
        fits[key] = fit
    total = fit_exponent([s["n_ids"] for s in sizes], [s["total_s"] for s in sizes])
    fits["total"] = {"driver": "train ids", "seconds": total["a"] if total else None}
    for t in TARGETS:
        extrap[t]["total"] = float(f"{sum(extrap[t].values()):.3g}") if extrap[t] else None
    return {"fits": fits, "extrapolation_s": extrap}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [results["sizes"][k] for k in sorted(results["sizes"], key=int)]
    keys = list(dict.fromkeys(k for s in sizes for k in s["stages"]))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for key in keys:
        pts = [(s["n_ids"], s["stages"][key]["seconds"]) for s in sizes if key in s["stages"]]
        a = results.get("fits", {}).get(key, {}).get("seconds")
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{key}" + (f" (a={a:.2f})" if a is not None else ""))
    ax.plot([s["n_ids"] for s in sizes], [s["total_s"] for s in sizes], "k--", marker="s", label="total")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("train identities N (17 images each)")
    ax.set_ylabel("stage wall time (s)")
    ax.set_title("slsr-ray pipeline, scale preset, 2 CPUs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    """The RESULTS.md tables: per size and stage, time / throughput / memory / artifacts; then the fits."""
    sizes = [results["sizes"][k] for k in sorted(results["sizes"], key=int)]
    keys = list(dict.fromkeys(k for s in sizes for k in s["stages"]))
    lines = ["| N ids | train / test imgs | stage | s | img/s | driver MB | largest worker MB | object store MB "
             "| artifacts MB (files) | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sizes:
        d = s["dataset"]
        for key in keys:
            r = s["stages"].get(key)
            if r is None:
                continue
            store = "" if r.get("store_peak_mb") is None else f"{r['store_peak_mb']:.0f}"
            img_s = "" if r["img_s"] is None else f"{r['img_s']:.0f}"
            lines.append(
                f"| {s['n_ids']:,} | {d['train_images']:,} / {d['query'] + d['gallery']:,} | {key} | {r['seconds']:.1f} "
                f"| {img_s} | {r.get('driver_rss_peak_mb', 0):.0f} "
                f"| {r.get('worker_rss_peak_mb', 0):.0f} | {store} "
                f"| {r['artifact_bytes'] / MB:.1f} ({r['artifact_files']:,}) | {r.get('load_avg', '')} |")
        lines.append(f"| {s['n_ids']:,} | | **total** | **{s['total_s']:.0f}** | | {s['driver_maxrss_mb']:.0f} (max) "
                     f"| | | | {s['load_avg_end'][0]} |")
    fits, ex = results.get("fits", {}), results.get("extrapolation_s", {})
    lines += ["", "| stage | grows with | a (time) | a (worker RSS) | a (artifact bytes) | Market-1501 (s) "
              "| MSMT17 (s) |", "|---|---|---|---|---|---|---|"]
    for key in [*keys, "total"]:
        f = fits.get(key, {})

        def fmt(v):
            return "" if v is None else f"{v:.2f}"

        lines.append(f"| {key} | {f.get('driver', '')} | {fmt(f.get('seconds'))} | {fmt(f.get('worker_rss_peak_mb'))} "
                     f"| {fmt(f.get('artifact_bytes'))} | {ex.get('market1501', {}).get(key, '')} "
                     f"| {ex.get('msmt17', {}).get(key, '')} |")
    return "\n".join(lines)


def _flat_rows(results: dict) -> list[dict]:
    """One row per size and stage in the benchmarks' row form (for :func:`common.check_rows`)."""
    rows = []
    for s in results["sizes"].values():
        for key, r in s["stages"].items():
            rows.append({"name": f"scale n={s['n_ids']} {key}", "ours_s": r["seconds"],
                         **{k: v for k, v in r.items() if k.endswith(("_mb", "_bytes")) and v is not None}})
    return rows


# ------------------------------------------------------------------------------------------ driver


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"preset": PRESET, "sizes": {}}


def save_results(results: dict, path: Path) -> None:
    import platform

    import ray
    import torch

    results.update(analyse(results))
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "ray": ray.__version__}
    results["mapping"] = {"ids": "N train ids = make_synthetic(num_ids=2N): N train + N test ids",
                          "images_per_id": IMAGES_PER_ID, "cams": CAMS,
                          "distractors_per_train_id": round(DISTRACTORS_PER_ID, 3),
                          "junk_per_train_id": round(JUNK_PER_ID, 3),
                          "generated_per_real_train_image": round(GENERATED_PER_REAL, 4), "gt_bbox": False}
    check_rows(_flat_rows(results))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(path)


def run(sizes, workdir: str, out: Path, force: bool = False, overrides: list[str] = (),
        plot_path: Path | None = None, echo=print) -> dict:
    """Run each size not yet in ``out`` (all with ``force``), saving ``out`` after each."""
    from slsr_ray.raysetup import init_ray

    results = load_results(out)
    os.makedirs(workdir, exist_ok=True)
    init_ray(run_root=workdir, quiet=True)
    for n in sizes:
        if str(n) in results["sizes"] and not force:
            echo(f"[scale] n={n}: in {out} already (skipped; --force reruns it)")
            continue
        echo(f"[scale] n={n}: running, load average {os.getloadavg()}")
        results["sizes"][str(n)] = run_size(n, workdir, list(overrides), echo=echo)
        save_results(results, out)
        echo(f"[scale] n={n}: {results['sizes'][str(n)]['total_s']} s; wrote {out}")
    if plot_path is not None and results["sizes"]:
        plot(results, plot_path)
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="train identities per size")
    p.add_argument("--workdir", default="/tmp/slsr-scale", help="datasets and run roots go here")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "scale.png")
    p.add_argument("--force", action="store_true", help="rerun sizes already in the JSON")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    p.add_argument("--report", action="store_true", help="only refit, plot and print the table from the JSON")
    args = p.parse_args(argv)
    if args.report:
        results = load_results(args.out)
        save_results(results, args.out)
        plot(results, args.plot)
    else:
        results = run(args.sizes, args.workdir, args.out, args.force, args.overrides, args.plot,
                      echo=lambda line: print(time.strftime("%H:%M:%S"), line, flush=True))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
