#!/usr/bin/env python
"""The regime where the sampler dominates: a cheap stand-in model with a large vocabulary, every
diffusion method, difflm's `generate` against a plain loop of the same method (bench/reference.py),
timed in the same run with interleaved repetitions.

    python bench/sampler_regime.py                       # make bench: V 32000, batch 1 4 16
    python bench/sampler_regime.py --vocab 126464 --batch 4 --methods llada conv --repeats 5

The stand-in model (`StandIn`) looks its logits up in a random table by a hash of each position's two
neighbours (float32), so a forward pass costs little next to the sampler; it computes the generated positions' logits
only, for difflm and the plain loops alike (`logits_to_keep`). Per (method, batch): both sides are called in
interleaved pairs (the order alternates; one warm-up call each first) until each side has at least
`--repeats` timed calls and `--min-seconds` of them, or `--max-repeats` calls (the mass methods:
`--mass-repeats`, 1, and no warm-up of their plain loop, which takes seconds a call). Time is the process's
CPU time (`--clock cpu`, the default; torch runs `--threads` 1 thread, so it is the time the call ran, less
the time other processes held the core: on a shared machine that is what varies between calls) or wall time
(`--clock wall`); both are recorded. Reported: the median seconds per generate call of each side, the
speed-up median(plain) / median(difflm), the spread of the speed-up over the pairs (quartiles of
plain_i / difflm_i, the two calls of pair i adjacent in time), the wall-clock speed-up, and difflm's forward
share. For the greedy methods (llada, threshold, llada_conv at temperature 0) both sides must commit the
same tokens: the check is printed and a mismatch makes the exit status 1. Writes bench/results/<name>.json
atomically.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import reference as ref  # noqa: E402
from difflm.decoding import DecodeConfig, generate  # noqa: E402
from difflm.io import atomic_write_json  # noqa: E402

METHODS = ("llada", "threshold", "llada_conv", "categorical", "topk", "conv", "semi_ar", "remdm")
GREEDY = ("llada", "threshold", "llada_conv")

#: what the plain loop of each method does (printed with the table)
REFERENCE_DOES = {
    "llada": "per row: argmax, float64 softmax, p(x0) gather, top-k of the block's masked positions",
    "threshold": "per row: as llada, every p(x0) >= tau commits (at least the best), block by block",
    "llada_conv": "per row: as llada over the whole answer, p(x0) * tanh(u_i) (conv1d window count)",
    "categorical": "batch: float64 softmax, weights a p / b, one float64 Gumbel-max over [V + 1] per position",
    "topk": "batch: as categorical, top-k kept, global normalisation |M| / sum q",
    "conv": "batch: as topk, position scale tanh(u_i) C (conv1d window count)",
    "semi_ar": "batch: as categorical inside each block, argmax fill at the block's end",
    "remdm": "batch: as topk, ReMDM loop schedule and eta remasking (one float64 uniform per position)",
}


def pin_malloc() -> str:
    """Fix glibc's malloc thresholds (mmap at 32 MiB and above, never trim the heap) so that the heap state
    one side leaves behind does not decide whether the other side's next forward pays page faults for its
    logits (with glibc's dynamic thresholds, interleaved runs in one process moved either side's forward
    time by up to 2x, whichever ran before). Same setting for both sides; a no-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) and libc.mallopt(m_trim_threshold, 1 << 30)
        return "glibc mmap threshold 32 MiB, no trimming" if ok else "mallopt refused; malloc defaults"
    except (OSError, AttributeError):
        return "not glibc; malloc defaults"


class StandIn:
    """A cheap bidirectional stand-in: the logits of position i are row h(x[i-1], x[i+1]) of a random table
    (`buckets` rows; h a hash of both neighbours) times (1 + i / 1000), so no two positions share their
    logits; MASK logit -inf. One gather per forward: far cheaper than the sampler at a large vocabulary.
    Counts and times its calls."""

    accepts_logits_to_keep = True

    def __init__(self, vocab: int, buckets: int = 512, max_len: int = 4096, seed: int = 0, clock=time.perf_counter):
        g = torch.Generator().manual_seed(seed)
        self.clock = clock
        self.table = torch.randn(buckets, vocab, generator=g) * 2.0
        self.scale = 1.0 + torch.arange(max_len, dtype=torch.float32) / 1000
        self.buckets, self.mask_id = buckets, vocab - 1
        self.calls, self.forward_s = 0, 0.0

    def __call__(self, input_ids, attention_mask=None, logits_to_keep=None):
        t0 = self.clock()
        b, n = input_ids.shape
        xp = torch.nn.functional.pad(input_ids, (1, 1), value=0)
        key = (xp[:, :-2] * 7919 + xp[:, 2:]) % self.buckets
        scale = self.scale[:n]
        if logits_to_keep:
            key, scale = key[:, -logits_to_keep:], scale[-logits_to_keep:]
        logits = torch.index_select(self.table, 0, key.reshape(-1)).view(b, key.shape[1], -1)
        logits.mul_(scale[None, :, None])
        logits[..., self.mask_id] = float("-inf")
        self.calls += 1
        self.forward_s += self.clock() - t0
        return logits


