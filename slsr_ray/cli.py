"""The ``slsr`` command line: one sub-module of :mod:`slsr_ray.commands` per stage group."""

from __future__ import annotations

import importlib
import os

import typer

app = typer.Typer(
    name="slsr",
    help="Sparse Label Smoothing Regularization (SLSR) for person re-id, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module exposes ``register(app)``; keep the list in pipeline order.
COMMAND_MODULES = ("data", "train", "extract", "gan", "evaluate", "pipeline", "sweep", "experiment")

for _name in COMMAND_MODULES:
    importlib.import_module(f"slsr_ray.commands.{_name}").register(app)


def main() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    app()


if __name__ == "__main__":
    main()
