"""`make demo`: conv decoding next to top-k full-window decoding, live, offline, on the CPU.

Until the embedded trained models land (issue 5), the demo runs on a tiny *randomly initialised*
bidirectional Llama built on the fly: it shows the machinery (the denoising canvas growing from the
prompt under conv versus scattered full-window unmasking, NFE, fill-pass counts, repetition), not the
quality of a trained model. Run: `python -m difflm.demo [--gen-length 64 --steps 16]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def rep_n(tokens: list[str], n: int) -> float:
    """Share of repeated n-grams: 1 - distinct n-grams / all n-grams (0 when there are none)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", default="the cat sat on the mat and")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from difflm.testing import build_tiny_llada_checkpoint

    cache = Path(os.environ.get("DIFFLM_CACHE", Path(tempfile.gettempdir()) / "difflm-demo"))
    model_dir = cache / "tiny-random-llada"
    if not (model_dir / "model.safetensors").exists():
        build_tiny_llada_checkpoint(model_dir, d_model=64, n_layers=2, n_heads=4, mlp=128, seed=0)
    print("difflm demo: a tiny RANDOMLY INITIALISED model (no trained weights yet): watch the decoding order.\n")
    common = ["-m", str(model_dir), "-p", args.prompt, "--prompt-format", "raw", "--gen-length", str(args.gen_length),
              "--steps", str(args.steps), "--top-k", "1", "--seed", "0", "-q"]
    runs = [
        ("conv", ["--decode", "conv", "--kernel-size", str(max(3, args.gen_length // 4)), "--live"]),
        ("top-k, full window", ["--decode", "topk", "--live"]),
    ]
    for title, extra in runs:
        print(f"=== {title} ===", flush=True)
        rc = subprocess.call([sys.executable, "-m", "cli.main", "generate", *common, *extra])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
