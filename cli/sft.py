"""`difflm sft`: supervised fine-tuning with the masked-diffusion loss (not built yet)."""

from __future__ import annotations

import typer

from cli.common import Debug, Overrides, RecipePath, not_built


def sft(recipe: RecipePath = None, overrides: Overrides = None, debug: Debug = False) -> None:
    """Fine-tune a model with the diffusion SFT loss (full, LoRA or QLoRA); resumes from its run folder.

    Example: difflm sft --recipe recipes/alpaca.yaml optim.lr=1e-5
    """
    not_built("sft")


def register(app: typer.Typer) -> None:
    app.command("sft")(sft)
