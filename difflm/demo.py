"""`make demo`: conv decoding next to top-k full-window decoding, live, offline, on the CPU.

Runs `difflm generate --decode conv --live` on the embedded `tiny-shakespeare` model (a 2.6M-parameter
masked-diffusion LM trained on Shakespeare, shipped in the package: no download, no training), then the
same prompt with top-k confidence decoding over the full window at the same number of steps, and prints
the repetition figures of both (rep-2, rep-4, distinct-2 from `difflm.eval.fluency`, on the model's tokens)
side by side. Run: `python -m difflm.demo [--model tiny-shakespeare --gen-length 96 --steps 32 --prompt ...]`.
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

DEFAULT_PROMPT = "ROMEO.\nO, she doth teach the torches to burn bright!\n\nJULIET.\n"


def figures(texts: list[str], tokenizer) -> dict[str, float | None]:
    from difflm.eval.fluency import distinct_n, rep_n, tokenize

    toks = tokenize(texts, tokenizer)
    return {
        "tokens": float(len(toks[0])),
        "rep-2": rep_n(toks[0], 2),
        "rep-4": rep_n(toks[0], 4),
        "distinct-2": distinct_n(toks, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-shakespeare")
    ap.add_argument("--gen-length", type=int, default=96)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--kernel-size", type=int, default=None, help="conv window (default: gen_length // 4)")
    ap.add_argument("--top-k", type=int, default=20, help="sample among the k most likely tokens (the paper: 20)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--no-live", action="store_true", help="no live canvas (tests, logs)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    kernel = args.kernel_size or max(3, args.gen_length // 4)
    print(f"difflm demo: the embedded model {args.model!r}, {args.gen_length} new tokens in {args.steps} steps.")
    print(f"prompt: {args.prompt!r}\n", flush=True)
    common = ["-m", args.model, "-p", args.prompt, "--prompt-format", "raw", "--gen-length", str(args.gen_length),
              "--steps", str(args.steps), "--top-k", str(args.top_k), "--seed", "0", "-q", "--overwrite"]
    runs = [
        ("conv", f"conv decoding (kernel {kernel})", ["--decode", "conv", "--kernel-size", str(kernel)]),
        ("topk", "top-k confidence decoding over the full window", ["--decode", "topk"]),
    ]
    outputs: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, title, extra in runs:
            print(f"=== {title} ===", flush=True)
            out = Path(tmp) / f"{key}.json"
            live = [] if args.no_live else ["--live"]
            rc = subprocess.call([sys.executable, "-m", "cli.main", "generate", *common, *extra, *live, "-o", str(out)])
            if rc:
                return rc
            outputs[key] = json.loads(out.read_text())[0]["output"]
            if args.no_live:  # the live view prints the text itself
                print(outputs[key])
            print(flush=True)
    from difflm.models.named import embedded_model_dir
    from transformers import AutoTokenizer

    tok_dir = embedded_model_dir(args.model) if not Path(args.model).is_dir() else Path(args.model)
    tok = AutoTokenizer.from_pretrained(str(tok_dir or args.model))
    rows = {key: figures([text], tok) for key, text in outputs.items()}
    print("=== repetition (lower rep-n and higher distinct-2 are better; model tokens) ===")
    print(f"{'':<12}{'conv':>10}{'top-k full':>12}")
    for metric in ("tokens", "rep-2", "rep-4", "distinct-2"):
        vals = [rows[k][metric] for k in ("conv", "topk")]
        cells = ["-" if v is None else (f"{v:.0f}" if metric == "tokens" else f"{v:.3f}") for v in vals]
        print(f"{metric:<12}{cells[0]:>10}{cells[1]:>12}")
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
