"""The run report: what a person looks at after a run (``report/`` under the run root).

Written by :func:`write_report` (the pipeline calls it at the end of every run; ``slsr report RUN_ROOT``
rewrites it from the artifacts):

    report/summary.json      metrics, silhouette, training histories, timings, figure index (machine-readable)
    report/report.md         tables and the figures, section by section of the method
    report/report.html       the same page self-contained (figures inlined as base64), for users without Jupyter
    report/<figure>.png      every figure of :mod:`slsr_ray.figures` the run's artifacts allow
    tensorboard/<name>/      TensorBoard event files of each training's per-epoch history (``pretrain``, strategies)

and, when ``MLFLOW_TRACKING_URI`` is set and mlflow is installed (``pip install 'slsr-ray[mlflow]'``), one
MLflow run with the config as params, the metrics and the report as artifacts (:func:`log_to_mlflow`).
Every plotted value is read back from the stage artifacts, so the pictures always show the run's numbers.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import tempfile

from . import figures as figs
from . import layout, storage
from .layout import RunLayout
from .stages import read_record

log = logging.getLogger("slsr_ray.report")

METRIC_COLUMNS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
# Lists longer than this are left out of summary.json's copy of a figure's data (e.g. PCA points).
MAX_LIST_IN_SUMMARY = 1000


def collect(cfg) -> dict:
    """Gather metrics, silhouette scores, training curves and timings from a run's artifacts."""
    run_root = cfg.run_root
    summary: dict = {"name": cfg.name, "run_root": run_root, "strategies": list(cfg.strategies), "metrics": {},
                     "timings": {}, "training": {}}
    keys = ["prepare", "pretrain", "extract", "cluster", "gan", "generate"]
    keys += [f"train/{s}" for s in cfg.strategies] + [f"evaluate/{s}" for s in cfg.strategies]
    for key in keys:
        rec = read_record(run_root, key)
        if rec is not None:
            summary["timings"][key] = rec.seconds
    for s in cfg.strategies:
        rec = read_record(run_root, f"evaluate/{s}")
        if rec is not None:
            summary["metrics"][s] = rec.outputs
    summary["training"] = figs.training_histories(run_root, list(cfg.strategies))
    rec = read_record(run_root, "cluster")
    if rec is not None:
        summary["silhouette"] = {str(k): float(v) for k, v in rec.outputs["silhouette"].items()}
        summary["k"] = rec.outputs["k"]
        membership = storage.read_json(rec.outputs["membership"])
        summary["clusters"] = [{"cluster": c["cluster"], "size": c["size"], "num_ids": len(c["pids"])}
                               for c in membership["clusters"]]
    rec = read_record(run_root, "gan")
    if rec is not None:
        run = RunLayout(run_root)
        summary["gan_samples"] = [run.gan_samples(c) for c in layout.gan_clusters(run.gan)]
    return summary


def metrics_table(summary: dict) -> str:
    """A Markdown table: one row per strategy and evaluation mode, values in %."""
    head = "| strategy | re-ranking | R1 | R5 | R10 | R20 | mAP | mINP |\n|---|---|---|---|---|---|---|---|"
    return "\n".join([head] + ["| " + " | ".join(r) + " |" for r in _metric_rows(summary)])


def _metric_rows(summary: dict) -> list[list[str]]:
    rows = []
    for strategy, modes in summary["metrics"].items():
        for mode in ("plain", "rerank"):
            if mode in modes:
                m = modes[mode]
                rows.append([strategy, "yes" if mode == "rerank" else "no"] + [f"{100 * m[c]:.2f}" for c in METRIC_COLUMNS])
    return rows


# ------------------------------------------------------------------------------------------ page layout

SECTIONS = (
    ("Dataset", "The identities as each camera sees them (the `prepare` stage's manifests).", ("dataset_samples",)),
    ("Step 1-3: pretrain, extract, cluster",
     "A ResNet trained with cross-entropy on the real identities embeds every training image; k-means groups "
     "the embeddings into K clusters of similar-looking people, K chosen by the average silhouette.",
     ("silhouette", "feature_pca")),
    ("Step 4-5: one DCGAN per cluster",
     "Each cluster gets its own DCGAN; the images it generates belong to no identity, only to the cluster.",
     ("gan_vs_real",)),
    ("Labels of generated images",
     "LSRO spreads a generated image's label over all identities; SLSR only over the identities of its cluster.",
     ("label_distributions",)),
    ("Step 6: training", "The pretraining and the final training of every label strategy.", ("training",)),
    ("Step 7: retrieval", "Rank-k matching rate and mAP on the query/gallery split, with and without k-reciprocal "
     "re-ranking.", ("cmc", "ranked_gallery")),
)


