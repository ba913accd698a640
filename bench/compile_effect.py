#!/usr/bin/env python
"""Does torch.compile of the decoding step functions pay? difflm's `generate` as it is ("eager") against the
same call with the hot step functions wrapped in `torch.compile` (inductor), in the sampler regime of
`sampler_regime.py` (its stand-in model, settings, clock and timing helpers are imported, not copied).

    python bench/compile_effect.py                               # V 2048 and 32000, batch 1 and 16
    python bench/compile_effect.py --vocab 2048 --methods llada --batch 1 --variants kernels

The library is not changed: the wrapping is done here, by replacing module attributes that the decoding
loop looks up at each call (`steps.mass_step`, `conv.window_scales`, ...) for the duration of one call.
Variants (`--variants`):
  steps:   the step functions whole (mass: `mass_step` and `conv.window_scales`; greedy: `greedy_commit_at`
           and `greedy_commit`): dynamo splits them at every host sync (`.tolist()`, `nonzero`, `.item()`),
           so this measures what compiling them as they are gives;
  kernels: only the pieces without host syncs (mass: `candidates`, `position_scale`, `unmask_probability`,
           `conv.window_scales`; greedy: `_max_prob`, the softmax-and-max of `greedy_commit_at`): one graph each;
  chunked: no compile, the eager alternative for the mass methods: `candidates` with its full-vocabulary
           logsumexp taken in chunks of rows (`chunked_candidates`; bit-identical values).
Per (method, V, batch) cell the sides are called in interleaved rounds (the order alternates), the first
round untimed for eager and reported as the start-up ("first call") for the compiled variants; then rounds
until each side has `--repeats` timed calls and `--min-seconds` of them, or `--max-repeats`. Time: process
CPU time with one torch thread (as `sampler_regime.py`); the first call is reported in wall time too (inductor
runs gcc in subprocesses, whose CPU time the process clock does not see). Dynamo's caches are reset when the
method changes (so the first cell of a method pays its compile; later cells pay only recompiles) and
inductor's FX graph cache is off, so no graph comes from an earlier process. Tokens: every side's sequences
against eager's (same seed): the fraction of identical tokens (the compiled kernels may round differently;
greedy `llada` must stay identical: a mismatch makes the exit status 1). Graph breaks and graphs compiled are
dynamo's counters, per side. Writes bench/results/<name>.json atomically.
"""

from __future__ import annotations

import argparse
import contextlib
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
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from sampler_regime import (  # noqa: E402
    CLOCKS, StandIn, add_shape_arguments, pin_malloc, quartiles, run_difflm, settings, timed,
)
from difflm.decoding import conv as C  # noqa: E402
from difflm.decoding import steps as S  # noqa: E402
from difflm.io import atomic_write_json  # noqa: E402

METHODS = ("llada", "conv", "topk")
GREEDY = ("llada",)

#: (module, attribute) wrapped per variant and method kind
WRAPPED = {
    ("steps", "mass"): [(S, "mass_step"), (C, "window_scales")],
    ("steps", "greedy"): [(S, "greedy_commit_at"), (S, "greedy_commit")],
    ("kernels", "mass"): [(S, "candidates"), (S, "position_scale"), (S, "unmask_probability"), (C, "window_scales")],
    ("kernels", "greedy"): [(S, "_max_prob")],
}
EAGER = {(mod, name): getattr(mod, name) for entries in WRAPPED.values() for mod, name in entries}


def chunked_candidates(logits: torch.Tensor, top_k: int | None, temperature: float, rows: int = 32):
    """`steps.candidates` with the logsumexp over the vocabulary taken `rows` positions at a time: eager
    logsumexp writes a [B, L, V] temporary (131 MB at batch 16, V 32000: fresh pages every step); in chunks
    it stays cache-sized. The same values bit for bit (each row's reduction is unchanged)."""
    if top_k is None or top_k >= logits.shape[-1]:
        return EAGER[(S, "candidates")](logits, top_k, temperature)
    scaled = logits if temperature in (0.0, 1.0) else logits / temperature
    vals, idx = scaled.topk(top_k, dim=-1)
    flat = scaled.reshape(-1, scaled.shape[-1])
    lse = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    for s0 in range(0, flat.shape[0], rows):
        lse[s0 : s0 + rows] = torch.logsumexp(flat[s0 : s0 + rows], -1)
    logp = vals - lse.view(*scaled.shape[:-1], 1)
    return logp, idx, logp.double().exp().sum(-1)


