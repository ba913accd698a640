#!/usr/bin/env python
"""QLoRA memory and speed on a LLaDA-8B-shaped model with RANDOM weights (no download, nothing on disk).

    python bench/qlora_gpu.py                      # d_model 4096, 32 layers, 32 heads, MLP 12288, vocab 126464, seq 1024
    python bench/qlora_gpu.py --no-checkpointing   # the same without gradient checkpointing
    python bench/qlora_gpu.py --tiny               # the same code path on the CPU: small dims, plain LoRA
    python bench/qlora_gpu.py --tiny --bnb         # ... with the 4-bit layers too (bitsandbytes' CPU backend)

What runs is difflm's own training path: a bidirectional `LlamaForCausalLM` (is_causal False, as difflm
loads LLaDA), every linear layer of the decoder blocks quantised to 4-bit NF4 with double quantisation
and bf16 compute (the embeddings and the output head stay bf16, as transformers' BitsAndBytesConfig
leaves them), `difflm.training.loop.add_lora` (r 64, alpha 16, dropout 0.1 on q/k/v) and
`enable_gradient_checkpointing`, AdamW on the adapter, and `difflm.training.losses.sft_batch_loss`
(the masked-diffusion loss) on one random 1024-token sequence per step, under bf16 autocast.

The model is built directly on the GPU in bf16 (`_from_config` under `torch.device("cuda")`: ~16 GB
for a moment) and each linear layer is swapped for a `bitsandbytes.nn.Linear4bit` whose `Params4bit`
is quantised in place from the bf16 weight (the same `quantize_4bit` call from_pretrained's quantizer
makes); the bf16 copy is freed layer by layer. That is the quickest correct route: from_pretrained
would need a 16 GB checkpoint on disk first.

Prints one JSON object (card, peak memory from torch.cuda.max_memory_allocated, step times) and writes
it to $OUT/qlora.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

LLADA_8B = dict(hidden=4096, layers=32, heads=32, mlp=12288, vocab=126464, seq=1024, mask_id=126336, eos_id=126081)
TINY = dict(hidden=64, layers=2, heads=4, mlp=128, vocab=256, seq=64, mask_id=255, eos_id=254)


def build_model(dims: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A random bidirectional Llama of LLaDA's architecture, created on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["mlp"],
        num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"], num_key_value_heads=dims["heads"],
        head_dim=dims["hidden"] // dims["heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, use_cache=False, is_causal=False,
    )
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model


def quantize_4bit_(model: nn.Module, device: torch.device, compute_dtype=torch.bfloat16) -> int:
    """Replace every nn.Linear of the decoder blocks by a bitsandbytes NF4 Linear4bit (double
    quantisation), quantising its weight where it lies. Returns the number of layers replaced."""
    import bitsandbytes as bnb

    layers = model.model.layers
    names = [n for n, m in layers.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = layers.get_submodule(parent_name)
        lin = getattr(parent, attr)
        q = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
            compress_statistics=True, quant_type="nf4", device="meta",
        )
        weight = bnb.nn.Params4bit(
            lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
        )
        q.weight = weight._quantize(device)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        setattr(parent, attr, q)
        del lin, weight
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; peft dispatches on it
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return len(names)


def run(args) -> dict:
    from difflm.models import DiffusionLM, TokenIds
    from difflm.training.loop import add_lora, build_optimizer, enable_gradient_checkpointing
    from difflm.training.losses import sft_batch_loss
    from difflm.training.recipes import LoraConfig, OptimConfig

    dims = dict(TINY if args.tiny else LLADA_8B)
    if args.seq:
        dims["seq"] = args.seq
    if args.layers:
        dims["layers"] = args.layers
    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --tiny for the CPU version")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if (cuda or args.bnb) else torch.float32
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(dims, device, dtype)
    quantized = quantize_4bit_(model, device) if (cuda or args.bnb) else 0
    model.requires_grad_(False)
    model = add_lora(model, LoraConfig(r=args.lora_r, alpha=16, dropout=0.1), ["q_proj", "k_proj", "v_proj"])
    if args.checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    lora_layers = sum(1 for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj")) and hasattr(m, "lora_A"))
    if quantized:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        assert any(isinstance(m, LoraLinear4bit) for m in model.modules()), "peft did not use its 4-bit LoRA layer"
    ids = TokenIds(mask_id=dims["mask_id"], eos_id=dims["eos_id"], pad_id=dims["eos_id"])
    dlm = DiffusionLM(model, "llada", ids, name="llada-8b-shaped-random", vocab_size=dims["vocab"])
    optimizer = build_optimizer(model, OptimConfig(lr=2.5e-5, weight_decay=0.1), device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cuda:
        torch.cuda.synchronize()
        weights_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(1)
    prompt = max(1, dims["seq"] // 16)
    times = []
    losses = []
    for step in range(args.steps + 1):  # step 0 warms up (kernels, allocator) and is not timed
        x0 = torch.randint(0, dims["eos_id"], (args.micro_batch, dims["seq"]), generator=g)
        batch = {
            "input_ids": x0,
            "prompt_len": torch.full((args.micro_batch,), prompt),
            "answer_len": torch.full((args.micro_batch,), dims["seq"] - prompt),
        }
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda or args.bnb):
            loss, _ = sft_batch_loss(dlm, batch, list(range(step * args.micro_batch, (step + 1) * args.micro_batch)),
                                     seed=0, mask_id=ids.mask_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))

    import bitsandbytes
    import peft
    import transformers

    gib = 1024**3
    out = {
        "card": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "mode": "qlora-nf4-double-quant" if quantized else "lora-tiny-cpu",
        "dims": dims,
        "micro_batch": args.micro_batch,
        "gradient_checkpointing": args.checkpointing,
        "lora": {"r": args.lora_r, "alpha": 16, "dropout": 0.1, "targets": ["q_proj", "k_proj", "v_proj"], "layers": lora_layers},
        "quantized_linear_layers": quantized,
        "trainable_params": trainable,
        "weights_memory_gib": round(weights_bytes / gib, 3) if cuda else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / gib, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3) if cuda else None,
        "step_time_s": sum(times) / len(times) if times else None,
        "step_times_s": [round(x, 4) for x in times],
        "tokens_per_s": args.micro_batch * dims["seq"] / (sum(times) / len(times)) if times else None,
        "losses": [round(x, 4) for x in losses],
        "build_s": round(build_s, 2),
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "cuda": torch.version.cuda,
        },
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small dims on the CPU, plain LoRA (no bitsandbytes)")
    p.add_argument("--bnb", action="store_true", help="with --tiny: quantise to 4-bit on the CPU too (bitsandbytes CPU backend)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 1024; tiny 64)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    args = p.parse_args(argv)
    out = run(args)
    text = json.dumps(out, indent=2)
    print(text)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "qlora.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
