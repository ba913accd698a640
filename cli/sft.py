"""`difflm sft`: supervised fine-tuning (masked-diffusion, pretraining or AR objective).

Thin: options -> `TrainRecipe` -> `difflm.training.train(kind="sft")`; the live view (progress bar
with loss, tokens/s and ETA, a table of the last logged steps) is here, on stderr. `difflm r2ft`
reuses it.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections import deque
from typing import Annotated, Optional

import typer

from cli.common import Debug, Overrides, RecipePath, err_console, load_cli_recipe, option, print_config, run_command

_T = "Training"
_M = "Model"
_opt = functools.partial(option, panel=_T)  # the training commands' options default to the Training panel


def _shared_options(
    recipe: RecipePath = None,
    overrides: Overrides = None,
    model: Annotated[Optional[str], _opt("--model", "-m", help="Hub name or local folder.", panel=_M)] = None,
    adapter: Annotated[Optional[str], _opt("--adapter", help="Start from this LoRA adapter.", panel=_M)] = None,
    mode: Annotated[Optional[str], _opt("--mode", help="full|lora|qlora", panel=_M)] = None,
    data: Annotated[Optional[str], _opt("--data", help="Tokenized folder (data.path).")] = None,
    output_dir: Annotated[
        Optional[str], _opt("--output-dir", "-o", help="Run folder (checkpoints, metrics, final/).")
    ] = None,
    max_steps: Annotated[Optional[int], _opt("--max-steps", help="Optimiser steps.")] = None,
    lr: Annotated[Optional[float], _opt("--lr", help="Peak learning rate.")] = None,
    resume: Annotated[bool, _opt("--resume", help="Continue from the last checkpoint in the run folder.")] = False,
    overwrite: Annotated[bool, _opt("--overwrite", help="Delete an existing run folder first.")] = False,
    quiet: Annotated[bool, _opt("--quiet", "-q", help="No config panel or live view.")] = False,
    debug: Debug = False,
) -> None:
    """The options every training command takes, declared once (only the signature is used)."""


def training_command(after: str):
    """Decorator for a training command `fn(<its own options>, **shared)`: typer sees the options of
    `_shared_options` with fn's own inserted after option `after`; fn gets them all as keywords."""

    def wrap(fn):
        shared = list(inspect.signature(_shared_options, eval_str=True).parameters.values())
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = [p.name for p in shared].index(after) + 1
        params = shared[:at] + own + shared[at:]

        @functools.wraps(fn)
        def command(**options):
            return fn(**options)

        command.__signature__ = inspect.Signature(params, return_annotation=None)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


@training_command(after="mode")
def sft(
    objective: Annotated[Optional[str], _opt("--objective", help="diffusion|pretrain|ar")] = None,
    plan: Annotated[
        bool, _opt("--plan", help="Print per-GPU memory under each strategy (DDP, FSDP2, ZeRO, LoRA, QLoRA); no training.")
    ] = False,
    gpus: Annotated[int, _opt("--gpus", help="GPUs the --plan divides over.", min=1)] = 8,
    **shared,
) -> None:
    """Fine-tune a model with the diffusion SFT loss (full, LoRA or QLoRA); resumes from its run folder.

    Example: difflm sft --recipe recipes/alpaca.yaml optim.lr=1e-5

    Example: accelerate launch --num_processes 8 -m cli.main sft --recipe recipes/alpaca.yaml --resume

    Example: difflm sft --recipe recipes/alpaca.yaml --plan --gpus 8 train.micro_batch=4

    Example: accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m cli.main sft --recipe recipes/alpaca.yaml train.mode=full

    Run `difflm tokenize` with the same recipe first. Writes OUTPUT_DIR/metrics.jsonl, checkpoints/step-N
    (weights, optimizer, scheduler, RNG, data position) and final/ (the adapter alone for LoRA/QLoRA).
    """
    values = _cli_values(**shared)
    values["train"]["objective"] = objective
    if plan:
        run_plan(values, gpus, **shared)
        return
    run_training("sft", values, **shared)


def _size(n: float) -> str:
    if not n:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def run_plan(cli_values: dict, gpus: int, *, recipe, overrides, debug: bool, **_) -> None:
    """`difflm sft --plan`: the memory table of `difflm.training.plan` (stdout)."""

    def work() -> None:
        from rich.table import Table

        from cli.common import console
        from difflm.training import TrainRecipe
        from difflm.training.plan import plan_recipe

        cfg = load_cli_recipe(TrainRecipe, recipe, overrides, cli_values)
        shape, rows, s = plan_recipe(cfg, gpus)
        out = console()
        out.print(
            f"[bold]{s['model']}[/] ({s['family']}): {shape.params:,} parameters, {shape.layers} x {shape.block_class}; "
            f"LoRA r {s['lora_r']} on {','.join(s['lora_targets'])}: {shape.lora_params:,}\n"
            f"per GPU over {gpus} GPUs; seq {s['seq']}, micro-batch {s['micro_batch']}, weights {s['dtype']}, "
            f"precision {s['precision']}, gradient checkpointing {'on' if s['checkpointing'] else 'off'}, {s['optim']}"
        )
        table = Table(header_style="bold")
        for col in ("strategy", "params", "grads", "optim", "activ.", "total/GPU", "CPU/proc"):
            table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True,
                             min_width=13 if col == "strategy" else None)
        for r in rows:
            table.add_row(r.strategy, *(_size(v) for v in (r.params, r.grads, r.optimizer, r.activations, r.total)),
                          _size(r.cpu))
        out.print(table)
        out.print("Estimates (formulas: difflm/training/plan.py); add ~1-2 GiB per GPU for the CUDA context and allocator.")

    run_command(work, debug)


