#!/usr/bin/env python
"""Decoder speed benchmark: difflm's decoders against straightforward reference loops, on random-weight
bidirectional Llama models of LLaDA's architecture.

    python bench/bench.py --preset tiny
    python bench/bench.py --preset synthetic-32k --gen-length 256
    python bench/bench.py --preset llada-8b --device cuda --dtype bfloat16 --gen-length 256 512 --batch 1 16
    python bench/bench.py --preset llada-8b --scale-down --device cpu      # the GPU code path, small, on CPU

Prints one table per (gen_length, batch) cell and writes bench/results/<name>.json (atomically, after every
decoder, so a killed run keeps what it measured). Each decoder's time is split into the model forward
(timed between torch.cuda.synchronize() calls by a wrapper around the model) and everything else (the
sampler). See bench/README.md for the columns and the presets.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

_T_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import reference as ref  # noqa: E402
from difflm.decoding import DecodeConfig, generate  # noqa: E402
from difflm.io import atomic_write_json  # noqa: E402

# ------------------------------------------------------------------------------------------------
# presets: model shapes and default settings


@dataclass(frozen=True)
class Preset:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    prompt_length: int
    gen_length: int
    batch: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    max_steps: int = 0  #: time the first N steps of a decoder and extrapolate (0: run it whole)
    repeats: int = 1
    methods: tuple[str, ...] = ()
    gpu_only: bool = False


ALL_METHODS = (
    "llada", "llada-fast", "conv", "llada_conv", "threshold", "topk", "ref-llada", "ref-llada-fast", "ref-conv",
    "llada-dual", "threshold-dual",
)
GPU_METHODS = ("ref-llada", "llada", "conv", "threshold", "ref-conv", "llada-dual", "threshold-dual")

PRESETS = {
    "tiny": Preset("tiny", 1000, 64, 2, 4, 128, 16, 64, repeats=3, methods=ALL_METHODS),
    "synthetic-32k": Preset("synthetic-32k", 32000, 256, 4, 4, 688, 256, 256, max_steps=32, methods=ALL_METHODS),
    "synthetic-126k": Preset("synthetic-126k", 126464, 256, 2, 4, 688, 256, 256, max_steps=8, methods=ALL_METHODS),
    # LLaDA-8B's shapes (GSAI-ML/LLaDA-8B-Instruct's config.json); prompt ~ a GSM8K question
    "llada-8b": Preset(
        "llada-8b", 126464, 4096, 32, 32, 12288, 150, 256, device="cuda", dtype="bfloat16", max_steps=32,
        methods=GPU_METHODS, gpu_only=True,
    ),
}
#: --scale-down: the same preset (settings, dtype, code path) with a model small enough for a CPU.
SCALE_DOWN = dict(vocab=2048, hidden=64, layers=2, heads=4, intermediate=192)

#: A GSM8K-shaped run for the compute-floor estimate (test split; prompt ~150 tokens; the paper's L, S).
GSM8K = dict(prompts=1319, prompt_length=150, gen_length=256, steps=64)

PAIRS = (("llada", "ref-llada"), ("llada-fast", "ref-llada-fast"), ("conv", "ref-conv"))


@dataclass(frozen=True)
class Spec:
    """One decoder to time."""

    name: str
    impl: str  #: "difflm" or "reference"
    method: str  #: llada | conv | llada_conv | threshold | topk
    steps: int
    block_length: int | None = None
    kernel_size: int | None = None
    top_k: int | None = None
    threshold: float | None = None
    temperature: float | None = None  #: None: the method's default (0 for llada-style, 1 for conv/topk)
    cache: str | None = None  #: difflm's approximate KV cache (prefix | dual) for block methods

    @property
    def max_nfe(self) -> int:
        return self.steps


def decoder_specs(gen_length: int, args) -> dict[str, Spec]:
    L = gen_length
    steps = args.steps or max(1, L // 4)
    block = min(args.block_length, L)
    kernel = args.kernel_size or max(1, L // 4)
    top_k = args.top_k or None
    temp = args.temperature
    return {
        "llada": Spec("llada", "difflm", "llada", L, block),
        "llada-fast": Spec("llada-fast", "difflm", "llada", steps, block),
        "conv": Spec("conv", "difflm", "conv", steps, kernel_size=kernel, top_k=top_k, temperature=temp),
        "llada_conv": Spec("llada_conv", "difflm", "llada_conv", steps, kernel_size=kernel),
        "threshold": Spec("threshold", "difflm", "threshold", L, block, threshold=args.threshold),
        "llada-dual": Spec("llada-dual", "difflm", "llada", L, block, cache="dual"),
        "threshold-dual": Spec("threshold-dual", "difflm", "threshold", L, block, threshold=args.threshold, cache="dual"),
        "topk": Spec("topk", "difflm", "topk", steps, top_k=top_k, temperature=temp),
        "ref-llada": Spec("ref-llada", "reference", "llada", L, block, temperature=0.0),
        "ref-llada-fast": Spec("ref-llada-fast", "reference", "llada", steps, block, temperature=0.0),
        "ref-conv": Spec("ref-conv", "reference", "conv", steps, kernel_size=kernel, top_k=top_k, temperature=temp),
    }


# ------------------------------------------------------------------------------------------------
# the model


def build_model(p: Preset, device: torch.device, dtype: torch.dtype, seed: int):
    """A random-weight bidirectional Llama of LLaDA's architecture, created directly on `device` in
    `dtype` (never materialised elsewhere: an 8B model initialises in seconds on the GPU)."""
    cfg = LlamaConfig(
        vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate, num_hidden_layers=p.layers,
        num_attention_heads=p.heads, num_key_value_heads=p.heads, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        is_causal=False, use_cache=False,
    )
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        try:
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    model.eval().requires_grad_(False)
    if not is_bidirectional(model, p.vocab, device):
        # transformers 4.x ignores is_causal in the config; its sdpa path reads the attention modules' flag
        for layer in model.model.layers:
            layer.self_attn.is_causal = False
        if not is_bidirectional(model, p.vocab, device):
            raise RuntimeError(f"the model is causal (transformers {transformers.__version__}): need transformers 5.x")
    return model


@torch.no_grad()
def is_bidirectional(model, vocab: int, device: torch.device) -> bool:
    """Does position 0 see the last token? (A transformers 4.x install silently builds a causal model.)"""
    probe = torch.arange(8, device=device)[None] % (vocab - 2)
    a = model(input_ids=probe).logits[0, 0].float()
    probe[0, -1] = (probe[0, -1] + 1) % (vocab - 2)
    b = model(input_ids=probe).logits[0, 0].float()
    return not torch.equal(a, b)


class TimedModel:
    """Calls the model, sets the MASK logit to -inf (a trained model never predicts MASK; random weights
    would), and records when each forward pass started and ended, between CUDA synchronisations (so
    the sampler's queued GPU work is charged to the sampler, not to the next forward)."""

    def __init__(self, model, mask_id: int, device: torch.device):
        self.model, self.mask_id = model, mask_id
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.spans: list[tuple[float, float]] = []

    @property
    def calls(self) -> int:
        return len(self.spans)

    @property
    def forward_s(self) -> float:
        return sum(b - a for a, b in self.spans)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    #: like a DiffusionLM: difflm's decoders ask for the generated positions' logits only (the reference
    #: loops, written as LLaDA's, do not)
    accepts_logits_to_keep = True

    def __call__(self, input_ids, attention_mask=None, logits_to_keep=None, **kwargs):
        """Logits; with extra keyword arguments (the KV-cache path: use_cache, cache, position_ids) the
        model's whole output object, as the cache needs it."""
        self.sync()
        t0 = time.perf_counter()
        if logits_to_keep is not None:
            kwargs_model = dict(kwargs, logits_to_keep=logits_to_keep)
        else:
            kwargs_model = kwargs
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs_model)
        out.logits[..., self.mask_id] = float("-inf")
        self.sync()
        self.spans.append((t0, time.perf_counter()))
        return out if kwargs else out.logits