def kind(method: str) -> str:
    return "greedy" if method in GREEDY else "mass"


def compiled_table(variant: str, method: str, dynamic) -> dict:
    """{(module, name): torch.compile(eager function)} for one variant; compiled lazily at the first call
    (`chunked`: the eager chunked `candidates`, for the mass methods only)."""
    if variant == "chunked":
        return {(S, "candidates"): chunked_candidates} if kind(method) == "mass" else {}
    return {(mod, name): torch.compile(EAGER[(mod, name)], dynamic=dynamic)
            for mod, name in WRAPPED[(variant, kind(method))]}


@contextlib.contextmanager
def patched(table: dict):
    """The decoding loop sees table's functions for the duration of the block (module attributes restored
    after, also on an error)."""
    for (mod, name), fn in table.items():
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for mod, name in table:
            setattr(mod, name, EAGER[(mod, name)])


def dynamo_counts() -> tuple[int, int, dict]:
    """(graph breaks, unique graphs compiled, {break reason: count}) so far (dynamo's global counters)."""
    reasons = {str(k).splitlines()[0][:160]: v for k, v in counters["graph_break"].items()}
    return sum(reasons.values()), counters["stats"]["unique_graphs"], reasons


def call(side: str, tables: dict, model, prompt, s: dict, ids: dict, seed: int) -> dict:
    """One generate call of a side: its sequences, wall / cpu seconds and dynamo's counts during it."""
    b0, g0, r0 = dynamo_counts()
    with patched(tables.get(side, {})):
        x, wall, cpu, _, nfe = timed(model, run_difflm, prompt, s, ids, seed)
    b1, g1, r1 = dynamo_counts()
    new = {k: v - r0.get(k, 0) for k, v in r1.items() if v - r0.get(k, 0)}
    return dict(x=x, wall=wall, cpu=cpu, nfe=nfe, breaks=b1 - b0, graphs=g1 - g0, reasons=new)


def measure_cell(model, prompt, m: str, ids: dict, tables: dict, args) -> dict:
    """Interleaved rounds of every side (module docstring): per side its calls (the first is round 0)."""
    s = settings(m, args)
    sides = ["eager", *tables]
    calls = {k: [] for k in sides}
    key = "cpu" if args.clock == "cpu" else "wall"
    rep = 0
    while True:
        timed_calls = {k: v[1:] for k, v in calls.items()}
        n = len(timed_calls["eager"])
        if n >= args.max_repeats or (
                n >= args.repeats and all(sum(c[key] for c in v) >= args.min_seconds for v in timed_calls.values())):
            return calls
        for k in (sides if rep % 2 == 0 else sides[::-1]):
            calls[k].append(call(k, tables, model, prompt, s, ids, args.seed))
        rep += 1