def _cli_values(*, model, adapter, mode, data, output_dir, max_steps, lr, resume, overwrite, **_) -> dict:
    """The recipe values the shared options give (None: not given)."""
    return {
        "model": {"name": model, "adapter": adapter},
        "data": {"path": data},
        "train": {
            "mode": mode, "output_dir": output_dir, "max_steps": max_steps,
            "resume": True if resume else None, "overwrite": True if overwrite else None,
        },
        "optim": {"lr": lr},
    }


def run_training(kind: str, cli_values: dict, *, recipe, overrides, quiet: bool, debug: bool, **_) -> None:
    """Shared body of `difflm sft` and `difflm r2ft` (`cli_values`: the recipe values the options give)."""

    def work() -> None:
        import datasets
        import transformers

        from difflm.training import TrainRecipe, train

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        cfg = load_cli_recipe(TrainRecipe, recipe, overrides, cli_values)
        main = os.environ.get("RANK", "0") == "0"
        show = main and not quiet
        if show:
            sections = {"model": cfg.model, "data": cfg.data, "train": cfg.train, "optim": cfg.optim}
            if cfg.train.mode != "full":
                sections["lora"] = cfg.lora
            if kind == "r2ft":
                sections["r2ft"] = cfg.r2ft
            if cfg.train.strategy == "fsdp2":
                sections["fsdp"] = cfg.fsdp
            print_config(sections, title=f"difflm {kind}")
        view = _LiveView(kind) if show else None
        try:
            if view:
                view.start()
            result = train(cfg, kind, callback=view.on_event if view else None)
        finally:
            if view:
                view.stop()
                if not view.err.is_terminal:
                    view.err.print()  # the last progress line has no newline off a terminal
        if main:
            last = result.metrics or {}
            msg = f"[green]done[/]: {result.steps} steps"
            if "loss" in last:
                msg += f", loss {last['loss']:.4f}"
            if result.eval:
                msg += f", held-out loss {result.eval['eval_loss']:.4f}"
            err_console().print(msg + f"\nwrote {result.final_dir} and {result.output_dir}/metrics.jsonl")

    run_command(work, debug)


class _LiveView:
    """Progress bar (step, loss, tokens/s, ETA) above a table of the last logged steps and evals."""

    def __init__(self, kind: str, rows: int = 8):
        from rich.console import Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.kind = kind
        self.err = err_console()
        self.rows: deque = deque(maxlen=rows)
        self.progress = Progress(
            TextColumn(f"[bold]{kind}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.err,
        )
        self.task = self.progress.add_task(kind, total=None, info="loading")
        self._group = Group
        self.live = Live(self._render(), console=self.err, refresh_per_second=4, transient=False)

    def _render(self):
        from rich.table import Table

        table = Table(header_style="bold", expand=False)
        cols = ["step", "loss", "lr", "grad", "tok/s"]
        if self.kind == "r2ft":
            cols += ["LW", "LL", "margin"]
        cols += ["held-out"]
        for c in cols:
            table.add_column(c, justify="right")
        for r in self.rows:
            table.add_row(*r)
        return self._group(table, self.progress) if self.rows else self._group(self.progress)

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def on_event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "start":
            self.progress.update(self.task, total=ev["total_steps"], completed=ev["start_step"], info="")
            where = f"resumed from {ev['resumed_from']}; " if ev.get("resumed_from") else ""
            self.live.console.print(
                f"{where}{ev['train_examples']} examples, {ev['total_steps']} steps of {ev['global_batch']} sequences "
                f"({ev['micro_batch']} x {ev['accumulation']} accumulation x {ev['world_size']} processes) on {ev['device']}; "
                f"{ev['trainable_params']:,} of {ev['total_params']:,} parameters trained"
            )
        elif kind == "step":
            fmt = lambda v, f: (f.format(v) if v is not None else "")  # noqa: E731
            row = [str(ev["step"]), fmt(ev["loss"], "{:.4f}"), fmt(ev["lr"], "{:.2e}"), fmt(ev.get("grad_norm"), "{:.3f}"),
                   fmt(ev.get("tokens_per_s"), "{:.0f}")]
            if self.kind == "r2ft":
                row += [fmt(ev.get("lw"), "{:.3f}"), fmt(ev.get("ll"), "{:.3f}"), fmt(ev.get("margin"), "{:.3f}")]
            row += [""]
            self.rows.append(row)
            info = f"loss {ev['loss']:.4f}  {ev.get('tokens_per_s', 0):.0f} tok/s"
            self.progress.update(self.task, completed=ev["step"], info=info)
        elif kind == "eval":
            n = 7 if self.kind == "r2ft" else 4
            self.rows.append([str(ev["step"])] + [""] * n + [f"{ev['eval_loss']:.4f}"])
        elif kind == "save":
            self.progress.update(self.task, info=f"saved step {ev['step']}")
        self.live.update(self._render())


def register(app: typer.Typer) -> None:
    app.command("sft")(sft)
