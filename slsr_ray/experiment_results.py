"""Tables and figures of ``slsr experiment`` (see :mod:`slsr_ray.experiment`), computed only from the
finished points' ``point.json`` records.

Statistics per table row, over the seeds that finished: the mean and the sample standard deviation
(ddof 1) of R1 / mAP / mINP in %, and the paired difference against the real-only baseline trained with
the same seed (mean, std, and the two-sided paired t-test of :func:`scipy.stats.ttest_rel`). With 3 seeds
the test has 2 degrees of freedom: only large, consistent differences reach p < 0.05, and a p-value
says nothing about the variance of the shared upstream stages (one pretrained model, one set of GANs).
"""

from __future__ import annotations

import io
import math
from datetime import UTC, datetime

import numpy as np

from . import storage
from .stages import read_record

METRICS = ("rank1", "mAP", "mINP")
SHOWN = {"rank1": "R1", "mAP": "mAP", "mINP": "mINP"}
CURVES = {"k": "K (number of clusters, Table 2)", "lambda": "lambda for generated images",
          "generated": "number of generated images (Table 4), in multiples of the real training images"}


def _stat(values: list[float]) -> dict:
    n = len(values)
    std = float(np.std(values, ddof=1)) if n >= 2 else None
    return {"mean": float(np.mean(values)) if n else None, "std": std, "values": values, "n": n}


def paired_test(x: list[float], ref: list[float]) -> dict:
    """Mean and std of x - ref and the paired t-test's t and two-sided p (None when n < 2 or the
    differences are all equal, where the test is undefined)."""
    from scipy.stats import ttest_rel

    d = [a - b for a, b in zip(x, ref, strict=True)]
    out = {**_stat(d), "t": None, "p": None}
    if len(d) >= 2 and max(d) > min(d):
        res = ttest_rel(x, ref)
        out["t"], out["p"] = float(res.statistic), float(res.pvalue)
    return out


def summarize_row(row, exp, records: dict[str, dict], mode: str) -> dict:
    """Mean/std of each metric over the row's finished seeds and the paired difference to ``none``."""
    from .experiment import row_points

    got, pairs = {m: [] for m in METRICS}, {m: ([], []) for m in METRICS}
    seeds, paired_seeds, ids = [], [], []
    for point, ref in row_points(row):
        pid, rid = exp.point_id(point), exp.point_id(ref)
        ids.append({"seed": point.seed, "point": pid, "reference": rid})
        if pid not in records:
            continue
        seeds.append(point.seed)
        for m in METRICS:
            got[m].append(100 * records[pid]["metrics"][mode][m])
        if rid in records:
            paired_seeds.append(point.seed)
            for m in METRICS:
                pairs[m][0].append(100 * records[pid]["metrics"][mode][m])
                pairs[m][1].append(100 * records[rid]["metrics"][mode][m])
    return {
        "group": row.group, "label": row.label, "strategy": row.strategy, "value": row.value,
        "overrides": list(row.overrides), "reference_overrides": list(row.ref_overrides), "seeds": seeds,
        "paired_seeds": paired_seeds, "points": ids,
        "metrics": {m: _stat(got[m]) for m in METRICS},
        "vs_none": {m: paired_test(*pairs[m]) for m in METRICS},
    }


# ------------------------------------------------------------------------------------------- Markdown


def _cell(s: dict) -> str:
    if not s["n"]:
        return "-"
    return f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["std"] is not None else "")


def _diff_cell(s: dict) -> str:
    if not s["n"]:
        return "-"
    text = f"{s['mean']:+.2f}" + (f" ± {s['std']:.2f}" if s["std"] is not None else "")
    return text + (f" (p={s['p']:.3f})" if s["p"] is not None else "")


def group_title(group: str, rows: list[dict]) -> str:
    if group == "strategy":
        return "Label strategies (Tables 3 and 5)"
    if group.startswith("variant:"):
        return f"Variant {group.split(':', 1)[1]} ({', '.join(rows[0]['overrides'])})"
    return f"Sensitivity: {CURVES.get(group, group)}"


