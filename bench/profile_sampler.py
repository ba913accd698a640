"""Profile one decoding run's non-forward work on the GPU (torch.profiler, CUDA time by op).

    python bench/profile_sampler.py --method conv --gen-length 256 --batch 16
Uses a random-weight LLaDA-8B-shaped model (bf16) built on the GPU; the forward is replaced by fixed
random logits after the first pass so the profile shows the sampler alone.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from difflm.decoding import DecodeConfig, generate


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x, attention_mask=None):
        return self.logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="conv")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--real-model", action="store_true",
                    help="profile generate on the random-weight LLaDA-8B-shaped model (bench.py's) instead of fixed logits")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    P, L, V = 150, args.gen_length, args.vocab
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(args.batch, P + L, V, device=dev, dtype=torch.bfloat16, generator=g)
    model = FixedLogits(logits)
    if args.real_model:
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench as B

        del logits
        import dataclasses

        preset = B.PRESETS["llada-8b"]
        if dev.type != "cuda":  # rehearsal on a CPU: the same code path with small dims
            preset = dataclasses.replace(preset, **B.SCALE_DOWN)
        model = B.build_model(preset, dev, torch.bfloat16, seed=0)
        V = preset.vocab
        prompt = torch.randint(0, V - 2, (args.batch, P), device=dev)
    prompt = torch.randint(0, V - 2, (args.batch, P), device=dev)
    cfg = DecodeConfig(method=args.method, gen_length=L, steps=args.steps, kernel_size=L // 4, top_k=args.top_k,
                       block_length=32 if args.method in ("llada", "threshold") else None)
    generate(model, prompt, cfg, mask_id=V - 1, eos_id=V - 2)  # warm-up
    torch.cuda.synchronize() if dev.type == "cuda" else None
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        generate(model, prompt, cfg, mask_id=V - 1, eos_id=V - 2)
        torch.cuda.synchronize() if dev.type == "cuda" else None
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    print(table)
    out = os.environ.get("OUT")
    if out:
        tag = "-real" if args.real_model else ""
        with open(os.path.join(out, f"profile-{args.method}{tag}.txt"), "w") as f:
            f.write(table)
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15)
    print(cpu)


if __name__ == "__main__":
    main()
