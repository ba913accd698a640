"""Effect of the approximate KV cache on the embedded tiny-math model: accuracy, repetition and time.

    python bench/cache_effect.py      # llada greedy, gen_length 32, 32 steps, blocks of 8, 200 held-out problems
"""
import time
from difflm.data.synthetic import math_problems
from difflm.decoding import DecodeConfig
from difflm.generation import iter_batches
from difflm.eval.gsm8k import is_correct
from difflm.eval.fluency import rep_n
from difflm.models import load_model

m = load_model("tiny-math", device="cpu")
probs = math_problems(200, seed=0, split="test")
items = [{"id": p["id"], "instruction": p["question"], "answer": p["answer"]} for p in probs]
for cache in (None, "prefix", "dual"):
    cfg = DecodeConfig(method="llada", gen_length=32, steps=32, block_length=8, temperature=0, cache=cache)
    t0 = time.perf_counter(); recs = []
    for b in iter_batches(m, items, cfg, prompt_format="raw", batch_size=50):
        recs += b
    dt = time.perf_counter() - t0
    acc = sum(is_correct(r["output"], r["answer"]) for r in recs) / len(recs)
    toks = [m.tokenizer(r["output"], add_special_tokens=False)["input_ids"] for r in recs]
    r2 = [rep_n(t, 2) for t in toks if rep_n(t, 2) is not None]
    print(f"cache={cache}: accuracy {acc:.3f}, rep-2 {sum(r2)/len(r2):.4f}, {dt:.1f} s")
