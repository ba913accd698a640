"""`difflm r2ft`: repetition-reduction fine-tuning (R2FT) after SFT.

Thin: options -> `TrainRecipe` -> `difflm.training.train(kind="r2ft")`; the live view is `cli.sft`'s.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.sft import _cli_values, _opt, run_training, training_command


@training_command(after="lr")
def r2ft(
    beta_a: Annotated[Optional[float], _opt("--beta-a", help="Weight of the -b_a*LW term (0.1).")] = None, **shared
) -> None:
    """Fine-tune an SFT'd model with the R2FT preference loss against synthetic repetitions.

    Example: difflm r2ft --recipe recipes/r2ft-alpaca.yaml r2ft.beta_a=0.1 train.max_steps=300

    Starts from model.name (a full SFT checkpoint) or model.adapter (a LoRA adapter, trained further).
    Each step builds a fresh rejected answer per example (the answer repeated from a cut point, one EOS
    inside) and logs LW (answer log-likelihood), LL (the repetition's) and their margin: LL should fall
    while LW holds.
    """
    values = _cli_values(**shared)
    values["r2ft"] = {"beta_a": beta_a}
    run_training("r2ft", values, **shared)


def register(app: typer.Typer) -> None:
    app.command("r2ft")(r2ft)