def step_times(spans: list[tuple[float, float]], t_start: float, t_end: float) -> tuple[list[float], list[float]]:
    """Per step: (forward seconds, sampler seconds). A step's sampler time runs from the end of its forward
    to the start of the next one (the last: to the end of the call); set-up before the first forward is
    charged to the first step."""
    fwd = [b - a for a, b in spans]
    nxt = [a for a, _ in spans[1:]] + [t_end]
    smp = [n - b for (_, b), n in zip(spans, nxt)]
    if smp:
        smp[0] += spans[0][0] - t_start
    return fwd, smp


# ------------------------------------------------------------------------------------------------
# timing one decoder


class _Stop(Exception):
    """Raised from difflm's step callback to end a capped run."""


def run_once(spec: Spec, timed: TimedModel, prompt: torch.Tensor, gen_length: int, ids: dict, seed: int,
             cap: int | None) -> dict:
    """One generate call. cap: stop after this many forward passes (None: run to the end)."""
    plen = prompt.shape[1]
    timed.reset()
    timed.sync()
    t0 = time.perf_counter()
    if spec.impl == "difflm":
        cfg = DecodeConfig(
            method=spec.method, gen_length=gen_length, steps=spec.steps, block_length=spec.block_length,
            kernel_size=spec.kernel_size, top_k=spec.top_k, threshold=spec.threshold, temperature=spec.temperature,
            cache=spec.cache, seed=seed,
            forward_reuse=False,  # one forward per step, as the reference loops: per-step costs stay comparable
        )
        state = {}

        def stop_at_cap(ev):
            if cap is not None and ev["nfe"] >= cap:
                state["x"] = ev["x"].clone()
                raise _Stop

        try:
            x = generate(timed, prompt, cfg, mask_id=ids["mask_id"], eos_id=ids["eos_id"], callback=stop_at_cap).sequences
        except _Stop:
            x = state["x"]
    else:
        gen = torch.Generator(device=prompt.device)
        gen.manual_seed(seed)
        if spec.method == "llada":
            x, _ = ref.llada_generate(
                timed, prompt, steps=spec.steps, gen_length=gen_length, block_length=spec.block_length,
                mask_id=ids["mask_id"], temperature=spec.temperature or 0.0, generator=gen, max_steps=cap,
            )
        else:
            x, _ = ref.conv_generate(
                timed, prompt, steps=spec.steps, gen_length=gen_length, kernel_size=spec.kernel_size,
                mask_id=ids["mask_id"], top_k=spec.top_k, temperature=spec.temperature or 1.0, generator=gen,
                max_steps=cap,
            )
    timed.sync()
    t1 = time.perf_counter()
    capped = bool((x[:, plen:] == ids["mask_id"]).any()) and cap is not None and timed.calls >= cap
    fwd, smp = step_times(timed.spans, t0, t1)
    return dict(x=x, wall_s=t1 - t0, forward_s=sum(fwd), nfe=timed.calls, capped=capped, step_fwd=fwd, step_smp=smp)


