"""``slsr sweep``: a Ray Tune search over K, lambda and the number of generated images (and lr).

Multi-value options take one value per flag (typer): ``--k 2 --k 3 --generated 0 --generated 4000``.
The space-separated form ``--k 2 3 --generated 0 4000`` is accepted too: the extra values are picked
up here (see :func:`_split_multi`).
"""

from __future__ import annotations

import sys

import typer

SET_HELP = "override a pipeline config field, e.g. --set train.epochs=5 (repeatable)"
MULTI_OPTIONS = {"--k": "--k", "--lambda": "--lambda", "--lam": "--lambda", "--generated": "--generated",
                 "--lr": "--lr"}


def _split_multi(argv: list[str]) -> list[str]:
    """Rewrite ``--k 2 3 4`` as ``--k 2 --k 3 --k 4`` (typer takes one value per flag); values are
    the following tokens that do not start with ``-`` (negative numbers are not valid here anyway)."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        out.append(tok)
        i += 1
        if tok in MULTI_OPTIONS:
            first = True
            while i < len(argv) and not argv[i].startswith("-"):
                if not first:
                    out.append(tok)
                out.append(argv[i])
                first = False
                i += 1
    return out


def sweep(
    config: str = typer.Option("synthetic", "--config", "-c", help="preset name or YAML path/URI"),
    run_root: str = typer.Option(None, "--run-root", "-o", help="local folder or s3://bucket/prefix"),
    ks: list[int] = typer.Option([2, 3, 4, 5], "--k", help="cluster counts K (repeat --k or list: --k 2 3)"),
    lams: list[float] = typer.Option([1.0], "--lambda", "--lam", help="lambda for generated images"),
    generated: list[int] = typer.Option([0, 4000, 8000, 12000], "--generated", help="generated image counts"),
    lrs: list[float] = typer.Option([], "--lr", help="learning rates to search (default: train.lr)"),
    search: str = typer.Option("grid", "--search", help="grid, random or optuna"),
    samples: int = typer.Option(1, "--samples", "-n", help="grid repeats / random or optuna trials"),
    asha: bool = typer.Option(False, "--asha/--no-asha", help="stop weak trials early on validation mAP"),
    report_every: int = typer.Option(None, "--report-every", help="epochs between validation reports"),
    concurrent: int = typer.Option(1, "--concurrent", help="trials at once"),
    trial_cpus: float = typer.Option(1.0, "--trial-cpus", help="CPUs each trial holds"),
    train_workers: int = typer.Option(1, "--train-workers", help="Ray Train workers per trial"),
    cpus_per_worker: float = typer.Option(0.5, "--cpus-per-worker", help="CPUs per Ray Train worker"),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="share of train ids held out for validation"),
    seed: int = typer.Option(0, "--seed"),
    retrain_best: bool = typer.Option(True, "--retrain-best/--no-retrain-best",
                                      help="retrain the best point on the full train set, evaluate on test"),
    resume: bool = typer.Option(False, "--resume", help="continue the sweep under this run root"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="with --resume: rerun failed trials"),
    overrides: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    address: str = typer.Option(None, "--address", help="Ray address (default: start a local Ray or use RAY_ADDRESS)"),
) -> None:
    """Search K x lambda x generated count (x lr) with Ray Tune; writes a Table-4-like results table,
    a heatmap and the best config under <run-root>/sweep/."""
    from ..errors import as_config_error
    from ..pipeline import load_config
    from ..raysetup import init_ray
    from ..tune import SweepConfig, run_sweep
    from ..validate import validate_config

    cfg = load_config(config, overrides, run_root)
    with as_config_error("sweep options"):
        sc = SweepConfig(
            ks=ks, lams=lams, generated=generated, lrs=lrs or None, search=search, num_samples=samples, asha=asha,
            report_every=report_every, max_concurrent_trials=concurrent, trial_cpus=trial_cpus,
            train_workers=train_workers, cpus_per_worker=cpus_per_worker, val_fraction=val_fraction, seed=seed,
            retrain_best=retrain_best, retry_failed=retry_failed,
        )
    validate_config(cfg, check_inputs=True)  # before Ray starts
    init_ray(address, run_root=cfg.run_root)
    run_sweep(cfg, sc, resume=resume, echo=typer.echo)


def register(app: typer.Typer) -> None:
    # typer reads sys.argv when the app runs: allow the space-separated list form for `slsr sweep`
    if sys.argv[1:2] == ["sweep"]:
        sys.argv[1:] = _split_multi(sys.argv[1:])
    app.command("sweep")(sweep)
