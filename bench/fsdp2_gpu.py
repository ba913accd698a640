#!/usr/bin/env python
"""One FSDP2 full fine-tuning step of a LLaDA-8B-shaped model with RANDOM weights (no download): memory and time.

    torchrun --nproc_per_node 1 bench/fsdp2_gpu.py --offload          # 1 GPU: weights, grads, AdamW on the CPU
    torchrun --nproc_per_node 8 bench/fsdp2_gpu.py                    # 8 GPUs, fully sharded in GPU memory
    torchrun --nproc_per_node 2 bench/fsdp2_gpu.py --tiny             # the same code path on the CPU (gloo)

What runs is difflm's FSDP2 path: the model is built on the meta device, sharded per LlamaDecoderLayer by
`difflm.training.fsdp.shard_model` (bf16 compute, fp32 reduction), materialised shard by shard on the device
(`to_empty` + transformers' own initialisation), then AdamW on the sharded weights, gradient checkpointing, and
`difflm.training.losses.sft_batch_loss` (the masked-diffusion loss) on random 1024-token sequences. Weights in
`--dtype` (default bfloat16: 2 + 2 + 4 bytes per parameter; float32 doubles it). Rank 0 prints one JSON object
(peak memory from torch.cuda.max_memory_allocated per rank, step times) and writes it to $OUT/fsdp2.json.
Compare with `difflm sft --plan` (the fsdp2 / fsdp2-offload rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=1)
    args = ap.parse_args()
    from qlora_gpu import LLADA_8B, TINY, build_model

    from difflm.models import DiffusionLM, TokenIds
    from difflm.training.fsdp import shard_model
    from difflm.training.loop import build_optimizer, enable_gradient_checkpointing
    from difflm.training.losses import sft_batch_loss
    from difflm.training.plan import model_shape, plan
    from difflm.training.recipes import OptimConfig

    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --tiny for the CPU version")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dims = dict(TINY if args.tiny else LLADA_8B)
    if args.seq:
        dims["seq"] = args.seq
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = build_model(dims, torch.device("meta"), dtype)
    shape = model_shape(model)
    enable_gradient_checkpointing(model)
    shard_model(model, precision="bf16", cpu_offload=args.offload)
    model.to_empty(device="cpu" if args.offload else device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.apply(model._init_weights)  # transformers' initialisation, on each rank's shards
        rope = model.model.rotary_emb  # its buffers were on the meta device too: recompute them (default RoPE)
        inv_freq, _ = rope.compute_default_rope_parameters(model.config)
        rope.inv_freq.copy_(inv_freq)
        rope.original_inv_freq.copy_(inv_freq)
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5, weight_decay=0.1), device)
    ids = TokenIds(mask_id=dims["mask_id"], eos_id=dims["eos_id"], pad_id=dims["eos_id"])
    dlm = DiffusionLM(model, "llada", ids, name="llada-8b-shaped-random", vocab_size=dims["vocab"])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1 + rank)
    prompt = max(1, dims["seq"] // 16)
    times, losses = [], []
    for step in range(args.steps + 1):  # step 0 warms up and is not timed
        x0 = torch.randint(0, dims["eos_id"], (args.micro_batch, dims["seq"]), generator=g)
        batch = {"input_ids": x0, "prompt_len": torch.full((args.micro_batch,), prompt),
                 "answer_len": torch.full((args.micro_batch,), dims["seq"] - prompt)}
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        loss, _ = sft_batch_loss(dlm, batch, list(range(step, step + args.micro_batch)), seed=rank, mask_id=ids.mask_id)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else 0], dtype=torch.float64,
                        device=device if cuda else "cpu")
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    gib = 1024**3
    strategy = "fsdp2-offload" if args.offload else "fsdp2"
    (planned,) = [r for r in plan(shape, gpus=world, seq=dims["seq"], micro_batch=args.micro_batch, dtype=args.dtype,
                                  checkpointing=True) if r.strategy == strategy]
    out = {
        "card": torch.cuda.get_device_name(device) if cuda else "cpu", "world_size": world, "strategy": strategy,
        "dims": dims, "params": shape.params, "dtype": args.dtype, "micro_batch": args.micro_batch,
        "peak_memory_gib_per_rank": [round(float(p) / gib, 3) for p in peaks],
        "planned_gib_per_gpu": round(planned.total / gib, 3), "planned_cpu_gib_per_rank": round(planned.cpu / gib, 3),
        "step_s": times, "mean_step_s": sum(times) / max(1, len(times)), "build_s": build_s, "losses": losses,
        "grad_norm_last": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
        "torch": torch.__version__,
    }
    if rank == 0:
        print(json.dumps(out))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "fsdp2.json").write_text(json.dumps(out, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
