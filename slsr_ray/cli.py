"""The ``slsr`` command line: one sub-module of :mod:`slsr_ray.commands` per stage group.

Every command fails the same way on bad input: the project's errors (:class:`slsr_ray.errors.SlsrError`
and its subclasses, also when Ray re-raises them from a worker) become one line
``error: <what> (<file or key>): <what was expected>`` on stderr and exit status 2; ``-v`` /
``--verbose`` anywhere on the command line adds the traceback, and brings Ray's own logs and the workers'
output back to the console (:mod:`slsr_ray.console`).
"""

from __future__ import annotations

import importlib
import os

import click
import typer
from typer.core import TyperGroup

from .errors import is_user_error, report_error

VERBOSE_FLAGS = ("-v", "--verbose")


class SlsrGroup(TyperGroup):
    """The top-level group: takes ``-v`` from anywhere on the line and reports user errors in one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        cut = args.index("--") if "--" in args else len(args)
        verbose = any(a in VERBOSE_FLAGS for a in args[:cut])
        ctx.meta["slsr_verbose"] = verbose
        args = [a for a in args[:cut] if a not in VERBOSE_FLAGS] + args[cut:]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as e:
            if not is_user_error(e):
                raise
            raise typer.Exit(report_error(e, verbose=ctx.meta.get("slsr_verbose", False))) from None


app = typer.Typer(
    name="slsr",
    cls=SlsrGroup,
    help="Sparse Label Smoothing Regularization (SLSR) for person re-id, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _options(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show the traceback of an error, and Ray's own logs "
                                 "and the workers' output (always in <run-root>/logs/ray.log); anywhere on the line"),
) -> None:
    """Sparse Label Smoothing Regularization (SLSR) for person re-id, on Ray."""
    from .console import configure

    configure(verbose=verbose or ctx.meta.get("slsr_verbose", False))  # quiet console unless -v


# Each module exposes ``register(app)``; keep the list in pipeline order.
COMMAND_MODULES = ("data", "train", "extract", "gan", "evaluate", "pipeline", "sweep", "serve", "experiment")


for _name in COMMAND_MODULES:
    importlib.import_module(f"slsr_ray.commands.{_name}").register(app)


def main() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    app()


if __name__ == "__main__":
    main()
