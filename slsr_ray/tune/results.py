"""The sweep's results: tables per (lambda, count), heatmaps, CSV/JSON, the best config."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np

from .. import storage
from ..config import from_dict, to_dict
from ..layout import RunLayout, SweepLayout
from ..pipeline import USES_GENERATED, PipelineConfig
from .config import SweepConfig, SweepResults
from .search import lr_values

log = logging.getLogger("slsr_ray.tune")


def table_cells(rows: list[dict], sweep: SweepConfig) -> dict[tuple, dict]:
    """(lr, lam, K, count) -> {rank1, mAP, n, status}: repeated points averaged; the 0-image baseline
    (independent of K and lambda) fills the count-0 column of every K and lambda."""
    cells: dict[tuple, dict] = {}
    for lr, lam, k, n in itertools.product(lr_values(sweep), sorted(set(sweep.lams)), sorted(set(sweep.ks)),
                                           sorted(set(sweep.generated))):
        match = [r for r in rows if r["generated"] == n and (r["lr"] == lr)
                 and (n == 0 or (r["k"] == k and math.isclose(r["lam"], lam)))]
        ok = [r for r in match if r["status"] != "failed" and r["val_mAP"] is not None]
        if ok:
            cells[(lr, lam, k, n)] = {
                "rank1": float(np.mean([r["val_rank1"] for r in ok])), "mAP": float(np.mean([r["val_mAP"] for r in ok])),
                "n": len(ok), "status": "stopped" if all(r["status"] == "stopped" for r in ok) else "done",
            }
        elif match:
            cells[(lr, lam, k, n)] = {"rank1": None, "mAP": None, "n": 0, "status": "failed"}
        else:
            cells[(lr, lam, k, n)] = {"rank1": None, "mAP": None, "n": 0, "status": "not run"}
    return cells


def format_tables(cells: dict[tuple, dict], sweep: SweepConfig) -> str:
    """Markdown tables like the paper's Table 4: rows K, columns generated count, cells R1 / mAP (%),
    one table per lambda (and lr)."""
    out = []
    counts = sorted(set(sweep.generated))
    for lr in lr_values(sweep):
        for lam in sorted(set(sweep.lams)):
            title = f"lambda = {lam:g}" + (f", lr = {lr:g}" if lr is not None else "")
            out.append(f"**{title}** (validation rank-1 / mAP, %)\n")
            out.append("| K | " + " | ".join(str(n) for n in counts) + " |")
            out.append("|---|" + "---|" * len(counts))
            for k in sorted(set(sweep.ks)):
                vals = []
                for n in counts:
                    c = cells[(lr, lam, k, n)]
                    if c["mAP"] is None:
                        vals.append(c["status"])
                    else:
                        mark = " (stopped early)" if c["status"] == "stopped" else ""
                        vals.append(f"{100 * c['rank1']:.2f} / {100 * c['mAP']:.2f}{mark}")
                out.append(f"| {k} | " + " | ".join(vals) + " |")
            out.append("")
    return "\n".join(out)


def plot_heatmaps(cells: dict[tuple, dict], sweep: SweepConfig) -> bytes:
    """PNG: one heatmap of validation mAP per (lambda, lr), K x generated count; failed cells blank."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(lr, lam) for lr in lr_values(sweep) for lam in sorted(set(sweep.lams))]
    ks, counts = sorted(set(sweep.ks)), sorted(set(sweep.generated))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 1.4 * len(counts) * len(panels), 1.2 + 0.7 * len(ks)),
                             squeeze=False)
    for ax, (lr, lam) in zip(axes[0], panels, strict=True):
        grid = np.full((len(ks), len(counts)), np.nan)
        for i, k in enumerate(ks):
            for j, n in enumerate(counts):
                c = cells[(lr, lam, k, n)]
                if c["mAP"] is not None:
                    grid[i, j] = 100 * c["mAP"]
                ax.text(j, i, "failed" if c["status"] == "failed" else
                        ("" if c["mAP"] is None else f"{100 * c['rank1']:.1f}\n{100 * c['mAP']:.1f}"),
                        ha="center", va="center", fontsize=8)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(counts)), [str(n) for n in counts])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("generated images")
        ax.set_ylabel("K")
        ax.set_title(f"val R1/mAP, lambda {lam:g}" + (f", lr {lr:g}" if lr is not None else ""), fontsize=9)
        fig.colorbar(im, ax=ax, label="mAP %")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _write_csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    cols = ["trial_id", "k", "lam", "generated", "lr", "repeat", "status", "val_rank1", "val_mAP", "epochs", "seconds", "error"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in cols})
    return buf.getvalue()


def best_row(rows: list[dict]) -> dict | None:
    """The finished trial with the highest validation mAP (ties: rank-1)."""
    ok = [r for r in rows if r["status"] == "done" and r["val_mAP"] is not None] or \
         [r for r in rows if r["status"] == "stopped" and r["val_mAP"] is not None]
    return max(ok, key=lambda r: (r["val_mAP"], r["val_rank1"])) if ok else None


def best_config(cfg: PipelineConfig, best: dict, sweep: SweepConfig) -> PipelineConfig:
    """The pipeline config that retrains ``best`` on the full training set under ``sweep/best``."""
    layout = SweepLayout(cfg.run_root)
    raw = to_dict(cfg)
    raw["run_root"] = layout.best
    raw["data"]["manifests"] = RunLayout(layout.source).stage("prepare")  # the full train + the real test split
    raw["train"]["lam"] = best["lam"]
    if best["lr"] is not None:
        raw["train"]["lr"] = best["lr"]
    if best["generated"] > 0:
        raw["cluster"]["k"] = best["k"]
        raw["cluster"]["ks"] = [best["k"]]
        raw["generate"]["count"] = best["generated"]
    else:  # the best is the real-images-only baseline
        if raw["train"]["strategy"] in USES_GENERATED:
            raw["train"]["strategy"] = "none"
        raw["baselines"] = [b for b in raw["baselines"] if b not in USES_GENERATED]
    return from_dict(PipelineConfig, raw)


def _best_yaml(best_cfg: PipelineConfig, best: dict) -> str:
    import yaml

    head = (f"# best point of the sweep: K={best['k']} lambda={best['lam']:g} generated={best['generated']}"
            + (f" lr={best['lr']:g}" if best["lr"] is not None else "")
            + f"\n# validation rank-1 {100 * best['val_rank1']:.2f}%  mAP {100 * best['val_mAP']:.2f}%"
            + "\n# rerun with: slsr run --config <this file>\n")
    return head + yaml.safe_dump(to_dict(best_cfg), sort_keys=False)


def write_results(cfg: PipelineConfig, sweep: SweepConfig, rows: list[dict], timings: dict, built: list[str],
                  echo=print) -> SweepResults:
    """Write results.csv / results.md / results.json / heatmap.png / best.yaml under ``sweep/``."""
    layout = SweepLayout(cfg.run_root)
    cells = table_cells(rows, sweep)
    table = format_tables(cells, sweep)
    best = best_row(rows)
    failed = [r for r in rows if r["status"] == "failed"]
    md = ["# SLSR sweep", "", table]
    if failed:
        md += ["## Failed trials", ""] + [f"- {r['trial_id']} K={r['k']} lambda={r['lam']:g} n={r['generated']}"
                                          f" lr={r['lr']}: {r['error']}" for r in failed] + [""]
    if best:
        md += [f"Best: K={best['k']} lambda={best['lam']:g} generated={best['generated']}"
               + (f" lr={best['lr']:g}" if best["lr"] is not None else "")
               + f" (val mAP {100 * best['val_mAP']:.2f}%)", ""]
    md += [f"Shared stages {timings['shared_s']:.1f}s, trials {timings['trials_s']:.1f}s "
           f"({100 * timings['shared_fraction']:.0f}% shared)", ""]
    files = {
        "csv": layout.results("results.csv"),
        "markdown": layout.results("results.md"),
        "json": layout.results("results.json"),
        "heatmap": layout.results("heatmap.png"),
    }
    storage.write_text(files["csv"], _write_csv(rows))
    storage.write_text(files["markdown"], "\n".join(md))
    cell_list = [{"lr": lr, "lam": lam, "k": k, "generated": n, **c} for (lr, lam, k, n), c in cells.items()]
    storage.write_json(files["json"], {"rows": rows, "cells": cell_list, "best": best, "timings": timings,
                                       "built": built, "sweep": to_dict(sweep)})
    storage.write_bytes(files["heatmap"], plot_heatmaps(cells, sweep))
    if best:
        files["best"] = layout.results("best.yaml")
        storage.write_text(files["best"], _best_yaml(best_config(cfg, best, sweep), best))
    echo(table)
    if failed:
        echo(f"[sweep] {len(failed)} trial(s) failed: " + "; ".join(f"{r['trial_id']}: {r['error']}" for r in failed))
    return SweepResults(rows=rows, best=best, table=table, files=files, timings=timings, built=built)