def content_tokens(gen: torch.Tensor, eos_id: int) -> list[int]:
    """Per row: generated tokens before the first EOS (EOS fill is off; no padding in the answer)."""
    is_eos = gen == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], gen.shape[1], dtype=torch.long))
    return [int(v) for v in first.tolist()]


def bench_decoder(spec: Spec, timed: TimedModel, prompt, gen_length: int, ids: dict, args) -> dict:
    cap = args.max_steps if args.max_steps and args.max_steps < spec.max_nfe else None
    warm = min(args.warmup_steps, cap or spec.max_nfe)
    if warm > 0:
        run_once(spec, timed, prompt, gen_length, ids, args.seed, warm if warm < spec.max_nfe else None)
    if timed.cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [run_once(spec, timed, prompt, gen_length, ids, args.seed, cap) for _ in range(args.repeats)]
    last = runs[-1]
    nfe = last["nfe"]
    # per-step times over every timed step: means (the truth on a machine of one's own), or medians (robust
    # to other processes sharing a CPU); both are in the JSON
    n_all = sum(r["nfe"] for r in runs)
    fwd_mean = sum(r["forward_s"] for r in runs) / n_all
    smp_mean = sum(r["wall_s"] - r["forward_s"] for r in runs) / n_all
    fwd_med = statistics.median(v for r in runs for v in r["step_fwd"])
    smp_med = statistics.median(v for r in runs for v in r["step_smp"])
    fwd, smp = (fwd_mean, smp_mean) if args.stat == "mean" else (fwd_med, smp_med)
    plen = prompt.shape[1]
    gen = last["x"][:, plen:]
    if last["capped"]:
        if spec.method == "threshold":  # data-dependent NFE: extrapolate the slowest row's commit rate
            done = int((gen != ids["mask_id"]).sum(1).min())
            nfe_full = min(gen_length, max(nfe, math.ceil(nfe * gen_length / max(1, done))))
        else:
            nfe_full = spec.steps
        content = [gen_length] * gen.shape[0]  # EOS fill off: assumed whole answer
    else:
        nfe_full = nfe
        content = content_tokens(gen, ids["eos_id"])
    total_s = (fwd + smp) * nfe_full
    out = dict(
        impl=spec.impl, method=spec.method, settings={k: v for k, v in asdict(spec).items() if k not in ("name",)},
        nfe=nfe_full, steps_timed=nfe, extrapolated=last["capped"], repeats=args.repeats,
        forward_s_per_step=fwd, sampler_s_per_step=smp, total_s_per_step=fwd + smp,
        sampler_share=smp / (fwd + smp) if fwd + smp > 0 else None,
        stat=args.stat, forward_s_per_step_mean=fwd_mean, sampler_s_per_step_mean=smp_mean,
        forward_s_per_step_median=fwd_med, sampler_s_per_step_median=smp_med,
        seconds=total_s, measured_seconds_per_repeat=[r["wall_s"] for r in runs],
        content_tokens=sum(content), content_tokens_per_row=content, content_tokens_estimated=last["capped"],
        content_tokens_per_nfe=statistics.mean(content) / nfe_full,
        content_tokens_per_s=sum(content) / total_s if total_s > 0 else None,
    )
    if timed.cuda:
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    out["_x"] = last["x"]  # for the equivalence check; dropped before writing JSON
    return out