def settings(method: str, args) -> dict:
    s = dict(method=method, gen_length=args.gen_length, steps=args.steps)
    if method in ("llada", "threshold", "semi_ar"):
        s["block_length"] = args.block_length
    if method in ("conv", "llada_conv"):
        s["kernel_size"] = args.kernel_size
    if method in ("topk", "conv", "remdm"):
        s["top_k"] = args.top_k
    if method == "threshold":
        s["threshold"] = args.threshold
    return s


def run_difflm(model, prompt, s: dict, ids: dict, seed: int):
    cfg = DecodeConfig(**s, seed=seed)
    return generate(model, prompt, cfg, mask_id=ids["mask_id"], eos_id=ids["eos_id"]).sequences


def run_reference(model, prompt, s: dict, ids: dict, seed: int):
    m = s["method"]
    if m in GREEDY:
        kw = dict(block_length=s.get("block_length"), threshold=s.get("threshold", 0.9),
                  kernel_size=s.get("kernel_size"))
        return ref.plain_confidence_generate(model, prompt, method=m, steps=s["steps"], gen_length=s["gen_length"],
                                             mask_id=ids["mask_id"], **kw)[0]
    g = torch.Generator().manual_seed(seed)
    return ref.plain_mass_generate(model, prompt, method=m, steps=s["steps"], gen_length=s["gen_length"],
                                   mask_id=ids["mask_id"], top_k=s.get("top_k"), block_length=s.get("block_length"),
                                   kernel_size=s.get("kernel_size"), generator=g)[0]


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed(model, fn, *a):
    """(result, wall s, cpu s, forward s on the model's clock, NFE) of one call."""
    model.calls, model.forward_s = 0, 0.0
    c0, t0 = time.process_time(), time.perf_counter()
    x = fn(model, *a)
    return x, time.perf_counter() - t0, time.process_time() - c0, model.forward_s, model.calls


def quartiles(v: list[float]) -> tuple[float, float]:
    """(lower, upper) quartile of v (the values themselves when there are fewer than 4)."""
    if len(v) < 4:
        return min(v), max(v)
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


def measure(model, prompt, s: dict, ids: dict, args, mass: bool) -> dict:
    """Interleaved calls of both sides (see the module docstring): {side: [(wall, cpu, forward)]}, and the
    last result and NFE of each side."""
    sides = {"difflm": run_difflm, "plain": run_reference}
    meas = {k: [] for k in sides}
    xs = {}
    key = 1 if args.clock == "cpu" else 0
    lo = min(args.repeats, args.mass_repeats) if mass else args.repeats
    hi = lo if mass else max(args.repeats, args.max_repeats)
    rep = 0
    while True:
        done = len(meas["difflm"])
        if done >= hi or (done >= lo and all(sum(m[key] for m in v) >= args.min_seconds for v in meas.values())):
            break
        for k, fn in (sides.items() if rep % 2 == 0 else reversed(sides.items())):
            if rep == 0 and mass and k == "plain":  # no warm-up call of a mass method's plain loop
                continue
            x, wall, cpu, fwd, nfe = timed(model, fn, prompt, s, ids, args.seed)
            xs[k] = (x, nfe)
            if rep:  # the first call of each side is a warm-up
                meas[k].append((wall, cpu, fwd))
        rep += 1
    return meas, xs


