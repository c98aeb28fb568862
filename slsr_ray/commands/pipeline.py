"""``slsr run``, ``slsr check``, ``slsr demo``, ``slsr status`` and ``slsr report``.

Errors reach the user through the CLI's one error path (:mod:`slsr_ray.cli`): one line, exit 2.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import storage

SET_HELP = "override a config field, e.g. --set train.epochs=5 --set cluster.k=3 (repeatable)"
# the options `slsr run` and `slsr check` share (check = run --dry-run)
ConfigOption = Annotated[str, typer.Option("--config", "-c", help="preset name or YAML path/URI")]
RunRootOption = Annotated[str | None, typer.Option("--run-root", "-o", help="local folder or s3://bucket/prefix")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help=SET_HELP)]
FromOption = Annotated[str | None, typer.Option("--from", help="rerun this stage and everything after it")]
UntilOption = Annotated[str | None, typer.Option("--until", help="stop after this stage")]


def stage_plan(cfg, from_stage: str | None = None, until: str | None = None) -> list[dict]:
    """What ``run_pipeline`` would do with each stage key, by its rules: a stage whose marker holds
    the expected hash is skipped, ``--from`` forces its stage and everything after, ``--until`` stops
    after every key of its stage. Rows: ``{"stage", "action": "skip" | "run" | "-", "why"}``."""
    from ..pipeline import is_forced, plan, stage_hashes
    from ..stages import record_state

    hashes = stage_hashes(cfg)
    runs = {key for key, _ in plan(cfg, until)}
    exists = storage.exists(cfg.run_root)
    rows = []
    for key, _ in plan(cfg):
        if key not in runs:
            rows.append({"stage": key, "action": "-", "why": f"after --until {until}"})
            continue
        state = record_state(cfg.run_root, key, hashes[key])[0] if exists else "pending"
        if is_forced(key, from_stage):
            rows.append({"stage": key, "action": "run", "why": f"forced by --from {from_stage} (was {state})"})
        elif state == "done":
            rows.append({"stage": key, "action": "skip", "why": "done, config unchanged"})
        else:
            why = {"stale": "config changed since it ran", "corrupt": "its marker is damaged"}.get(state, "not run yet")
            rows.append({"stage": key, "action": "run", "why": why})
    return rows


def _checked_config(config: str, run_root: str | None, overrides: list[str], from_stage: str | None,
                    until: str | None):
    """The config, with everything it names checked (before Ray starts or anything is written)."""
    from ..pipeline import load_config
    from ..trials import check_trials
    from ..validate import validate_config

    cfg = load_config(config, overrides, run_root)
    validate_config(cfg, check_inputs=True, from_stage=from_stage, until=until)
    check_trials(cfg)
    return cfg


def _echo_plan(cfg, from_stage: str | None, until: str | None) -> None:
    typer.echo(f"config valid; run root {cfg.run_root}")
    words = {"skip": "done (skip)", "run": "would run", "-": "not run"}
    for r in stage_plan(cfg, from_stage, until):
        typer.echo(f"{r['stage']:<22} {words[r['action']]:<12} {r['why']}")


def run(
    config: ConfigOption = "synthetic",
    run_root: RunRootOption = None,
    overrides: SetOption = None,
    from_stage: FromOption = None,
    until: UntilOption = None,
    address: str = typer.Option(None, "--address", help="Ray address (default: start a local Ray or use RAY_ADDRESS)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check everything, print what would run, and exit"),
) -> None:
    """Run (or resume) the whole SLSR pipeline; with evaluate.trials > 1, once per protocol split
    (CUHK03 classic, VIPeR) and the mean±std over the trials."""
    from ..raysetup import init_ray
    from ..trials import run_protocol

    cfg = _checked_config(config, run_root, overrides, from_stage, until)
    if dry_run:
        _echo_plan(cfg, from_stage, until)
        return
    init_ray(address, run_root=cfg.run_root)
    run_protocol(cfg, from_stage=from_stage, until=until)


def check(
    config: ConfigOption = "synthetic",
    run_root: RunRootOption = None,
    overrides: SetOption = None,
    from_stage: FromOption = None,
    until: UntilOption = None,
) -> None:
    """Check a run's config and inputs and print which stages would run (= ``slsr run --dry-run``)."""
    _echo_plan(_checked_config(config, run_root, overrides, from_stage, until), from_stage, until)


def demo(
    run_root: str = typer.Option("runs/demo", "--run-root", "-o"),
    overrides: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
) -> None:
    """The whole method on a small synthetic dataset on a local Ray (a few minutes on 2 CPUs)."""
    run(config="synthetic", run_root=run_root, overrides=overrides, from_stage=None, until=None, address=None,
        dry_run=False)


def status(run_root: str = typer.Argument(..., help="the run root of a pipeline run")) -> None:
    """Which stages of a run are done, stale (config changed), corrupt (damaged marker) or pending."""
    from ..pipeline import pipeline_status

    rows = pipeline_status(run_root)
    typer.echo(f"{'stage':<22} {'state':<8} {'seconds':>8}  finished")
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        typer.echo(f"{r['stage']:<22} {r['state']:<8} {secs:>8}  {r['finished'] or ''}")


def report(run_root: str = typer.Argument(..., help="the run root of a pipeline run")) -> None:
    """(Re)write the run report (Markdown, JSON, PNG plots) from a run's artifacts."""
    from ..pipeline import read_run_config
    from ..report import write_report

    storage.require_folder(run_root, "run root", "the run root of a pipeline run")
    write_report(read_run_config(storage.absolute(run_root)))


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("check")(check)
    app.command("demo")(demo)
    app.command("status")(status)
    app.command("report")(report)
