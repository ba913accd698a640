"""`difflm eval`: score `difflm generate` outputs and put runs side by side.

Thin: options -> `difflm.eval.*` -> printing. Subcommands: gsm8k, alpaca, fluency, report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Debug, Overrides, RecipePath, console, err_console, load_cli_recipe, run_command

eval_app = typer.Typer(
    name="eval",
    help="Evaluate generated outputs: GSM8K accuracy, AlpacaEval win rates, fluency diagnostics, reports.\n\n"
    "Example: difflm eval gsm8k --outputs runs/gsm8k-conv.json\n\n"
    "lm-evaluation-harness tasks: python -m difflm.eval.lm_eval_model --model difflm --model_args pretrained=... "
    "--tasks ...",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

Outputs = Annotated[
    Path,
    typer.Option("--outputs", "-i", metavar="OUT.json", dir_okay=False,
                 help="Outputs JSON written by difflm generate (its manifest beside it)."),
]
Results = Annotated[
    Optional[Path],
    typer.Option("--results", metavar="FILE", dir_okay=False,
                 help="Where to write the results JSON (default: OUT.json.<task>.json)."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the headline number.")]
#: the gen-PPL scorer when none is named: a real pre-trained AR model that loads offline (the smollm2 extra)
DEFAULT_SCORER = "smollm2-135m-instruct"


@eval_app.command("gsm8k")
def gsm8k(
    outputs: Outputs,
    data_path: Annotated[
        Optional[Path],
        typer.Option("--data-path", metavar="FILE", dir_okay=False,
                     help="Local copy of the GSM8K test set (hub schema: question, answer) for the gold answers."),
    ] = None,
    hub: Annotated[bool, typer.Option("--hub", help="Gold answers from openai/gsm8k on the Hub.")] = False,
    results: Results = None,
    show: Annotated[int, typer.Option("--show", metavar="N", help="Print N wrong items.")] = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Score GSM8K outputs: the last number of each output (a \\boxed{} value first) against the gold answer.

    Example: difflm eval gsm8k --outputs runs/gsm8k-conv.json

    Gold answers: the records' own `answer` fields (difflm generate --eval-set gsm8k keeps them), or
    --data-path FILE / --hub. Writes OUT.json.gsm8k.json (per-item results) and prints accuracy ± its
    standard error sqrt(p(1-p)/n).
    """

    def work() -> None:
        from difflm.eval.gsm8k import evaluate_file

        res = evaluate_file(outputs, data_path=data_path, use_hub=hub, results=results)
        out = console()
        line = (f"GSM8K accuracy {100 * res['accuracy']:.2f}% ± {100 * res['stderr']:.2f} "
                f"({res['correct']}/{res['n']} correct, {res['no_answer']} without a number)")
        if quiet:
            out.print(line, highlight=False)
            return
        s = res["settings"]
        out.print(f"[bold]{line}[/]", highlight=False)
        err_console().print(
            f"model {s.get('model')} · method {s.get('method')} · steps {s.get('steps')} · "
            f"gen_length {s.get('gen_length')} · prompt {s.get('prompt_format')}\n"
            f"results: {res['results_path']}  manifest: {res['manifest']}",
            highlight=False,
        )
        wrong = [it for it in res["items"] if not it["correct"]][:show]
        for it in wrong:
            err_console().print(f"  {it['id']}: predicted {it['prediction']}, gold {it['gold']}", highlight=False)

    run_command(work, debug)