def report_blocks(summary: dict, figures: dict[str, figs.Figure]) -> list[tuple]:
    """The page as blocks: ("h1"|"h2"|"p"|"code", text), ("table", header, rows), ("figure", Figure)."""
    blocks: list[tuple] = [("h1", f"SLSR run report: {summary['name']}"), ("code", summary["run_root"])]
    if summary["metrics"]:
        blocks += [("h2", "Retrieval metrics (%)"),
                   ("table", ["strategy", "re-ranking", "R1", "R5", "R10", "R20", "mAP", "mINP"], _metric_rows(summary))]
    for title, text, names in SECTIONS:
        present = [figures[n] for n in names if n in figures]
        extra = []
        if names[0] == "silhouette" and "silhouette" in summary:
            extra.append(("table", ["K", "average silhouette (%)"],
                          [[k, f"{100 * v:.2f}"] for k, v in sorted(summary["silhouette"].items(), key=lambda kv: int(kv[0]))]))
            extra.append(("p", f"Chosen K = {summary['k']}; clusters (images / identities): "
                          + ", ".join(f"c{c['cluster']}: {c['size']} / {c['num_ids']}" for c in summary.get("clusters", []))))
        if not present and not extra:
            continue
        blocks += [("h2", title), ("p", text), *extra]
        for f in present:
            blocks += [("h3", f.title), ("figure", f), ("p", f.caption)]
    if summary["timings"]:
        rows = [[k, f"{v:.1f}"] for k, v in summary["timings"].items()]
        rows.append(["**total**", f"{sum(summary['timings'].values()):.1f}"])
        blocks += [("h2", "Time per stage"), ("table", ["stage", "seconds"], rows)]
    if summary.get("tensorboard"):
        blocks += [("h2", "TensorBoard"), ("code", f"tensorboard --logdir {RunLayout(summary['run_root']).tensorboard}")]
    return blocks


def render_markdown(blocks: list[tuple]) -> str:
    """Markdown with the figures linked as ``<name>.png`` beside the page."""
    lines = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + rest[0], ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "code":
            lines += [f"`{rest[0]}`", ""]
        elif kind == "table":
            header, rows = rest
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]
        elif kind == "figure":
            lines += [f"![{rest[0].title}]({rest[0].name}.png)", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f3f3f3;padding:.1em .3em}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"""


def render_html(blocks: list[tuple]) -> str:
    """One self-contained HTML page: the figures are inlined as base64 PNGs."""
    body = []
    title = next((b[1] for b in blocks if b[0] == "h1"), "SLSR run report")
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(rest[0])}</p>")
        elif kind == "code":
            body.append(f"<p><code>{html.escape(rest[0])}</code></p>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c).strip('*'))}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "figure":
            f = rest[0]
            b64 = base64.b64encode(f.png).decode("ascii")
            body.append(f'<img alt="{html.escape(f.title)}" src="data:image/png;base64,{b64}">')
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _compact(data):
    """A figure's data for summary.json, without the long lists (point clouds, paths)."""
    if isinstance(data, dict):
        return {k: _compact(v) for k, v in data.items()
                if not (isinstance(v, list) and len(v) > MAX_LIST_IN_SUMMARY)}
    return data


# ------------------------------------------------------------------------------------------ trackers


