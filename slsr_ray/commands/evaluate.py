"""CLI commands (filled in by the stage's owner)."""

import typer


def register(app: typer.Typer) -> None:
    pass