def alpaca(
    outputs: Outputs,
    reference: Annotated[
        Path,
        typer.Option("--reference", metavar="REF.json", dir_okay=False,
                     help="Reference outputs (paper: an AR model of the same size, difflm generate --decode nucleus)."),
    ],
    recipe: RecipePath = None,
    annotator: Annotated[
        Optional[str],
        typer.Option("--annotator", help="alpaca_eval annotator config (name, folder or configs.yaml) "
                                         "[default: weighted_alpaca_eval_gpt4_turbo]."),
    ] = None,
    judge_base_url: Annotated[
        Optional[str],
        typer.Option("--judge-base-url", metavar="URL",
                     help="Any OpenAI-compatible server (vLLM, SGLang, llama.cpp, ...), e.g. http://127.0.0.1:8000/v1."),
    ] = None,
    judge_model: Annotated[
        Optional[str], typer.Option("--judge-model", metavar="NAME", help="The judge's model name at that server.")
    ] = None,
    judge_api_key_env: Annotated[
        Optional[str],
        typer.Option("--judge-api-key-env", metavar="VAR",
                     help="Environment variable holding the judge's key; default OPENAI_API_KEY, "
                          "not needed for a loopback URL."),
    ] = None,
    judge_timeout: Annotated[
        Optional[float], typer.Option("--judge-timeout", metavar="SECONDS", help="Per request (default 120).")
    ] = None,
    chunk_size: Annotated[
        Optional[int], typer.Option("--chunk-size", metavar="N", help="Pairs judged between cache writes (default 16).")
    ] = None,
    output_dir: Annotated[
        Optional[Path],
        typer.Option("--output-dir", "--out", file_okay=False,
                     help="alpaca_eval's files and the judge cache (default: OUT.json.alpaca_eval/)."),
    ] = None,
    max_instances: Annotated[
        Optional[int], typer.Option("--max-instances", help="Judge only N pairs (a cheap trial).")
    ] = None,
    results: Results = None,
    overrides: Overrides = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Judge outputs of any eval set against reference answers with an alpaca_eval annotator: win rate and
    length-controlled win rate, with standard errors, overall, per set, per category and per MT-Bench turn.

    Example: difflm eval alpaca --outputs runs/mt_bench-conv.json --reference runs/mt_bench-ref.json

    Example (a local judge): difflm eval alpaca --outputs runs/wiki-conv.json --reference runs/wiki-ref.json --judge-base-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2.5-72B-Instruct

    The default judge is OpenAI's GPT-4-turbo (OPENAI_API_KEY). With --judge-base-url/--judge-model only the
    endpoint and the model change; the annotator's prompt and parser stay. A recipe (--recipe judge.yaml) can hold
    annotator, judge_base_url, judge_model, judge_api_key_env, judge_timeout, chunk_size, max_instances.
    Writes OUT.json.alpaca.json and OUT.json.alpaca_eval/ (the judge cache: a rerun judges only the missing pairs).
    """
    cli_values = {"annotator": annotator, "judge_base_url": judge_base_url, "judge_model": judge_model,
                  "judge_api_key_env": judge_api_key_env, "judge_timeout": judge_timeout, "chunk_size": chunk_size,
                  "max_instances": max_instances}

    def work() -> None:
        from difflm.eval.alpaca import evaluate_files
        from difflm.eval.judge import JudgeRecipe

        cfg = load_cli_recipe(JudgeRecipe, recipe, overrides, cli_values)
        err = err_console()
        res = evaluate_files(
            outputs, reference, annotator=cfg.annotator, output_dir=output_dir, max_instances=cfg.max_instances,
            results=results, judge=cfg.endpoint(), chunk_size=cfg.chunk_size,
            on_progress=None if quiet else (lambda msg: err.print(msg, highlight=False)),
        )

        def pm(v, se):
            return "-" if v is None else (f"{v:.2f}" + ("" if se is None else f" ± {se:.2f}"))

        out = console()
        out.print(
            f"vs {Path(res['reference']).name}: win rate {pm(res['win_rate'], res['standard_error'])}%, "
            f"LC win rate {pm(res['length_controlled_winrate'], res['lc_standard_error'])}% "
            f"({res['n_total']} pairs, judge {res['judge']['annotator']})",
            highlight=False,
        )
        if quiet:
            return
        if res.get("lc_note"):
            err.print(f"note: {res['lc_note']}", highlight=False)
        groups = [(k, v) for key in ("by_eval_set", "by_category", "by_turn") for k, v in res[key].items()]
        if len(groups) > 1:
            from rich.table import Table

            t = Table(title="per set / category / turn")
            for col in ("group", "n", "win rate %", "LC win rate %"):
                t.add_column(col, justify="left" if col == "group" else "right")
            for key in ("by_eval_set", "by_category", "by_turn"):
                for k, v in res[key].items():
                    label = f"turn {k}" if key == "by_turn" else k
                    t.add_row(label, str(v["n"]), pm(v["win_rate"], v["standard_error"]),
                              pm(v["lc_win_rate"], v["lc_standard_error"]))
            out.print(t)
        err.print(f"results: {res['results_path']}  alpaca_eval files: {res['output_dir']}", highlight=False)

    run_command(work, debug)


# the same command under a name that says what it does on any set
eval_app.command("alpaca")(alpaca)
eval_app.command("pairwise", help="Alias of `difflm eval alpaca`: pairwise LLM-judged win rates on any eval set.\n\n"
                 "Example: difflm eval pairwise --outputs runs/wiki-conv.json --reference runs/wiki-ref.json")(alpaca)


@eval_app.command("fluency")
def fluency(
    outputs: Outputs,
    tokenizer: Annotated[
        Optional[str],
        typer.Option("--tokenizer", help="Tokenizer (folder or Hub name) for token-level metrics; default: words."),
    ] = None,
    frequent_from: Annotated[
        Optional[Path],
        typer.Option("--frequent-from", metavar="FILE", dir_okay=False,
                     help="Outputs JSON whose tokens define the frequent set (default: the outputs themselves)."),
    ] = None,
    top_frequent: Annotated[int, typer.Option("--top-frequent", min=1, help="Size of the frequent-token set.")] = 100,
    position_n: Annotated[int, typer.Option("--position-n", min=1, help="n of the repetition-by-position curve.")] = 4,
    bin_width: Annotated[int, typer.Option("--bin-width", min=1, help="Positions per bin of the curve.")] = 64,
    gen_ppl: Annotated[
        bool, typer.Option("--gen-ppl", help=f"Generative perplexity under --scorer (default {DEFAULT_SCORER}).")
    ] = False,
    scorer: Annotated[
        Optional[str],
        typer.Option("--scorer", metavar="MODEL",
                     help=f"AR causal LM for gen-PPL (folder, Hub name or {DEFAULT_SCORER}; the paper: gpt2-large). "
                          "Implies --gen-ppl."),
    ] = None,
    inlier_reference: Annotated[
        Optional[Path],
        typer.Option("--inlier-reference", metavar="FILE", dir_okay=False,
                     help="Reference texts (JSON list of strings, alpaca/alpaca_eval records, JSONL with "
                          "output/text/response) for the inlier share: gen-PPL within their mean ± 2 std. Implies --gen-ppl."),
    ] = None,
    reference_limit: Annotated[
        Optional[int], typer.Option("--reference-limit", min=1, metavar="N", help="Score only the first N reference texts.")
    ] = None,
    inlier_scale: Annotated[
        str, typer.Option("--inlier-scale", help="ppl|log: mean and std of gen-PPL or of log gen-PPL.")
    ] = "ppl",
    context: Annotated[
        str, typer.Option("--context", help="bos|prompt|chat: what the scored output is conditioned on.")
    ] = "bos",
    max_length: Annotated[
        Optional[int], typer.Option("--max-length", metavar="W",
                                    help="Scorer window in tokens (default min(its context, 1024)); longer texts are chunked.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Windows per scorer batch.")] = 8,
    dtype: Annotated[str, typer.Option("--dtype", help="Scorer weights: auto|float32|bfloat16|float16.")] = "auto",
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda if any).")] = None,
    results: Results = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Repetition and diversity of outputs: rep-2/rep-4, distinct-n, longest repeated span, frequent-token
    share, lengths, empty answers, repetition by distance from the prompt; with --scorer, generative
    perplexity (gen-PPL) per output, its mean and median, and with --inlier-reference the inlier share.

    Example: difflm eval fluency --outputs runs/alpaca-conv.json --tokenizer GSAI-ML/LLaDA-8B-Instruct

    Example: difflm eval fluency --outputs runs/alpaca-conv.json --scorer smollm2-135m-instruct --inlier-reference data/alpaca.json --reference-limit 2000

    Formulas: difflm/eval/README.md. Writes OUT.json.fluency.json.
    """

    def work() -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.table import Table

        from difflm.errors import ConfigError
        from difflm.eval.fluency import evaluate_file

        for name, value, allowed in (("--context", context, ("bos", "prompt", "chat")),
                                     ("--inlier-scale", inlier_scale, ("ppl", "log")),
                                     ("--dtype", dtype, ("auto", "float32", "bfloat16", "float16"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        want = gen_ppl or scorer is not None or inlier_reference is not None
        err = err_console()
        progress = Progress(TextColumn("[bold]gen-PPL {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=quiet or not want)
        tasks: dict[str, int] = {}

        def on_progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = progress.add_task(what, total=total)
            progress.update(tasks[what], completed=done, total=total)

        with progress:
            res = evaluate_file(
                outputs, tokenizer=tokenizer, frequent_from=frequent_from, top_frequent=top_frequent,
                position_n=position_n, bin_width=bin_width, results=results,
                scorer=(scorer or DEFAULT_SCORER) if want else None, scorer_dtype=dtype, device=device,
                context=context, max_length=max_length, batch_size=batch_size, inlier_reference=inlier_reference,
                reference_limit=reference_limit, inlier_scale=inlier_scale, on_progress=on_progress,
            )
        agg = res["aggregate"]
        out = console()

        def f(v, d=3):
            return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

        if quiet:
            line = (f"rep-2 {f(agg['rep_2'])} rep-4 {f(agg['rep_4'])} distinct-2 {f(agg['distinct_2'])} "
                    f"empty {f(agg['empty_share'])}")
            if want:
                line += f" gen-PPL mean {f(agg['gen_ppl_mean'], 2)} median {f(agg['gen_ppl_median'], 2)}"
            if agg.get("inlier_share") is not None:
                line += f" inlier {f(agg['inlier_share'])}"
            out.print(line, highlight=False)
            return
        t = Table(title=f"fluency of {outputs} ({res['settings']['fluency']['tokens']} tokens)")
        t.add_column("metric")
        t.add_column("value", justify="right")
        keys = ["outputs", "rep_2", "rep_4", "distinct_1", "distinct_2", "distinct_4", "longest_repeat_mean",
                "longest_repeat_max", "frequent_share", "tokens_mean", "content_tokens_mean", "empty_share"]
        if want:
            keys += ["gen_ppl_mean", "gen_ppl_median", "gen_ppl_pooled", "gen_ppl_scored", "gen_ppl_unscored"]
        if "inlier" in res:
            keys += ["inlier_share"]
        for k in keys:
            t.add_row(k, f(agg.get(k)))
        out.print(t)
        if want:
            g = res["settings"]["fluency"]["gen_ppl"]
            err.print(f"gen-PPL: scorer {g['scorer']} ({g['scorer_dtype']}), context {g['context']}, "
                      f"window {g['max_length']} tokens", highlight=False)
        if "inlier" in res:
            i = res["inlier"]
            err.print(f"inliers: {i['inliers']}/{i['outputs']} within {i['low']:.3f} .. {i['high']:.3f} "
                      f"(reference {i['reference']}: {i['reference_texts']} texts, {i['scale']} mean "
                      f"{i['reference_mean']:.3f} ± {i['k']:g} × std {i['reference_std']:.3f})", highlight=False)
        c = Table(title=f"repetition by position (rep-{position_n}, bins of {bin_width})")
        for col in ("positions", "counted", "repeated", "rate"):
            c.add_column(col, justify="right")
        for b in res["position_curve"]:
            c.add_row(f"{b['start']}-{b['end'] - 1}", str(b["positions"]), str(b["repeats"]), f(b["rate"]))
        out.print(c)
        err_console().print(f"results: {res['results_path']}", highlight=False)

    run_command(work, debug)


@eval_app.command("report")
def report(
    runs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN...", show_default=False,
                       help="Outputs JSON of difflm generate (manifest beside it) or folders of them."),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Folder for report.md, report.json and the PNG plots.")
    ] = Path("runs/report"),
    title: Annotated[str, typer.Option("--title", help="Report title.")] = "difflm eval report",
    x: Annotated[
        Optional[str],
        typer.Option("--x", metavar="KEY", help="Table and plot scores against this recipe key (a sweep's key), "
                                                "e.g. decode.kernel_size."),
    ] = None,
    score: Annotated[
        Optional[list[str]],
        typer.Option("--score", metavar="NAME", help="With --x: the scores to show (repeatable; default: all found), "
                                                     "e.g. gsm8k_accuracy, lc_win_rate, rep_4, gen_ppl_mean, r_star, "
                                                     "tokens_per_second, or an lm-eval task/metric."),
    ] = None,
    debug: Debug = False,
) -> None:
    """Put runs side by side: a table, report.md, report.json and PNG plots (score vs steps per method,
    repetition vs position, content tokens per forward pass). Every number names its manifest. RUN may also
    be an lm-eval results file (results_*.json of --output_path) or a folder of them.

    Example: difflm eval report runs/gsm8k-conv.json runs/gsm8k-llada.json --out runs/report

    Example: difflm eval report runs/sweep-k --x decode.kernel_size --out runs/report-k
    """

    def work() -> None:
        from rich.table import Table

        from difflm.eval.report import COLUMNS, TERMINAL_COLUMNS, build_report

        rep = build_report(runs, out_dir=out_dir, title=title, x=x, scores=score)
        cols = [(name, fn) for name, fn in COLUMNS if name in TERMINAL_COLUMNS]
        t = Table(title=title)
        for name, _ in cols:
            t.add_column(name, overflow="fold", justify="left" if name in ("run", "method") else "right")
        for r in rep["rows"]:
            t.add_row(*[str(fn(r)) for _, fn in cols])
        console().print(t)
        vs = rep.get("x")
        if vs is not None:
            v = Table(title=f"scores vs {vs['key']}")
            for col in (vs["key"], "group", "run", *vs["scores"]):
                v.add_column(col, overflow="fold", justify="left" if col in ("group", "run") else "right")
            for row in vs["rows"]:
                v.add_row(*[str(c) for c in (_num(row["x"]), row["group"], row["label"],
                                               *[_num(row[s]) for s in vs["scores"]])])
            console().print(v)
        err = err_console()
        for r in rep["rows"]:
            if r.get("kind") == "lm-eval":
                err.print(f"{r['label']}: lm-eval results {r['outputs']}", highlight=False)
                continue
            err.print(f"{r['label']}: {r.get('model')} on {r.get('device')}, manifest {r.get('manifest') or 'none'}",
                      highlight=False)
        err.print("wrote " + ", ".join(rep["files"].values()), highlight=False)

    run_command(work, debug)


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