def write_tensorboard(run_root: str, histories: dict[str, list[dict]], metrics: dict | None = None) -> dict[str, str]:
    """TensorBoard event files of each training's per-epoch history under ``<run_root>/tensorboard/<name>/``
    (numeric keys as ``train/<key>`` at step = epoch; final retrieval metrics as ``eval/<mode>/<metric>``).
    Rewrites the folders, so rerunning the report does not duplicate points. Returns ``{name: folder}``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # the tensorboard package is a dependency; a broken env still gets its report
        log.warning("TensorBoard logs skipped: %s (pip install tensorboard)", e)
        return {}
    out = {}
    metrics = metrics or {}
    with tempfile.TemporaryDirectory(prefix="slsr-tb-") as tmp:
        for name, history in histories.items():
            local = os.path.join(tmp, name)
            writer = SummaryWriter(log_dir=local)
            last = 0
            for i, epoch in enumerate(history):
                last = int(epoch.get("epoch", i))
                for key, value in epoch.items():
                    if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                        writer.add_scalar(f"train/{key}", float(value), last)
            for mode, values in metrics.get(name, {}).items():
                for key in METRIC_COLUMNS:
                    if key in values:
                        writer.add_scalar(f"eval/{mode}/{key}", float(values[key]), last)
            writer.close()
            dest = storage.join(RunLayout(run_root).tensorboard, name)
            storage.remove(dest)
            for fname in sorted(os.listdir(local)):
                with open(os.path.join(local, fname), "rb") as fh:
                    storage.write_bytes(storage.join(dest, fname), fh.read())
            out[name] = dest
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def log_to_mlflow(summary: dict, experiment: str | None = None) -> str | None:
    """Log a run's summary to MLflow when ``MLFLOW_TRACKING_URI`` is set and mlflow is importable: the
    run's config.json as params, retrieval metrics (``<strategy>/<mode>/<metric>``), per-epoch training
    values (``train/<name>/<key>`` at step = epoch), silhouettes, stage seconds, and ``report/`` as
    artifacts. Experiment: ``experiment``, else ``MLFLOW_EXPERIMENT_NAME``, else ``slsr-ray``. Returns the
    MLflow run id, or None when MLflow is not configured."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    try:
        import mlflow
    except ImportError:
        log.warning("MLFLOW_TRACKING_URI is set but mlflow is not installed: pip install 'slsr-ray[mlflow]'")
        return None
    run_root = summary["run_root"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", "slsr-ray"))
    with mlflow.start_run(run_name=summary["name"]) as run:
        mlflow.set_tags({"run_root": run_root, "strategies": ",".join(summary.get("strategies", []))})
        params = _flatten(figs.run_config(run_root))
        items = sorted(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(items[i : i + 100]))
        final = {}
        for strategy, modes in summary["metrics"].items():
            for mode, values in modes.items():
                final.update({f"{strategy}/{mode}/{k}": float(values[k]) for k in METRIC_COLUMNS if k in values})
        final.update({f"silhouette/k{k}": float(v) for k, v in summary.get("silhouette", {}).items()})
        final.update({f"seconds/{k}": float(v) for k, v in summary["timings"].items()})
        if final:
            mlflow.log_metrics(final)
        for name, history in summary["training"].items():
            for i, epoch in enumerate(history):
                values = {f"train/{name}/{k}": float(v) for k, v in epoch.items()
                          if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)}
                mlflow.log_metrics(values, step=int(epoch.get("epoch", i)))
        report_dir = RunLayout(run_root).report
        with tempfile.TemporaryDirectory(prefix="slsr-mlflow-") as tmp:
            for fname in storage.listdir(report_dir):
                with open(os.path.join(tmp, fname), "wb") as fh:
                    fh.write(storage.read_bytes(storage.join(report_dir, fname)))
            mlflow.log_artifacts(tmp, artifact_path="report")
        return run.info.run_id


# ------------------------------------------------------------------------------------------ entry point


def write_report(cfg, echo=print) -> dict:
    """Write ``report/`` (summary.json, report.md, report.html, figure PNGs) and the TensorBoard logs for a
    run, log it to MLflow when configured, print the metrics table; returns the summary dict."""
    summary = collect(cfg)
    out = RunLayout(cfg.run_root).report
    evaluated = [s for s in cfg.strategies if f"evaluate/{s}" in summary["timings"]]
    options = {"training": {"strategies": list(cfg.strategies)}, "cmc": {"strategies": list(cfg.strategies)},
               "ranked_gallery": {"strategy": (evaluated or cfg.strategies)[0]}}  # the main method when evaluated
    made = {f.name: f for f in figs.all_figures(cfg.run_root, options)}
    for f in made.values():
        storage.write_bytes(storage.join(out, f"{f.name}.png"), f.png)
    summary["figures"] = {
        name: {"file": f"{name}.png", "title": f.title, "width": f.size[0], "height": f.size[1], "bytes": len(f.png),
               "data": _compact(f.data)}
        for name, f in made.items()
    }
    summary["tensorboard"] = write_tensorboard(cfg.run_root, summary["training"], summary["metrics"])
    blocks = report_blocks(summary, made)
    storage.write_json(storage.join(out, layout.REPORT_SUMMARY), summary)
    storage.write_text(storage.join(out, "report.md"), render_markdown(blocks))
    storage.write_text(storage.join(out, "report.html"), render_html(blocks))
    run_id = log_to_mlflow(summary)
    if run_id:
        summary["mlflow_run_id"] = run_id
        storage.write_json(storage.join(out, layout.REPORT_SUMMARY), summary)
        echo(f"[slsr] MLflow run {run_id} at {_redact(os.environ.get('MLFLOW_TRACKING_URI', ''))}")
    if summary["metrics"]:
        echo("")
        echo(metrics_table(summary))
    echo(f"\n[slsr] report: {storage.join(out, 'report.md')} (+ report.html, {len(made)} figures)")
    return summary


def _redact(uri: str) -> str:
    """A tracking URI without ``user:token@`` (never print credentials)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri
