"""`difflm tokenize`: turn an instruction set (or raw text) into a tokenized folder on disk.

Thin: options -> `TrainRecipe` -> `difflm.training.tokenize`; the stats table here.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import Debug, Overrides, RecipePath, console, err_console, load_cli_recipe, print_config, run_command


def tokenize(
    recipe: RecipePath = None,
    overrides: Overrides = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model whose tokenizer and ids are used.")] = None,
    source: Annotated[
        Optional[str], typer.Option("--source", help="Hub dataset name or local .json/.jsonl/.parquet/.csv.")
    ] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="alpaca|alpaca-cot|raw|chat|text")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Tokens per example.")] = None,
    eos_policy: Annotated[Optional[str], typer.Option("--eos-policy", help="all|first|none")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="The tokenized folder (data.path).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N rows.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No config panel.")] = False,
    debug: Debug = False,
) -> None:
    """Tokenize an instruction data set (prompt format, length, EOS policy) into a folder on disk.

    Example: difflm tokenize --recipe recipes/alpaca.yaml data.max_length=1024

    Example: difflm tokenize -m GSAI-ML/LLaDA-8B-Base --source my.jsonl --format chat -o runs/data/mine

    Writes DATA_PATH (a datasets folder: train and, with data.eval_size, eval) with difflm_tokenize.json
    (ids, settings, stats); prints kept/dropped counts and length percentiles.
    """
    cli_values = {
        "model": {"name": model},
        "data": dict(source=source, format=format, max_length=max_length, eos_policy=eos_policy, path=output, limit=limit),
    }

    def work() -> None:
        import datasets
        import transformers

        from difflm.training import TrainRecipe
        from difflm.training import tokenize as run_tokenize

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        cfg = load_cli_recipe(TrainRecipe, recipe, overrides, cli_values)
        err = err_console()
        if not quiet:
            print_config({"model": cfg.model, "data": cfg.data}, title="tokenize")
        with err.status("tokenizing ...", spinner="dots") as status:
            result = run_tokenize(cfg, overwrite=overwrite, status=lambda msg: status.update(msg))
        _print_stats(result)

    run_command(work, debug)


def _print_stats(result) -> None:
    from rich.table import Table

    stats = result.stats
    out = console()
    counts = Table(title=f"tokenized -> {result.path}", show_header=True, header_style="bold")
    counts.add_column("rows")
    counts.add_column("kept", style="green")
    for col in ("dropped empty", "dropped too long", "truncated", "train", "eval"):
        counts.add_column(col)
    counts.add_row(
        str(stats["rows"]),
        str(stats["kept"]),
        str(stats.get("dropped_empty", 0)),
        str(stats.get("dropped_too_long", 0)),
        str(stats.get("truncated_response", 0) + stats.get("truncated_prompt", 0)),
        str(stats.get("train", 0)),
        str(stats.get("eval", 0)),
    )
    out.print(counts)
    lengths = Table(title="lengths (tokens)", header_style="bold")
    for col in ("", "min", "p50", "p90", "p99", "max", "mean"):
        lengths.add_column(col, justify="right")
    for key in ("prompt_tokens", "response_tokens", "answer_tokens", "total_tokens", "document_tokens"):
        p = stats.get(key)
        if p:
            cells = [f"{p[k]:.0f}" for k in ("min", "p50", "p90", "p99", "max")] + [f"{p['mean']:.1f}"]
            lengths.add_row(key.replace("_tokens", ""), *cells)
    out.print(lengths)
    meta = result.meta
    err_console().print(
        f"[green]done[/]: {stats['kept']} examples of {meta['max_length']} tokens, eos_policy {meta['eos_policy']}, "
        f"eos id {meta['eos_id']}, mask id {meta['mask_id']}"
    )


def register(app: typer.Typer) -> None:
    app.command("tokenize")(tokenize)