def cell_row(m: str, V: int, B: int, calls: dict, args) -> dict:
    """The JSON row of a cell and its printed lines (one per compiled variant)."""
    key = "cpu" if args.clock == "cpu" else "wall"
    eager = [c[key] for c in calls["eager"][1:]]
    ref = calls["eager"][-1]["x"]
    row = dict(method=m, vocab=V, batch=B, clock=args.clock, calls=len(eager), eager_s=statistics.median(eager),
               eager_s_all=eager, eager_first_wall_s=calls["eager"][0]["wall"], nfe=calls["eager"][-1]["nfe"],
               eager_identical_across_calls=all(torch.equal(c["x"], ref) for c in calls["eager"]), variants={})
    for v, cs in calls.items():
        if v == "eager":
            continue
        t = [c[key] for c in cs[1:]]
        pairs = [e / c for e, c in zip(eager, t)]
        q1, q3 = quartiles(pairs)
        same = float(sum((c["x"] == ref).float().mean() for c in cs) / len(cs))
        reasons: dict = {}
        for c in cs:
            for r, n in c["reasons"].items():
                reasons[r] = reasons.get(r, 0) + n
        row["variants"][v] = dict(
            s=statistics.median(t), s_all=t, speedup=row["eager_s"] / statistics.median(t), pairs_q1=q1, pairs_q3=q3,
            first_call_wall_s=cs[0]["wall"], first_call_cpu_s=cs[0]["cpu"], first_call_breaks=cs[0]["breaks"],
            first_call_graphs=cs[0]["graphs"], later_graphs=sum(c["graphs"] for c in cs[1:]),
            graph_breaks=sum(c["breaks"] for c in cs), break_reasons=reasons, identical_tokens=same)
        d = row["variants"][v]
        print(f"{m:<6} {V:>6} {B:>5} {v:<8} {row['eager_s']:>9.4f} {d['s']:>9.4f} {d['speedup']:>6.2f}x "
              f"{f'{q1:.2f}-{q3:.2f}x':>11} {d['first_call_wall_s']:>8.1f} {d['first_call_graphs']:>3}+"
              f"{d['later_graphs']:<3} {d['graph_breaks']:>6} {len(eager):>5} {100 * same:>7.2f}%", flush=True)
    return row


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--vocab", nargs="+", type=int, default=[2048, 32000])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--variants", nargs="+", choices=("steps", "kernels", "chunked"), default=["steps", "kernels"])
    ap.add_argument("--dynamic", choices=("true", "false", "auto"), default="true",
                    help="torch.compile(dynamic=...): true (symbolic shapes from the start), false, auto (None)")
    add_shape_arguments(ap)
    ap.add_argument("--repeats", type=int, default=3, help="at least this many timed calls per side")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="more rounds until each side has this many s")
    ap.add_argument("--max-repeats", type=int, default=15)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="compile-effect-cpu")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time == the call's own time only with one thread
    fx_cache = torch._inductor.config.fx_graph_cache
    torch._inductor.config.fx_graph_cache = False  # every start-up compiles, none loads an earlier process's graph
    try:
        return run(args, sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)
        torch._inductor.config.fx_graph_cache = fx_cache
        torch._dynamo.reset()


def run(args, argv: list[str]) -> int:
    t_start = time.perf_counter()
    malloc = pin_malloc()
    dynamic = {"true": True, "false": False, "auto": None}[args.dynamic]
    record = dict(
        name=args.name, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=["bench/compile_effect.py", *argv],
        machine=dict(cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     load_average=os.getloadavg() if hasattr(os, "getloadavg") else None),
        torch=torch.__version__, malloc=malloc, settings=vars(args),
        wrapped={f"{v}/{k}": [f"{mod.__name__}.{n}" for mod, n in e] for (v, k), e in WRAPPED.items()}, rows=[])
    out_path = Path(args.out_dir) / f"{args.name}.json"
    print(f"torch.compile (inductor, dynamic={args.dynamic}) of the step functions; sampler regime stand-in, "
          f"prompt {args.prompt_length}, gen_length {args.gen_length}, {args.steps} steps, block "
          f"{args.block_length}, K {args.kernel_size}, top-k {args.top_k}; 1 torch thread, {args.clock} time; {malloc}")
    print(f"{'method':<6} {'V':>6} {'batch':>5} {'variant':<8} {'eager s':>9} {'comp. s':>9} {'ratio':>7} "
          f"{'pairs q1-q3':>11} {'1st wall':>8} {'graphs':>7} {'breaks':>6} {'calls':>5} {'same tok':>8}")
    failed = 0
    for m in args.methods:
        torch._dynamo.reset()  # this method's first cell pays its compile
        tables = {v: t for v in args.variants if (t := compiled_table(v, m, dynamic))}
        for V in args.vocab:
            ids = dict(mask_id=V - 1, eos_id=V - 2)
            model = StandIn(V, seed=args.seed, clock=CLOCKS[args.clock])
            gp = torch.Generator().manual_seed(args.seed)
            for B in args.batch:
                prompt = torch.randint(0, V - 2, (B, args.prompt_length), generator=gp)
                row = cell_row(m, V, B, measure_cell(model, prompt, m, ids, tables, args), args)
                if m in GREEDY:
                    failed += any(d["identical_tokens"] < 1.0 for d in row["variants"].values())
                record["rows"].append(row)
                atomic_write_json(out_path, record)
    record["elapsed_s"] = time.perf_counter() - t_start
    record["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    atomic_write_json(out_path, record)
    print(f"wrote {out_path} ({record['elapsed_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
