"""`difflm tokenize`: turn an instruction set into a tokenized dataset on disk (not built yet)."""

from __future__ import annotations

import typer

from cli.common import Debug, Overrides, RecipePath, not_built


def tokenize(recipe: RecipePath = None, overrides: Overrides = None, debug: Debug = False) -> None:
    """Tokenize an instruction data set (prompt format, length, EOS policy) into a folder on disk.

    Example: difflm tokenize --recipe recipes/alpaca.yaml data.max_length=1024
    """
    not_built("tokenize")


def register(app: typer.Typer) -> None:
    app.command("tokenize")(tokenize)
