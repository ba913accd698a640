"""`difflm sweep`: `difflm generate` over a grid of recipe keys (`KEY=V1,V2,...`), one output per point.

Thin: the generate command's own options (the Model and Decoding panels through `DecodeOptionsCommand`, and the
input options declared in cli/generate.py) -> `difflm.sweep.plan_sweep` (every point checked first) ->
`difflm.sweep.run_sweep` (each point through `difflm.generation.run_generate`); progress and printing here.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Debug, RecipePath, console, err_console, option, run_command
from cli.generate import COMMAND_ONLY, DecodeOptionsCommand, generate as _generate, generate_cli_values, load_with_spinner

_O = "Output"

SweepArgs = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="KEY=V1,V2,...",
        show_default=False,
        help="Swept keys (a comma list; several keys make a product) and plain KEY=VALUE overrides for every point, "
        "e.g. decode.kernel_size=32,64,128 decode.steps=64 (values read as YAML).",
    ),
]
OutDir = Annotated[
    Optional[Path],
    option("--output", "-o", help="Folder for the points' outputs (DIR/<key=value...>.json + manifests, DIR/sweep.yaml).",
           panel=_O, file_okay=False),
]
Overwrite = Annotated[bool, option("--overwrite", help="Generate every point again (finished ones too).", panel=_O)]
Quiet = Annotated[bool, option("--quiet", "-q", help="No progress bars.", panel=_O)]


def sweep(ctx: typer.Context, **kw) -> None:
    """Run difflm generate over a grid of decode (or other recipe) keys: one output file per point.

    Example: difflm sweep --recipe recipes/generate-gsm8k.yaml -o runs/sweep-k decode.kernel_size=32,64,128,256,512

    Example: difflm sweep -m tiny-math --eval-set gsm8k --limit 20 -o runs/k-s decode.kernel_size=8,16 decode.steps=16,32 decode.top_k=1

    Several swept keys make their product; plain KEY=VALUE overrides apply to every point. Every point is
    checked before anything is generated (a bad value: exit 2). Rerun the same command to resume: finished
    points are skipped, a half-finished one resumes. Each manifest has `sweep_point`; plot a score against a
    key with: difflm eval report DIR --x decode.kernel_size
    """
    out_dir, quiet, debug, overwrite, recipe = kw.pop("output"), kw.pop("quiet"), kw.pop("debug"), kw.pop("overwrite"), kw.pop("recipe")
    args = kw.pop("overrides") or []

    def work() -> None:
        from difflm.errors import ConfigError
        from difflm.sweep import plan_sweep, run_sweep

        if out_dir is None:
            raise ConfigError("give the sweep's output folder: -o DIR", key="output")
        cli_values = generate_cli_values(ctx, kw)
        points = plan_sweep(recipe, args, out_dir, cli_values=cli_values, overwrite=overwrite)
        _run(points, out_dir, quiet=quiet)

    run_command(work, debug)


def _run(points, out_dir: Path, *, quiet: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from difflm.sweep import run_sweep

    err = err_console()
    done = sum(p.status == "done" for p in points)
    err.print(f"sweep: {len(points)} points over {', '.join(points[0].values)} -> {out_dir}"
              + (f" ({done} already done)" if done else ""), highlight=False)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=err, disable=quiet)
    pt = progress.add_task("points", total=len(points), info="")
    it = progress.add_task("items", total=None, info="")
    state = {"t0": time.perf_counter(), "tokens": 0}

    def on_point(p) -> None:
        if p.index:
            progress.advance(pt)
        progress.update(pt, info=f"{p.name}" + (" (done, skipped)" if p.status == "done" else ""))
        progress.reset(it, total=None)
        state.update(t0=time.perf_counter(), tokens=0)

    def on_start(total: int, already: int) -> None:
        progress.update(it, total=total, completed=already)

    def on_batch(recs) -> None:
        state["tokens"] += sum(r["content_tokens"] for r in recs)
        progress.update(it, advance=len(recs), info=f"{state['tokens'] / (time.perf_counter() - state['t0']):.1f} tok/s")

    with progress:
        mans = run_sweep(points, out_dir, load_model=lambda m: load_with_spinner(m, show=not quiet),
                         on_point=on_point, on_start=on_start, on_batch=on_batch)
        progress.update(pt, completed=len(points))
    out = console()
    for p, man in zip(points, mans):
        tps = man.get("tokens_per_second")
        out.print(f"{p.name}: {man.get('items')} items, {man.get('content_tokens_per_nfe', 0):.2f} tokens/NFE"
                  + (f", {tps:.1f} tokens/s" if tps else "") + f" -> {p.output}", highlight=False, soft_wrap=True)
    err.print(f"[green]done[/]: {len(points)} points in {out_dir} (index: {out_dir / 'sweep.yaml'})")


def _signature() -> inspect.Signature:
    """ctx, --recipe, the KEY=V1,V2 arguments (DecodeOptionsCommand puts the Model and Decoding panels after
    them), every other option of generate (its own declarations: inputs, --batch-size, --generator), -o DIR,
    --overwrite, --quiet, --debug."""
    gen = inspect.signature(_generate, eval_str=True).parameters
    kwo = inspect.Parameter.KEYWORD_ONLY

    def p(name, ann, default=None):
        return inspect.Parameter(name, kwo, default=default, annotation=ann)

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              p("recipe", RecipePath), p("overrides", SweepArgs)]
    params += [q.replace(kind=kwo) for n, q in gen.items() if n not in COMMAND_ONLY]
    params += [p("output", OutDir), p("overwrite", Overwrite, False), p("quiet", Quiet, False), p("debug", Debug, False)]
    return inspect.Signature(params)


sweep.__signature__ = _signature()
sweep.__annotations__ = {q.name: q.annotation for q in sweep.__signature__.parameters.values()}


def register(app: typer.Typer) -> None:
    app.command("sweep", cls=DecodeOptionsCommand)(sweep)
