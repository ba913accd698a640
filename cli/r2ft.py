"""`difflm r2ft`: repetition-reduction fine-tuning after SFT (not built yet)."""

from __future__ import annotations

import typer

from cli.common import Debug, Overrides, RecipePath, not_built


def r2ft(recipe: RecipePath = None, overrides: Overrides = None, debug: Debug = False) -> None:
    """Fine-tune an SFT'd model with the R2FT preference loss against synthetic repetitions.

    Example: difflm r2ft --recipe recipes/r2ft.yaml r2ft.beta_a=0.1 optim.max_steps=300
    """
    not_built("r2ft")


def register(app: typer.Typer) -> None:
    app.command("r2ft")(r2ft)
