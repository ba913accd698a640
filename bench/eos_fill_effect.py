"""What EOS fill saves on the embedded tiny-math model: forward passes, sequences run, time, accuracy.

    python bench/eos_fill_effect.py          # 200 held-out problems, gen_length 64, batches of 50, CPU

Answers are ~15-25 tokens, so at gen_length 64 most of the canvas is EOS padding. With EOS fill, everything
right of a decoded EOS becomes EOS at once; a row with nothing left to decode leaves the forward pass
(GenerateOutput.row_passes counts the sequences actually run), and a batch stops when all rows are done.
"""
import argparse
import time

import torch

from difflm.data.prompts import encode_prompt
from difflm.data.synthetic import math_problems
from difflm.decoding import DecodeConfig, generate, item_seed
from difflm.eval.gsm8k import is_correct
from difflm.generation import left_pad
from difflm.models import load_model


def encode_padded(model, prompts):
    return left_pad([encode_prompt(model, p, None, "raw") for p in prompts], model.ids.pad_id)


ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default="tiny-math")
ap.add_argument("--n", type=int, default=200)
ap.add_argument("--batch-size", type=int, default=50)
ap.add_argument("--gen-length", type=int, default=64)
args = ap.parse_args()

m = load_model(args.model, device="cpu")
probs = math_problems(args.n, seed=0, split="test")
L = args.gen_length
settings = {
    "llada (greedy, blocks of 8)": dict(method="llada", steps=L, block_length=8, temperature=0.0),
    "threshold 0.9 (blocks of 8)": dict(method="threshold", steps=L, block_length=8, threshold=0.9, temperature=0.0),
    "conv (top-k 1, steps L/2)": dict(method="conv", steps=L // 2, top_k=1),
}
print(f"{args.model}, {args.n} held-out problems, gen_length {L}, batch {args.batch_size}, "
      f"{torch.get_num_threads()} threads")
print("| decoder | EOS fill | accuracy | NFE (sum over batches) | sequences run | time (s) |")
print("|---|---|---|---|---|---|")
for name, kw in settings.items():
    for fill in (False, True):
        cfg = DecodeConfig(gen_length=L, eos_fill=fill, **kw)
        t0 = time.perf_counter()
        nfe = rows = correct = 0
        for start in range(0, args.n, args.batch_size):
            chunk = probs[start : start + args.batch_size]
            ids, am = encode_padded(m, [p["question"] for p in chunk])
            out = generate(m, ids, cfg, attention_mask=am, row_seeds=[item_seed(0, p["id"]) for p in chunk])
            nfe += out.nfe
            rows += out.row_passes
            texts = m.tokenizer.batch_decode(out.sequences[:, out.prompt_length :], skip_special_tokens=True)
            correct += sum(is_correct(t, p["answer"]) for t, p in zip(texts, chunk))
        dt = time.perf_counter() - t0
        print(f"| {name} | {'on' if fill else 'off'} | {correct / args.n:.3f} | {nfe} | {rows} | {dt:.1f} |", flush=True)
