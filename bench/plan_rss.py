#!/usr/bin/env python
"""The memory planner (`difflm sft --plan`) against a measured CPU peak: a random bidirectional Llama trained in
fp32 with AdamW (the DDP row on one process), peak RSS growth over the process before the model was built.

    OMP_NUM_THREADS=1 python bench/plan_rss.py                 # ~36M parameters, seq 256, micro-batch 2
    OMP_NUM_THREADS=1 python bench/plan_rss.py --checkpointing

Prints one JSON line: planned params/grads/optimizer/activations and total (MiB), measured peak RSS growth (MiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from difflm.training.plan import model_shape, plan

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        shape = model_shape(LlamaForCausalLM(cfg))
    (row,) = [r for r in plan(shape, gpus=1, seq=args.seq, micro_batch=args.batch, dtype="float32", precision="fp32",
                              checkpointing=args.checkpointing) if r.strategy == "ddp"]
    x = torch.randint(0, 8192, (args.batch, args.seq))
    torch.manual_seed(0)
    before = rss_mib()
    model = LlamaForCausalLM(cfg)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, 8192), x.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as the plan counts them
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    mib = 1024**2
    print(json.dumps({
        "params": shape.params, "checkpointing": args.checkpointing, "seq": args.seq, "micro_batch": args.batch,
        "planned_MiB": {k: round(getattr(row, k) / mib, 1) for k in ("params", "grads", "optimizer", "activations", "total")},
        "measured_peak_rss_growth_MiB": round(peak - before, 1),
    }))


if __name__ == "__main__":
    main()
