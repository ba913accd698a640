"""`difflm generate`: decode prompts with any decoder; outputs in the format alpaca_eval reads.

Thin: options -> `GenerateRecipe` -> `difflm.generation.run_generate`; progress and printing here.
The decoding options are not declared here: each is built from a `DecodeConfig` field's metadata (help,
type, choices) when the command is first parsed or shown (`DecodeOptionsCommand`), so a new decode setting is
declared once, in `difflm/decoding/config.py`, and `difflm --help` does not import torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from cli.common import Debug, Overrides, RecipePath, canvas_panel, console, err_console, load_cli_recipe, option, print_config, run_command

_D = "Decoding"
_M = "Model"
_I = "Inputs"
_O = "Output"
#: a DecodeConfig field's option is --field-name, except these
_DECODE_FLAGS = {"method": "--decode"}
_DECODE_META = "difflm.decode"  # ctx.meta key: the decoding options' values, {field: value or None}


# the Model panel, shared by generate, serve and chat through DecodeOptionsCommand
ModelName = Annotated[Optional[str], option("--model", "-m", help="Hub name, local folder, or an embedded model: tiny-shakespeare (the default), tiny-math, tiny-math-r2ft; or smollm2-135m-instruct (AR, --decode nucleus; optional extra).", panel=_M)]
Family = Annotated[Optional[str], option("--family", help="auto|llada|dream|mdlm|mlm|ar", panel=_M)]
Dtype = Annotated[Optional[str], option("--dtype", help="auto|float32|bfloat16|float16", panel=_M)]
Device = Annotated[Optional[str], option("--device", help="cpu, cuda, cuda:1 (default: cuda if any).", panel=_M)]
Adapter = Annotated[Optional[str], option("--adapter", help="peft LoRA adapter folder.", panel=_M)]
Quantization = Annotated[Optional[str], option("--quantization", help="4bit|8bit (bitsandbytes, CUDA).", panel=_M)]
TrustRemoteCode = Annotated[
    Optional[bool], option("--trust-remote-code", help="Load the model's own code (LLaDA: not needed).", panel=_M)
]
Tokenizer = Annotated[Optional[str], option("--tokenizer", help="Tokenizer folder (default: the model's).", panel=_M)]


_MODEL_META = "difflm.model"  # ctx.meta key: the Model panel's values, {model-section key: value or None}
#: the Model panel: (parameter, `model:` section key, option type)
_MODEL_OPTIONS = (
    ("model", "name", ModelName), ("family", "family", Family), ("dtype", "dtype", Dtype), ("device", "device", Device),
    ("adapter", "adapter", Adapter), ("quantization", "quantization", Quantization),
    ("trust_remote_code", "trust_remote_code", TrustRemoteCode), ("tokenizer", "tokenizer", Tokenizer),
)


def model_values(ctx) -> dict:
    """The `model:` section's values of the Model panel's options (None: not given)."""
    return dict(ctx.meta.get(_MODEL_META, {}))


def decode_values(ctx) -> dict:
    """The `decode:` section's values of the decoding options (`DecodeOptionsCommand` put them in ctx.meta)."""
    return dict(ctx.meta.get(_DECODE_META, {}))


def load_with_spinner(model_cfg, dist=None, show: bool = True):
    """The recipe's model (`difflm.generation.load_recipe_model`), loaded under one spinner line on stderr
    (transformers' own progress bars off) unless `show` is False; what generate, serve and chat do."""
    import contextlib

    import transformers

    from difflm.generation import load_recipe_model
    from difflm.models.named import DEFAULT_MODEL

    transformers.utils.logging.disable_progress_bar()
    name = model_cfg.name or DEFAULT_MODEL
    with err_console().status(f"loading {name} ...", spinner="dots") if show else contextlib.nullcontext():
        return load_recipe_model(model_cfg, dist)


def _decode_help(meta) -> str:
    """The option's help: the allowed values (if the field has choices), then the field's help text."""
    choices = "|".join(str(c) for c in meta.get("choices", ()) if c is not None)
    return " ".join(t for t in (choices, meta.get("help", "")) if t)


def decode_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per `DecodeConfig` field, as typer reads them: Optional[field type] = None
    (None: the recipe's or the default value), a `typer.Option` named `--field-name` (bool: a
    `--x/--no-x` switch) with the field's help in the Decoding panel."""
    from difflm.decoding.config import DecodeConfig

    hints = typing.get_type_hints(DecodeConfig)
    params = []
    for f in dataclasses.fields(DecodeConfig):
        tp = next(a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None))
        flag = _DECODE_FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        decl = f"{flag}/--no-{flag[2:]}" if tp is bool else flag
        ann = Annotated[Optional[tp], option(decl, help=_decode_help(f.metadata), panel=_D)]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann))
    return params


