"""``slsr run``, ``slsr demo``, ``slsr status`` and ``slsr report``."""

from __future__ import annotations

import typer

from .. import storage
from ..config import ConfigError

SET_HELP = "override a config field, e.g. --set train.epochs=5 --set cluster.k=3 (repeatable)"


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2) from e


def run(
    config: str = typer.Option("synthetic", "--config", "-c", help="preset name or YAML path/URI"),
    run_root: str = typer.Option(None, "--run-root", "-o", help="local folder or s3://bucket/prefix"),
    overrides: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    from_stage: str = typer.Option(None, "--from", help="rerun this stage and everything after it"),
    until: str = typer.Option(None, "--until", help="stop after this stage"),
    address: str = typer.Option(None, "--address", help="Ray address (default: start a local Ray or use RAY_ADDRESS)"),
) -> None:
    """Run (or resume) the whole SLSR pipeline; with evaluate.trials > 1, once per protocol split
    (CUHK03 classic, VIPeR) and the mean±std over the trials."""
    from ..data import DatasetError
    from ..pipeline import load_config
    from ..raysetup import init_ray
    from ..trials import check_trials, run_protocol

    try:
        cfg = load_config(config, overrides, run_root)
        check_trials(cfg)
        init_ray(address)
        run_protocol(cfg, from_stage=from_stage, until=until)
    except (ConfigError, DatasetError, storage.StorageError) as e:
        _fail(e)


def demo(
    run_root: str = typer.Option("runs/demo", "--run-root", "-o"),
    overrides: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
) -> None:
    """The whole method on a small synthetic dataset on a local Ray (a few minutes on 2 CPUs)."""
    run(config="synthetic", run_root=run_root, overrides=overrides, from_stage=None, until=None, address=None)


def status(run_root: str = typer.Argument(..., help="the run root of a pipeline run")) -> None:
    """Which stages of a run are done, stale (config changed) or pending."""
    from ..pipeline import pipeline_status

    try:
        rows = pipeline_status(run_root)
    except (ConfigError, storage.StorageError) as e:
        _fail(e)
    typer.echo(f"{'stage':<22} {'state':<8} {'seconds':>8}  finished")
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        typer.echo(f"{r['stage']:<22} {r['state']:<8} {secs:>8}  {r['finished'] or ''}")


def report(run_root: str = typer.Argument(..., help="the run root of a pipeline run")) -> None:
    """(Re)write the run report (Markdown, JSON, PNG plots) from a run's artifacts."""
    from ..config import from_dict
    from ..pipeline import PipelineConfig
    from ..report import write_report

    try:
        cfg = from_dict(PipelineConfig, storage.read_json(storage.join(run_root, "config.json")))
        cfg.run_root = run_root
        write_report(cfg)
    except (ConfigError, storage.StorageError) as e:
        _fail(e)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("demo")(demo)
    app.command("status")(status)
    app.command("report")(report)