def markdown_table(rows: list[dict]) -> str:
    head = ["row", "strategy", "n", *(SHOWN[m] for m in METRICS), *(f"Δ{SHOWN[m]} vs none" for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r["strategy"], str(len(r["seeds"]))]
        cells += [_cell(r["metrics"][m]) for m in METRICS] + [_diff_cell(r["vs_none"][m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(results: dict, figures: list[str]) -> str:
    by_group: dict[str, list[dict]] = {}
    for r in results["rows"]:
        by_group.setdefault(r["group"], []).append(r)
    seeds = sorted({s for r in results["rows"] for s in r["seeds"]})
    out = [
        "# slsr experiment", "",
        f"Config `{results['experiment']['config']}` with {results['experiment']['overrides'] or 'no overrides'}; "
        f"evaluation `{results['mode']}`; training seeds {seeds}; {len(results['points'])} finished trainings.",
        "",
        "Values in %: mean ± sample std over seeds (n). Δ: paired difference to the real-only baseline "
        "(`none`) trained with the same seed, with the two-sided paired t-test's p. n is small (3 seeds "
        "give 2 degrees of freedom): read p as a rough guide, not as proof. Seeds vary the final training "
        "only (weights, data order, augmentation); the upstream stages (step-1 model, clusters, GANs, "
        "generated images) are one shared sample.", "",
    ]
    for group, rows in by_group.items():
        out += [f"## {group_title(group, rows)}", "", markdown_table(rows), ""]
    if results.get("upstream"):
        out += ["## Shared upstream stages", "", upstream_table(results["upstream"]), ""]
    for name in figures:
        out += [f"![{name}]({name})", ""]
    return "\n".join(out)


def upstream_table(upstream: dict) -> str:
    lines = ["| upstream | K | rule | identities per cluster | generated | GAN diversity | GAN realism |",
             "|---|---|---|---|---|---|---|"]
    for name, u in upstream.items():
        gan = u.get("gan", {})
        div = ", ".join(f"{g['diversity']:.2f}" for g in gan.values()) or "-"
        real = ", ".join(f"{g['realism']:.2f}" for g in gan.values()) or "-"
        ids = ", ".join(str(n) for n in u.get("ids_per_cluster", [])) or "-"
        lines.append(f"| {name} | {u.get('k', '-')} | {u.get('rule', '-')} | {ids} | {u.get('generated', '-')} | "
                     f"{div} | {real} |")
    return "\n".join(lines)


def upstream_summary(root: str) -> dict:
    """K, membership and GAN quality (diversity, realism per cluster) of one upstream folder."""
    out: dict = {}
    rec = read_record(root, "cluster")
    if rec is not None:
        out["k"] = rec.outputs["k"]
        membership = storage.read_json(rec.outputs["membership"])
        out["rule"] = membership.get("rule")
        out["ids_per_cluster"] = [len(c["pids"]) for c in membership["clusters"]]
        out["label_spread"] = membership.get("label_spread")
    gan_json = storage.join(root, "gan", "gan.json")
    if read_record(root, "gan") is not None and storage.exists(gan_json):
        out["gan"] = {c: {"diversity": r["diversity"], "realism": r["realism"]}
                      for c, r in storage.read_json(gan_json)["clusters"].items() if "diversity" in r}
    rec = read_record(root, "generate")
    if rec is not None:
        out["generated"] = rec.outputs.get("count")
    return out


# ------------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def strategy_figure(rows: list[dict]) -> bytes | None:
    """Bars: mean ± std of R1 and mAP per strategy / variant row, each seed as a dot."""
    rows = [r for r in rows if r["group"] == "strategy" or r["group"].startswith("variant:")]
    rows = [r for r in rows if r["seeds"]]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.1 * len(rows) + 2) * 1.6, 3.8))
    labels = [r["label"] if r["group"] == "strategy" else f"{r['group'][8:]}:{r['label']}" for r in rows]
    x = np.arange(len(rows))
    for ax, m in zip(axes, ("rank1", "mAP"), strict=True):
        means = [r["metrics"][m]["mean"] for r in rows]
        stds = [r["metrics"][m]["std"] or 0.0 for r in rows]
        ax.bar(x, means, yerr=stds, capsize=4, color="#8fb3d9", edgecolor="#35608f")
        for i, r in enumerate(rows):
            ax.plot([i] * len(r["metrics"][m]["values"]), r["metrics"][m]["values"], "k.", ms=5)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_ylabel(f"{SHOWN[m]} (%)")
        ax.set_title(f"{SHOWN[m]}: mean ± std over seeds")
    return _png(fig)


def sensitivity_figure(rows: list[dict]) -> bytes | None:
    """One panel per curve (K, lambda, generated count): R1 and mAP mean ± std, with the base
    real-only baseline as a dashed line."""
    groups = [g for g in CURVES if any(r["group"] == g and r["seeds"] for r in rows)]
    if not groups:
        return None
    none = next((r for r in rows if r["group"] == "strategy" and r["strategy"] == "none" and r["seeds"]), None)
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.6), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        pts = sorted((r for r in rows if r["group"] == g and r["seeds"]), key=lambda r: r["value"])
        xs = [r["value"] for r in pts]
        for m, color in (("rank1", "#c0392b"), ("mAP", "#2c6fb0")):
            ax.errorbar(xs, [r["metrics"][m]["mean"] for r in pts], yerr=[r["metrics"][m]["std"] or 0 for r in pts],
                        marker="o", capsize=3, color=color, label=SHOWN[m])
            base = _baseline_on(none, {s for r in pts for s in r["seeds"]}, m)
            if base is not None:  # the real-only model at the curve's own seeds, not every seed's mean
                ax.axhline(base, ls="--", color=color, lw=1, alpha=0.7)
        ax.set_xlabel(CURVES[g].split(" (")[0].split(",")[0])
        ax.set_ylabel("%")
        varied = next((r["strategy"] for r in pts if r["strategy"] != "none"), pts[0]["strategy"] if pts else "")
        ax.set_title(f"{varied} vs {g} (dashed: none, same seeds)", fontsize=9)
        ax.legend(fontsize=8)
    return _png(fig)


