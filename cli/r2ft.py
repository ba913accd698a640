"""`difflm r2ft`: repetition-reduction fine-tuning (R2FT) after SFT.

Thin: options -> `TrainRecipe` -> `difflm.training.train(kind="r2ft")`; the live view is `cli.sft`'s.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import Debug, Overrides, RecipePath
from cli.sft import (
    AdapterOpt, DataOpt, LrOpt, ModelOpt, ModeOpt, OutputOpt, OverwriteOpt, QuietOpt, ResumeOpt, StepsOpt,
    _cli_values, _opt, run_training,
)


def r2ft(
    recipe: RecipePath = None,
    overrides: Overrides = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    mode: ModeOpt = None,
    data: DataOpt = None,
    output_dir: OutputOpt = None,
    max_steps: StepsOpt = None,
    lr: LrOpt = None,
    beta_a: Annotated[Optional[float], _opt("--beta-a", help="Weight of the -b_a*LW term (0.1).")] = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    debug: Debug = False,
) -> None:
    """Fine-tune an SFT'd model with the R2FT preference loss against synthetic repetitions.

    Example: difflm r2ft --recipe recipes/r2ft-alpaca.yaml r2ft.beta_a=0.1 train.max_steps=300

    Starts from model.name (a full SFT checkpoint) or model.adapter (a LoRA adapter, trained further).
    Each step builds a fresh rejected answer per example (the answer repeated from a cut point, one EOS
    inside) and logs LW (answer log-likelihood), LL (the repetition's) and their margin: LL should fall
    while LW holds.
    """
    values = _cli_values(model, adapter, mode, data, output_dir, max_steps, lr, resume, overwrite)
    values["r2ft"] = {"beta_a": beta_a}
    run_training("r2ft", recipe, overrides, values, quiet, debug)


def register(app: typer.Typer) -> None:
    app.command("r2ft")(r2ft)
