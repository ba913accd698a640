"""`difflm eval`: benchmarks and reports (not built yet). A typer sub-app: gsm8k, alpaca, fluency, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Debug, Overrides, RecipePath, not_built

eval_app = typer.Typer(
    name="eval",
    help="Evaluate outputs or models: GSM8K accuracy, AlpacaEval export, fluency and speed, reports.\n\n"
    "Example: difflm eval gsm8k --recipe recipes/gsm8k.yaml decode.steps=64",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


@eval_app.command("gsm8k")
def gsm8k(recipe: RecipePath = None, overrides: Overrides = None, debug: Debug = False) -> None:
    """Generate GSM8K answers and score the last number of each against the gold answer.

    Example: difflm eval gsm8k --recipe recipes/gsm8k.yaml decode.steps=64
    """
    not_built("eval gsm8k")


@eval_app.command("alpaca")
def alpaca(recipe: RecipePath = None, overrides: Overrides = None, debug: Debug = False) -> None:
    """Generate AlpacaEval outputs (the JSON list alpaca_eval reads) and optionally run the judge.

    Example: difflm eval alpaca --recipe recipes/alpaca_eval.yaml decode.top_k=20
    """
    not_built("eval alpaca")


@eval_app.command("fluency")
def fluency(recipe: RecipePath = None, overrides: Overrides = None, debug: Debug = False) -> None:
    """Measure repetition and speed (content tokens per NFE) of generated outputs.

    Example: difflm eval fluency --recipe recipes/fluency.yaml decode.steps=128
    """
    not_built("eval fluency")


@eval_app.command("report")
def report(
    runs: Annotated[
        Optional[list[Path]],
        typer.Argument(metavar="RUN_DIR", show_default=False, help="Eval run folders (each with its manifest)."),
    ] = None,
    debug: Debug = False,
) -> None:
    """Summarise eval runs into one table (accuracy, win rate, tokens per NFE, settings).

    Example: difflm eval report runs/gsm8k-conv runs/gsm8k-llada
    """
    not_built("eval report")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