# ------------------------------------------------------------------------------------------------
# machine, matmul rate, GSM8K floor


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = dict(
        device=device.type, cpu_model=cpu_model(), cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
        platform=platform.platform(), python=platform.python_version(),
    )
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
            gpu_memory_gb=round(prop.total_memory / 2**30, 1), gpu_capability=f"{prop.major}.{prop.minor}",
            cuda=torch.version.cuda,
        )
    return info


def versions() -> dict:
    import difflm

    v = dict(torch=torch.__version__, transformers=transformers.__version__, difflm=difflm.__version__)
    try:
        v["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        v["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        v["git_commit"] = None
    return v


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0) -> dict:
    """FLOP/s of n x n x n GEMMs (2 n^3 FLOPs each), timed between synchronisations."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        c = a @ b
    sync()
    t0 = time.perf_counter()
    c = a @ b
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    iters = max(3, min(1000, int(seconds / one)))
    t0 = time.perf_counter()
    for _ in range(iters):
        c = a @ b
    sync()
    dt = time.perf_counter() - t0
    del a, b, c
    rate = 2 * n**3 * iters / dt
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), iters=iters, seconds=dt, flops_per_s=rate,
                tflops=rate / 1e12)


def gsm8k_estimate(record: dict, flop_params: float) -> dict | None:
    """Compute floor of a GSM8K-shaped run next to the time extrapolated from the measured conv throughput."""
    g = GSM8K
    tokens = g["prompt_length"] + g["gen_length"]
    flops = 2 * flop_params * tokens * g["steps"] * g["prompts"]
    est = dict(shape=dict(g), flop_params=flop_params, flops_per_token_forward=2 * flop_params, total_flops=flops)
    mm = record.get("matmul")
    if mm:
        est["matmul_tflops"] = mm["tflops"]
        est["floor_s"] = flops / mm["flops_per_s"]
    cells = [
        c for c in record["runs"]
        if c["gen_length"] == g["gen_length"] and "conv" in c["decoders"] and "seconds" in c["decoders"]["conv"]
        and c["decoders"]["conv"]["settings"]["steps"] == g["steps"]
    ]
    if cells:
        c = max(cells, key=lambda c: c["batch"])
        d = c["decoders"]["conv"]
        n_batches = math.ceil(g["prompts"] / c["batch"])
        est.update(
            measured_decoder="conv", measured_batch=c["batch"], measured_prompt_length=c["prompt_length"],
            measured_seconds_per_batch=d["seconds"], measured_extrapolated=d["extrapolated"],
            batches=n_batches, extrapolated_s=n_batches * d["seconds"],
        )
        if "floor_s" in est:
            est["extrapolated_over_floor"] = est["extrapolated_s"] / est["floor_s"]
    return est


# ------------------------------------------------------------------------------------------------
# output


def _fmt(v, spec=".3g"):
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def cell_rows(cell: dict) -> list[list[str]]:
    rows = []
    for name, d in cell["decoders"].items():
        if "error" in d or "skipped" in d:
            rows.append([name, d.get("impl", "-"), "-", "-", "-", "-", "-", "-", "-", d.get("error") or d["skipped"]])
            continue
        note = f"extrapolated from {d['steps_timed']} steps" if d["extrapolated"] else ""
        rows.append([
            name, d["impl"], str(d["nfe"]), f"{d['forward_s_per_step'] * 1e3:.2f}", f"{d['sampler_s_per_step'] * 1e3:.2f}",
            f"{100 * d['sampler_share']:.0f}%", f"{d['seconds']:.3g}", f"{d['content_tokens_per_nfe']:.2f}",
            _fmt(d["content_tokens_per_s"], ".4g"), note,
        ])
    return rows


HEADERS = ["decoder", "impl", "NFE", "fwd ms/step", "sampler ms/step", "sampler", "s/generate", "tok/NFE", "tok/s", "note"]


def print_table(title: str, rows: list[list[str]], plain: bool) -> None:
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table

            t = Table(title=title, title_justify="left")
            for i, h in enumerate(HEADERS):
                t.add_column(h, justify="left" if i in (0, 1, 9) else "right")
            for r in rows:
                t.add_row(*r)
            Console(width=max(140, len(title) + 4)).print(t)
            return
        except ImportError:
            pass
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADERS)]
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) if i in (0, 1, 9) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def cell_summary_lines(cell: dict) -> list[str]:
    lines = []
    for c in cell["comparisons"]:
        lines.append(
            f"  {c['difflm']} / {c['reference']}: time x{c['time_ratio']:.3f} (x{c['time_ratio_common_forward']:.3f} at a "
            f"common forward time), sampler x{c['sampler_ratio']:.3f}  (difflm {c['difflm_seconds']:.3g} s vs "
            f"reference {c['reference_seconds']:.3g} s per generate)"
        )
    for e in cell["equivalence"]:
        what = "whole run" if e["complete"] else f"first {e['steps_compared']} steps"
        verdict = "IDENTICAL" if e["identical"] else f"MISMATCH ({e['mismatched_tokens']} of {e['tokens']} tokens differ)"
        lines.append(f"  greedy {e['difflm']} vs {e['reference']} ({what}, {e['rows']} rows): {verdict}")
    return lines


SUMMARY_HEADERS = ["L", "batch", "decoder", "NFE", "fwd ms/step", "sampler ms/step", "sampler", "s/generate", "tok/s", "x"]


def summarize(paths: list[str]) -> None:
    """A compact table of result files (one row per cell and decoder); x = extrapolated from the first steps."""
    import json

    for path in paths:
        rec = json.loads(Path(path).read_text())
        m = rec["machine"]
        print(f"{path}: {rec['model']['name']} ({rec['model']['params'] / 1e6:.1f}M params, {rec['model']['dtype']}) on "
              f"{m.get('gpu_name') or m['cpu_model']}; torch {rec['versions']['torch']}, "
              f"transformers {rec['versions']['transformers']}")
        rows = []
        for c in rec["runs"]:
            for name, d in c["decoders"].items():
                if "seconds" not in d:
                    rows.append([str(c["gen_length"]), str(c["batch"]), name] + ["-"] * 6 + [d.get("error") or d.get("skipped", "")])
                    continue
                rows.append([
                    str(c["gen_length"]), str(c["batch"]), name, str(d["nfe"]), f"{d['forward_s_per_step'] * 1e3:.1f}",
                    f"{d['sampler_s_per_step'] * 1e3:.1f}", f"{100 * d['sampler_share']:.0f}%", f"{d['seconds']:.3g}",
                    _fmt(d["content_tokens_per_s"], ".4g"), "x" if d["extrapolated"] else "",
                ])
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(SUMMARY_HEADERS)]
        print("  ".join(h.rjust(w) for h, w in zip(SUMMARY_HEADERS, widths)))
        for r in rows:
            print("  ".join(c.rjust(w) if i != 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        for c in rec["runs"]:
            for line in cell_summary_lines(c):
                print(f"  L {c['gen_length']} batch {c['batch']}:{line}")
        if rec.get("matmul"):
            print(f"  matmul {rec['matmul']['n']}^3 {rec['matmul']['dtype']}: {rec['matmul']['tflops']:.4g} TFLOP/s")
        g = rec.get("gsm8k")
        if g and "floor_s" in g:
            print(f"  GSM8K-shaped compute floor {g['floor_s']:.4g} s"
                  + (f"; extrapolated from conv batch {g['measured_batch']}: {g['extrapolated_s']:.4g} s "
                     f"({g['extrapolated_over_floor']:.3g} x the floor)" if "extrapolated_over_floor" in g else ""))


# ------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--scale-down", action="store_true", help="the preset's code path with a tiny model (CPU tests)")
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="decoders, in order (default: the preset's)")
    ap.add_argument("--gen-length", nargs="+", type=int, help="one or more L (cells run L-major, in order)")
    ap.add_argument("--batch", nargs="+", type=int, help="one or more batch sizes")
    ap.add_argument("--prompt-length", type=int)
    ap.add_argument("--steps", type=int, help="steps of the reduced-step decoders (default gen_length/4)")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--kernel-size", type=int, help="conv window K (default gen_length/4)")
    ap.add_argument("--top-k", type=int, default=1, help="top-k of conv/topk (0: all tokens)")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=1.0, help="temperature of conv/topk (llada-style: 0)")
    ap.add_argument("--device", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float64"],
                    help="float64: CPU tests, where the reference-vs-difflm equivalence must not hinge on float32 near-ties")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--max-steps", type=int, help="time only the first N steps of a decoder, extrapolate (0: off)")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--stat", choices=["mean", "median"],
                    help="per-step statistic over the timed steps (default: median on cpu, mean on cuda)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET_S", 0) or 0),
                    help="start nothing new after this many seconds (env BENCH_BUDGET_S; 0: no limit)")
    ap.add_argument("--matmul", action="store_true", help="measure the GEMM rate (bf16 8192^3 on cuda)")
    ap.add_argument("--matmul-size", type=int)
    ap.add_argument("--gsm8k", action="store_true", help="GSM8K-shaped compute floor vs extrapolated time")
    ap.add_argument("--flop-params", type=float, default=8e9, help="N in 2*N FLOPs per token per forward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--plain", action="store_true", help="plain-text table (no rich)")
    ap.add_argument("--summary", nargs="+", metavar="JSON", help="print a compact table of result files and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summary:
        summarize(args.summary)
        return 0
    args.methods = list(dict.fromkeys(args.methods)) if args.methods else None
    preset = PRESETS[args.preset]
    if args.scale_down:
        preset = replace(preset, **SCALE_DOWN)
    args.device = args.device or preset.device
    args.dtype = args.dtype or preset.dtype
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if preset.gpu_only and args.device != "cuda" and not args.scale_down:
        print(f"error: preset {preset.name} is built on the GPU only; --scale-down tests its code path on CPU",
              file=sys.stderr)
        return 2
    args.methods = args.methods or list(preset.methods)
    args.gen_length = args.gen_length or [preset.gen_length]
    args.batch = args.batch or [preset.batch]
    args.prompt_length = args.prompt_length or preset.prompt_length
    args.repeats = args.repeats or preset.repeats
    args.max_steps = preset.max_steps if args.max_steps is None else args.max_steps
    args.stat = args.stat or ("mean" if args.device == "cuda" else "median")
    args.name = args.name or f"{preset.name}{'-scaled' if args.scale_down else ''}-{args.device}"
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    out_path = Path(args.out_dir) / f"{args.name}.json"
    ids = dict(mask_id=preset.vocab - 1, eos_id=preset.vocab - 2)

    t0 = time.perf_counter()
    model = build_model(preset, device, dtype, args.seed)
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    timed = TimedModel(model, ids["mask_id"], device)
    record = dict(
        name=args.name,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=[sys.executable, *sys.argv] if argv is None else ["bench.py", *argv],
        machine=machine_info(device),
        versions=versions(),
        settings={k: v for k, v in vars(args).items()},
        model=dict(asdict(preset), dtype=args.dtype, scale_down=args.scale_down, params=n_params, init_s=init_s, **ids),
        runs=[],
    )
    m = record["machine"]
    where = m.get("gpu_name") or f"{m['cpu_model']} ({m['cpu_cores']} cores, {m['torch_threads']} threads)"
    print(
        f"model {preset.name}{' (scaled down)' if args.scale_down else ''}: V {preset.vocab}, d {preset.hidden}, "
        f"{preset.layers} layers, {n_params / 1e6:.1f}M params, {args.dtype} on {args.device} [{where}], "
        f"built in {init_s:.1f} s; torch {torch.__version__}, transformers {transformers.__version__}",
        flush=True,
    )

    def save():
        atomic_write_json(out_path, record)

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - _T_START > args.budget_s

    if args.matmul:
        n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
        record["matmul"] = matmul_rate(device, dtype, n)
        print(f"matmul {n}^3 {args.dtype}: {record['matmul']['tflops']:.4g} TFLOP/s", flush=True)
        save()

    errors = 0
    gcpu = torch.Generator().manual_seed(args.seed)
    for L in args.gen_length:
        specs = decoder_specs(L, args)
        for B in args.batch:
            prompt = torch.randint(0, preset.vocab - 2, (B, args.prompt_length), generator=gcpu).to(device)
            cell = dict(gen_length=L, batch=B, prompt_length=args.prompt_length, decoders={}, comparisons=[],
                        equivalence=[])
            record["runs"].append(cell)
            xs = {}
            for name in args.methods:
                spec = specs[name]
                if over_budget():
                    cell["decoders"][name] = dict(impl=spec.impl, skipped=f"skipped: over the {args.budget_s:.0f} s budget")
                    continue
                try:
                    d = bench_decoder(spec, timed, prompt, L, ids, args)
                    xs[name] = d.pop("_x")
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    errors += 1
                    d = dict(impl=spec.impl, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                    print(f"  {name}: {d['error']}", file=sys.stderr, flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                cell["decoders"][name] = d
                save()
            dec = cell["decoders"]
            for a, b in PAIRS:
                if "seconds" in dec.get(a, {}) and "seconds" in dec.get(b, {}):
                    # both run the same forward passes; on a busy CPU their forward times still differ, so
                    # also compare at a common forward time (the mean of the two)
                    fa, fb = dec[a]["forward_s_per_step"], dec[b]["forward_s_per_step"]
                    sa, sb = dec[a]["sampler_s_per_step"], dec[b]["sampler_s_per_step"]
                    f = (fa + fb) / 2
                    cell["comparisons"].append(dict(
                        difflm=a, reference=b, difflm_seconds=dec[a]["seconds"], reference_seconds=dec[b]["seconds"],
                        time_ratio=dec[a]["seconds"] / dec[b]["seconds"], sampler_ratio=sa / max(sb, 1e-12),
                        time_ratio_common_forward=(f + sa) * dec[a]["nfe"] / ((f + sb) * dec[b]["nfe"]),
                    ))
                if a.startswith("llada") and a in xs and b in xs and dec[a]["steps_timed"] == dec[b]["steps_timed"]:
                    diff = int((xs[a] != xs[b]).sum())
                    cell["equivalence"].append(dict(
                        difflm=a, reference=b, steps_compared=dec[a]["steps_timed"],
                        complete=not (dec[a]["extrapolated"] or dec[b]["extrapolated"]), rows=B,
                        tokens=int(xs[a][:, args.prompt_length:].numel()), mismatched_tokens=diff, identical=diff == 0,
                    ))
            save()
            title = (f"{preset.name}{' (scaled down)' if args.scale_down else ''}: gen_length {L}, batch {B}, "
                     f"prompt {args.prompt_length}, {args.dtype} on {where}")
            print_table(title, cell_rows(cell), args.plain)
            for line in cell_summary_lines(cell):
                print(line)
            sys.stdout.flush()

    if args.gsm8k:
        record["gsm8k"] = est = gsm8k_estimate(record, args.flop_params)
        g = est["shape"]
        print(f"GSM8K-shaped run: {g['prompts']} prompts x ({g['prompt_length']} + {g['gen_length']}) tokens, "
              f"{g['steps']} NFE, 2 x {args.flop_params:.3g} FLOPs per token per forward = {est['total_flops']:.3g} FLOPs")
        if "floor_s" in est:
            print(f"  compute floor at the measured {est['matmul_tflops']:.4g} TFLOP/s: {est['floor_s']:.4g} s")
        if "extrapolated_s" in est:
            print(f"  extrapolated from difflm conv at batch {est['measured_batch']} (prompt "
                  f"{est['measured_prompt_length']}): {est['batches']} batches x {est['measured_seconds_per_batch']:.3g} s"
                  f" = {est['extrapolated_s']:.4g} s"
                  + (f" ({est['extrapolated_over_floor']:.3g} x the floor)" if "extrapolated_over_floor" in est else ""))
        else:
            print("  no conv run at gen_length 256 with 64 steps to extrapolate from")
    record["elapsed_s"] = time.perf_counter() - _T_START
    save()
    print(f"wrote {out_path} ({record['elapsed_s']:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
