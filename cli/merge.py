"""`difflm merge`: fold a LoRA adapter into its base model and save a full checkpoint.

Thin: options -> `MergeRecipe` -> `difflm.training.merge.merge_adapter`.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import Debug, Overrides, RecipePath, err_console, load_cli_recipe, run_command


def merge(
    recipe: RecipePath = None,
    overrides: Overrides = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", "-a", help="The LoRA adapter folder.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base model (default: the adapter's).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Folder for the merged model.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="auto|float32|bfloat16|float16")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu (default) or cuda.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    debug: Debug = False,
) -> None:
    """Merge a LoRA adapter into its base model and save a full checkpoint (LLaDA: difflm's native format).

    Example: difflm merge --adapter runs/r2ft-alpaca/final -o runs/llada-8b-r2ft --dtype bfloat16

    The result loads like any model: difflm generate -m OUTPUT ...
    """
    values = {"adapter": adapter, "model": model, "output": output, "dtype": dtype, "device": device,
              "overwrite": True if overwrite else None}

    def work() -> None:
        import transformers

        from difflm.training.merge import MergeRecipe, merge_adapter

        transformers.utils.logging.disable_progress_bar()
        cfg = load_cli_recipe(MergeRecipe, recipe, overrides, values)
        err = err_console()
        with err.status(f"merging {cfg.adapter} ...", spinner="dots"):
            out = merge_adapter(cfg)
        err.print(f"[green]done[/]: wrote {out}")

    run_command(work, debug)


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