def model_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per Model panel option (`_MODEL_OPTIONS`), default None."""
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)
            for name, _key, ann in _MODEL_OPTIONS]


def _click_params(parameters: list[inspect.Parameter]) -> list:
    """The click parameters typer makes of these keyword parameters (through its public `get_command`)."""

    def options(**values) -> None:
        """Options."""

    options.__signature__ = inspect.Signature(parameters)
    sub = typer.Typer(add_completion=False)
    sub.command()(options)
    return typer.main.get_command(sub).params


class DecodeOptionsCommand(TyperCommand):
    """A command (generate, serve, chat) with the Model panel and, after it, one option per DecodeConfig field,
    added after its KEY=VALUE argument on first use (parsing, help, completion), so that no command declares
    them. Their values go to `ctx.meta` (read them with `model_values(ctx)`, `decode_values(ctx)`), not to
    the callback's arguments."""

    _added = False

    def get_params(self, ctx):
        if not self._added:
            at = next(i for i, p in enumerate(self.params) if p.name == "overrides") + 1
            self.params[at:at] = _click_params(model_parameters()) + _click_params(decode_parameters())
            self._added = True
        return super().get_params(ctx)

    def invoke(self, ctx):
        from difflm.decoding.config import DecodeConfig

        ctx.meta[_MODEL_META] = {key: ctx.params.pop(name, None) for name, key, _ann in _MODEL_OPTIONS}
        ctx.meta[_DECODE_META] = {f.name: ctx.params.pop(f.name, None) for f in dataclasses.fields(DecodeConfig)}
        return super().invoke(ctx)


def generate(
    ctx: typer.Context,
    recipe: RecipePath = None,
    overrides: Overrides = None,
    # the Model and Decoding panels: added by DecodeOptionsCommand (shared with serve and chat)
    # decoding: one option per DecodeConfig field, added by DecodeOptionsCommand
    # inputs
    prompt: Annotated[Optional[list[str]], option("--prompt", "-p", help="Prompt text (repeatable).", panel=_I)] = None,
    input: Annotated[Optional[str], option("--input", "-i", help="JSON list / JSONL with `instruction`.", panel=_I)] = None,
    eval_set: Annotated[Optional[str], option("--eval-set", help="alpaca_eval|gsm8k|mt_bench|wiki|wikitext|arena_hard", panel=_I)] = None,
    data_path: Annotated[Optional[str], option("--data-path", help="Local copy of the eval set.", panel=_I)] = None,
    limit: Annotated[Optional[int], option("--limit", help="First N items.", panel=_I)] = None,
    turns: Annotated[
        Optional[int], option("--turns", help="mt_bench: 2 answers the second question too (after the first answer).",
                              panel=_I)
    ] = None,
    prompt_format: Annotated[
        Optional[str], option("--prompt-format", help="alpaca|alpaca-cot|paper-cot|chat (template; alpaca if none)|raw", panel=_I)
    ] = None,
    # output
    output: Annotated[Optional[str], option("--output", "-o", help="Output JSON (+ .manifest.json).", panel=_O)] = None,
    overwrite: Annotated[Optional[bool], option("--overwrite", help="Replace an existing output.", panel=_O)] = None,
    batch_size: Annotated[Optional[int], option("--batch-size", "-b", help="Prompts per batch.", panel=_O)] = None,
    generator: Annotated[Optional[str], option("--generator", help="alpaca_eval `generator` name.", panel=_O)] = None,
    live: Annotated[bool, option("--live", help="Show the denoising canvas (one prompt).", panel=_O)] = False,
    quiet: Annotated[bool, option("--quiet", "-q", help="No config panel or progress bar.", panel=_O)] = False,
    debug: Debug = False,
) -> None:
    """Generate text with a diffusion LM (or an AR reference model with --decode nucleus).

    Example: difflm generate -m GSAI-ML/LLaDA-8B-Instruct --decode conv --gen-length 256 --steps 64 --kernel-size 128 --top-k 1 -p "What is 7 * 8?"

    Example: difflm generate --recipe recipes/generate-alpaca-eval.yaml -o runs/conv.json decode.steps=128

    Outputs: OUT (a JSON list alpaca_eval reads), OUT.manifest.json (settings, versions, device, NFE, speed),
    OUT.config.yaml (the resolved recipe). An interrupted run resumes: rerun the same command.
    """
    cli_values = generate_cli_values(ctx, dict(locals()))

    def work() -> None:
        from difflm.generation import GenerateRecipe, run_generate

        cfg = load_cli_recipe(GenerateRecipe, recipe, overrides, cli_values)
        if live:
            cfg.batch_size = 1
        if not quiet:
            print_config(cfg)
        _run(cfg, live=live, quiet=quiet, run_generate=run_generate)

    run_command(work, debug)