def measure_row(model, prompt, m: str, B: int, ids: dict, args) -> dict:
    """Time one (method, batch) cell (`measure`), print its line, return its JSON row."""
    meas, xs = measure(model, prompt, settings(m, args), ids, args, mass=m not in GREEDY)
    key = 1 if args.clock == "cpu" else 0
    med = {k: statistics.median(c[key] for c in v) for k, v in meas.items()}
    wall = {k: statistics.median(c[0] for c in v) for k, v in meas.items()}
    fwd = {k: statistics.median(c[2] for c in v) for k, v in meas.items()}
    pairs = [p[key] / d[key] for d, p in zip(meas["difflm"], meas["plain"])]
    q1, q3 = quartiles(pairs)
    speedup = med["plain"] / med["difflm"]
    row = dict(method=m, batch=B, clock=args.clock, difflm_s=med["difflm"], plain_s=med["plain"], speedup=speedup,
               speedup_pairs_q1=q1, speedup_pairs_q3=q3, speedup_pairs_min=min(pairs), speedup_pairs_max=max(pairs),
               speedup_wall=wall["plain"] / wall["difflm"], difflm_wall_s=wall["difflm"], plain_wall_s=wall["plain"],
               difflm_forward_s=fwd["difflm"], plain_forward_s=fwd["plain"], calls=len(pairs),
               difflm_nfe=xs["difflm"][1], plain_nfe=xs["plain"][1],
               difflm_s_all=[c[key] for c in meas["difflm"]], plain_s_all=[c[key] for c in meas["plain"]],
               difflm_wall_s_all=[c[0] for c in meas["difflm"]], plain_wall_s_all=[c[0] for c in meas["plain"]])
    check = ""
    if m in GREEDY:
        diff = int((xs["difflm"][0] != xs["plain"][0]).sum())
        row["mismatched_tokens"] = diff
        check = "IDENTICAL" if diff == 0 else f"MISMATCH ({diff} tokens differ)"
    share = fwd["difflm"] / med["difflm"]
    print(f"{m:<12} {B:>5} {med['difflm']:>9.4f} {med['plain']:>9.4f} {speedup:>7.2f}x {f'{q1:.2f}-{q3:.2f}x':>13} "
          f"{row['speedup_wall']:>5.2f}x {len(pairs):>5} {100 * share:>8.0f}% "
          f"{xs['difflm'][1]:>3}/{xs['plain'][1]:<3}  {check}", flush=True)
    return row


def add_shape_arguments(ap) -> None:
    """The regime's decode shape: prompt, answer, steps, blocks, window, top-k, threshold (shared with
    compile_effect.py)."""
    ap.add_argument("--prompt-length", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--kernel-size", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.9)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--vocab", type=int, default=32000)
    add_shape_arguments(ap)
    ap.add_argument("--repeats", type=int, default=5, help="at least this many interleaved timed calls per side")
    ap.add_argument("--min-seconds", type=float, default=1.0,
                    help="more interleaved calls until each side has this many timed seconds (up to --max-repeats)")
    ap.add_argument("--max-repeats", type=int, default=41, help="at most this many timed calls per side")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                    help="cpu: process CPU time (needs --threads 1); wall: wall-clock time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (torch.set_num_threads)")
    ap.add_argument("--mass-repeats", type=int, default=1,
                    help="timed calls per side for the mass methods (their plain loops take seconds; no warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="sampler-regime-cpu")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        print("--clock cpu sums the CPU time of every thread: use it with --threads 1", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (tests call main in-process)


def run(args, argv: list[str]) -> int:
    t_start = time.perf_counter()
    malloc = pin_malloc()
    V = args.vocab
    ids = dict(mask_id=V - 1, eos_id=V - 2)
    model = StandIn(V, seed=args.seed, clock=CLOCKS[args.clock])
    record = dict(
        name=args.name, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=["bench/sampler_regime.py", *argv],
        machine=dict(cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     load_average=os.getloadavg() if hasattr(os, "getloadavg") else None),
        torch=torch.__version__, malloc=malloc, settings=vars(args), reference_does=REFERENCE_DOES, rows=[],
    )
    out_path = Path(args.out_dir) / f"{args.name}.json"
    print(f"sampler regime: stand-in model (table lookup) V {V}, prompt {args.prompt_length}, gen_length "
          f"{args.gen_length}, {args.steps} steps, block {args.block_length}, K {args.kernel_size}, top-k "
          f"{args.top_k}; {torch.get_num_threads()} torch threads; {args.clock} time, medians of "
          f"{args.repeats}-{max(args.repeats, args.max_repeats)} interleaved calls per side "
          f"(>= {args.min_seconds:g} s each); {malloc}")
    print("plain loops (bench/reference.py):")
    for m in args.methods:
        print(f"  {m:<12} {REFERENCE_DOES[m]}")
    print(f"{'method':<12} {'batch':>5} {'difflm s':>9} {'plain s':>9} {'speed-up':>8} {'pairs q1-q3':>13} "
          f"{'wall':>6} {'calls':>5} {'fwd share':>9} {'NFE':>7}  greedy tokens")
    failed = 0
    gp = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(0, V - 2, (b, args.prompt_length), generator=gp) for b in args.batch}
    for B in args.batch:
        for m in args.methods:
            row = measure_row(model, prompts[B], m, B, ids, args)
            failed += row.get("mismatched_tokens", 0) > 0
            record["rows"].append(row)
            atomic_write_json(out_path, record)
    record["elapsed_s"] = time.perf_counter() - t_start
    record["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    atomic_write_json(out_path, record)
    worst = min(record["rows"], key=lambda r: r["speedup"]) if record["rows"] else None
    if worst:
        print(f"slowest speed-up: {worst['speedup']:.2f}x ({worst['method']}, batch {worst['batch']}); "
              f"wrote {out_path} ({record['elapsed_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