def _baseline_on(none: dict | None, seeds: set[int], metric: str) -> float | None:
    """Mean of the real-only row's per-seed values at ``seeds`` (None when it has none of them)."""
    if none is None:
        return None
    values = [v for s, v in zip(none["seeds"], none["metrics"][metric]["values"], strict=True) if s in seeds]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------- writing


def _clean(x):
    """JSON-safe: NaN/inf become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_results(exp, rows, records: dict[str, dict]) -> dict:
    """Write ``experiment/results.json``, ``results.md`` and the figures; returns the results dict."""
    mode = exp.exp.mode
    summaries = [summarize_row(r, exp, records, mode) for r in rows]
    upstream = {}
    for rec in records.values():
        name = rec["upstream"]
        if name not in upstream:
            upstream[name] = upstream_summary(storage.join(exp.root, name) if name != "." else exp.root)
    results = _clean({
        "experiment": exp.describe(), "mode": mode, "written": datetime.now(UTC).isoformat(),
        "rows": summaries, "points": records, "upstream": upstream,
    })
    figures = []
    for name, png in (("strategies.png", strategy_figure(summaries)), ("sensitivity.png", sensitivity_figure(summaries))):
        if png is not None:
            storage.write_bytes(storage.join(exp.dir, name), png)
            figures.append(name)
    results["figures"] = figures
    storage.write_json(storage.join(exp.dir, "results.json"), results)
    storage.write_text(storage.join(exp.dir, "results.md"), render_markdown(results, figures))
    exp.echo(f"[experiment] results: {storage.join(exp.dir, 'results.md')} ({len(records)} trainings)")
    return results