#: generate's parameters that are not recipe values, or that `difflm sweep` declares itself
COMMAND_ONLY = ("ctx", "recipe", "overrides", "output", "overwrite", "live", "quiet", "debug")


def generate_cli_values(ctx, options: dict) -> dict:
    """The recipe values the user gave as generate's options (None: not given), for `load_cli_recipe`: the Model
    and Decoding panels from ctx, then every option named like a `data:` field (`--prompt` fills
    `data.prompts`) or a top-level recipe field; other entries of `options` (ctx, live, quiet, ...) are ignored.
    `difflm sweep` calls it with its own values of generate's options."""
    import dataclasses

    from difflm.generation import GenerateDataConfig, GenerateRecipe

    data_fields = {f.name for f in dataclasses.fields(GenerateDataConfig)}
    top_fields = {f.name for f in dataclasses.fields(GenerateRecipe)} - {"model", "decode", "data"}
    values = {"model": model_values(ctx), "decode": decode_values(ctx), "data": {}}
    for name, value in options.items():
        if name == "prompt":
            values["data"]["prompts"] = value or None
        elif name in data_fields:
            values["data"][name] = value
        elif name in top_fields:
            values[name] = value
    return values


def _run(cfg, *, live: bool, quiet: bool, run_generate) -> None:
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from difflm.generation import check_model_decoder, init_distributed, load_items

    err = err_console()
    dist = init_distributed()
    quiet = quiet or not dist.main
    items = load_items(cfg.data)  # bad inputs fail before the (slow) model load
    check_model_decoder(cfg)  # so does a decoder that cannot apply to the model's family
    model = load_with_spinner(cfg.model, dist, show=not quiet)
    state = {"tokens": 0, "t0": time.perf_counter()}
    progress = Progress(
        TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=quiet or live,
    )
    task = progress.add_task("generate", total=None, rate="")

    def on_start(total: int, done: int) -> None:
        progress.update(task, total=total, completed=done)
        if done:
            err.print(f"resuming: {done} of {total} items already done")

    def on_batch(recs: list[dict]) -> None:
        state["tokens"] += sum(r["content_tokens"] for r in recs)
        dt = time.perf_counter() - state["t0"]
        state["items"] = state.get("items", 0) + len(recs)
        progress.update(task, advance=len(recs), rate=f"{state['tokens'] / dt:.1f} tok/s  {state['items'] / dt:.2f} items/s")

    step_callback = None
    live_view = None
    if live:
        live_view = Live(console=err, refresh_per_second=20, transient=False)
        ids = model.ids

        def step_callback(ev: dict) -> None:
            gen = ev["x"][0, ev["prompt_length"] :].tolist()  # the answer (total_length: its canvas minus the prompt)
            cells = [(None if t == ids.mask_id else model.tokenizer.decode([t]), t in ids.stop_ids) for t in gen]
            live_view.update(canvas_panel(cells, f"step {ev['step']}  NFE {ev['nfe']}"))

    with progress, (live_view or _null()):
        records, man = run_generate(cfg, model=model, items=items, on_start=on_start, on_batch=on_batch, step_callback=step_callback)
    if man is None:  # not rank 0
        return
    if live:
        err.print()
    out = console()
    if not cfg.output or live:
        for r in records:
            out.rule(f"[bold]{r['id']}")
            out.print(r["output"], markup=False, highlight=False)
    err.print(
        f"[green]done[/]: {man['items']} items, {man['content_tokens']} content tokens, "
        f"{man['content_tokens_per_nfe']:.2f} tokens/NFE, "
        + (f"{man['tokens_per_second']:.1f} tokens/s" if man["tokens_per_second"] else "")
        + f" on {man['device']}"
        + (f"; {man['filled_positions']} positions filled by the final argmax pass" if man["filled_positions"] else "")
        + (f"\nwrote {cfg.output} and {Path(cfg.output).name}.manifest.json" if cfg.output else "")
    )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def register(app: typer.Typer) -> None:
    app.command("generate", cls=DecodeOptionsCommand)(generate)
