"""``slsr experiment``: seeded ablations (every label strategy over several seeds) and sensitivity curves
over K, lambda and the generated count, on shared upstream stages. Multi-value options repeat:
``--strategy none --strategy slsr --seed 0 --seed 1 --k 2 --k 3``."""

from __future__ import annotations

import typer

from .. import storage
from ..config import ConfigError

SET_HELP = "override a pipeline config field for every point, e.g. --set train.epochs=5 (repeatable)"
VARIANT_HELP = ("a named variant, NAME[@strategy,...]:override[;override...], e.g. 'bot:train.recipe=bot' or "
                "'nonoise@slsr:train.model.noise_layer=false' (repeatable); run for its @strategies, "
                "else every --variant-strategy")


def parse_variants(specs: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``NAME@s1,s2:a=1;b=2`` -> ({NAME: ["a=1", "b=2"]}, {NAME: ["s1", "s2"]}); a repeated NAME adds
    overrides."""
    overrides_of: dict[str, list[str]] = {}
    strategies_of: dict[str, list[str]] = {}
    for spec in specs:
        head, sep, rest = spec.partition(":")
        name, at, strategies = head.partition("@")
        overrides = [o.strip() for o in rest.split(";") if o.strip()]
        names = [s.strip() for s in strategies.split(",") if s.strip()]
        if not sep or not name.strip() or not overrides or any("=" not in o for o in overrides) or (at and not names):
            raise ConfigError(
                f"--variant {spec!r}: expected NAME[@strategy,...]:section.key=value[;section.key=value...]")
        overrides_of.setdefault(name.strip(), []).extend(overrides)
        if names:
            strategies_of[name.strip()] = names
    return overrides_of, strategies_of


def experiment(
    config: str = typer.Option("synthetic", "--config", "-c", help="preset name or YAML path"),
    run_root: str = typer.Option(None, "--run-root", "-o", help="local folder (default: the config's run_root)"),
    strategies: list[str] = typer.Option(["none", "lsr", "lsro", "all_in_one", "pseudo", "slsr"], "--strategy",
                                         help="label strategies of the main table (repeat)"),
    seeds: list[int] = typer.Option([0, 1, 2], "--seed", help="training seeds (train.seed; repeat)"),
    ks: list[int] = typer.Option([], "--k", help="K curve: cluster counts (repeat)"),
    lams: list[float] = typer.Option([], "--lambda", "--lam", help="lambda curve: values in [0, 1] (repeat)"),
    generated: list[float] = typer.Option([], "--generated",
                                          help="generated-count curve: multiples of the real train images (repeat)"),
    curve_strategy: str = typer.Option("slsr", "--curve-strategy", help="strategy the curves vary"),
    curve_seeds: list[int] = typer.Option([], "--curve-seed", help="seeds of the curves (default: --seed)"),
    variants: list[str] = typer.Option([], "--variant", help=VARIANT_HELP),
    variant_strategies: list[str] = typer.Option(["none", "slsr"], "--variant-strategy",
                                                 help="strategies each variant runs (repeat)"),
    mode: str = typer.Option("plain", "--mode", help="evaluation in the tables: plain or rerank"),
    collect_only: bool = typer.Option(False, "--collect-only", help="only rewrite the tables from finished points"),
    overrides: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    address: str = typer.Option(None, "--address", help="Ray address (default: start a local Ray or use RAY_ADDRESS)"),
) -> None:
    """Train every label strategy over several seeds (and the curves) on shared upstream stages; writes
    <run-root>/experiment/results.{json,md} with mean ± std, paired differences to 'none' and figures."""
    from ..data import DatasetError
    from ..experiment import ExperimentConfig, ExperimentError, run_experiment
    from ..raysetup import init_ray

    try:
        variant_overrides, strategies_of = parse_variants(variants)
        exp = ExperimentConfig(
            strategies=list(strategies), seeds=list(seeds), ks=list(ks), lams=list(lams), generated=list(generated),
            curve_strategy=curve_strategy, curve_seeds=list(curve_seeds) or None, variants=variant_overrides,
            variant_strategies=list(variant_strategies), strategies_of=strategies_of, mode=mode,
        )
        if not collect_only:
            init_ray(address)
        run_experiment(config, list(overrides), run_root, exp, echo=typer.echo, collect_only=collect_only)
    except (ConfigError, DatasetError, storage.StorageError, ExperimentError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e


def register(app: typer.Typer) -> None:
    app.command("experiment")(experiment)
