#!/usr/bin/env python
"""`difflm serve` throughput: dynamic batching against one request at a time, from one run.

    python bench/serve_throughput.py                          # make bench: tiny-math, 32 clients x 2 requests x 4 rounds
    python bench/serve_throughput.py --clients 8 --requests 2 --gen-length 16 --steps 8 --name quick

The real server runs as a subprocess (`python -m cli.main serve`, on a free loopback port), twice, both up at
once: with dynamic batching (`--max-batch`, `--batch-window-ms`) and with `--max-batch 1`. They take turns in
`--rounds` load rounds (order AB BA AB ...: a change in a shared machine's load hits both sides); in a round,
`--clients` concurrent clients (threads, one HTTP connection each) send `--requests` chat completions each
(distinct prompts and seeds; the same requests for both servers). Per server, over its rounds: requests/s and
content tokens/s (usage.completion_tokens) over the summed wall time from the first request sent to the last
answer, latency p50/p95, the share of that wall time the engine spent in `generate` (each batch's rows report
the same `seconds`, so the distinct values are the batches), the mean batch size (/health) and the server
process's CPU seconds per request (psutil; what does not depend on other jobs' load). The ratio batched /
one-at-a-time is the headline.

Time to first streamed event: streamed requests with `denoise: true`, timed to the first chunk carrying a
difflm step event and to the first non-empty content delta, on the idle server (before the load; after one
warm-up request) and under load (a probe client, not counted in the throughput, sending them while the
clients run). Medians over the probes.

Prints a table and writes bench/results/<name>.json atomically after each round. Exit status: 0, 1 if a
server did not start or a request failed, 2 for bad options. Each server runs `--threads` torch threads
(default: every core, as `difflm serve` does; on a machine shared with other jobs `--threads 1`, since two
threads fighting other jobs ran 4x slower). Prompts are raw text by default (`--prompt-format raw`), the format the
embedded models were trained on (the chat fallback, alpaca, makes every prompt ~80 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx2  # noqa: E402

from difflm.io import atomic_write_json  # noqa: E402
from difflm.testing import free_port  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-math", help="what `difflm serve -m` loads")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round")
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--decode", default="conv", help="the server's decode method")
    ap.add_argument("--prompt-format", default="raw", choices=["chat", "alpaca", "alpaca-cot", "raw"],
                    help="the servers' --prompt-format (raw: what the embedded models were trained on)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of each server (OMP_NUM_THREADS; default: every core, as difflm serve uses; "
                         "1 on a machine shared with other jobs)")
    ap.add_argument("--max-batch", type=int, default=32, help="the batching server's --max-batch")
    ap.add_argument("--window-ms", type=float, default=10.0, help="the batching server's --batch-window-ms")
    ap.add_argument("--rounds", type=int, default=4,
                    help="load rounds per server, alternating the servers (ABBA): a load change hits both")
    ap.add_argument("--probes", type=int, default=3, help="streamed probes on the idle server")
    ap.add_argument("--startup-s", type=float, default=180.0, help="wait at most this long for /health")
    ap.add_argument("--name", default="serve-throughput-cpu")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    for key in ("clients", "requests", "rounds", "gen_length", "steps", "max_batch", "probes"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.window_ms < 0 or args.startup_s <= 0:
        ap.error("--window-ms must be >= 0 and --startup-s > 0")
    return args


class ServerError(RuntimeError):
    pass


@contextlib.contextmanager
def server(args, max_batch: int, window_ms: float):
    """`python -m cli.main serve` on a free port; yields (base URL, pid) once /health answers (bounded)."""
    port = free_port()
    cmd = [sys.executable, "-m", "cli.main", "serve", "-m", args.model, "--port", str(port), "--host", "127.0.0.1",
           "--decode", args.decode, "--gen-length", str(args.gen_length), "--steps", str(args.steps),
           "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms),
           "--max-queue", str(max(256, 4 * (args.clients + 1))), "--log-level", "warning",
           "--prompt-format", args.prompt_format]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env["OMP_NUM_THREADS"] = str(args.threads)
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise ServerError(f"the server (--max-batch {max_batch}) exited ({proc.returncode}): {log.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise ServerError(f"the server (--max-batch {max_batch}) did not answer /health within {args.startup_s:g} s")
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(base + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def requests_for(args, rnd: int = 0) -> list[list[dict]]:
    """Per client, its request bodies in round `rnd`: distinct arithmetic questions and seeds (the same for
    both servers)."""
    out = []
    for c in range(args.clients):
        bodies = []
        for r in range(args.requests):
            k = (rnd * args.clients + c) * args.requests + r
            q = f"Tom has {3 + k % 97} apples and buys {5 + (7 * k) % 89} more. How many apples does he have?"
            bodies.append({"model": args.model, "messages": [{"role": "user", "content": q}], "seed": 1000 + k})
        out.append(bodies)
    return out


def client(base: str, bodies: list[dict], results: list, start: threading.Barrier) -> None:
    """One client: its requests one after another over one connection; each result: (sent, latency, tokens, seconds,
    error)."""
    with httpx2.Client(base_url=base, timeout=600) as http:
        start.wait()
        for body in bodies:
            t0 = time.perf_counter()
            try:
                r = http.post("/v1/chat/completions", json=body)
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    results.append((t0, dt, 0, None, f"HTTP {r.status_code}: {r.text[:200]}"))
                    continue
                data = r.json()
                results.append((t0, dt, data["usage"]["completion_tokens"], data["choices"][0]["difflm"]["seconds"], None))
            except httpx2.HTTPError as err:
                results.append((t0, time.perf_counter() - t0, 0, None, f"{type(err).__name__}: {err}"))


def first_events(base: str, body: dict) -> dict:
    """One streamed request with denoise: seconds to the first step event and to the first content delta."""
    body = dict(body, stream=True, denoise=True)
    got: dict = {"first_step_s": None, "first_content_s": None, "total_s": None, "error": None}
    t0 = time.perf_counter()
    try:
        with httpx2.Client(base_url=base, timeout=600) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                got["error"] = f"HTTP {r.status_code}"
                return got
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter() - t0
                if got["first_step_s"] is None and (chunk.get("difflm") or {}).get("type") == "step":
                    got["first_step_s"] = now
                if got["first_content_s"] is None and any(
                        (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    got["first_content_s"] = now
    except httpx2.HTTPError as err:
        got["error"] = f"{type(err).__name__}: {err}"
    got["total_s"] = time.perf_counter() - t0
    return got


def probe_summary(samples: list[dict]) -> dict:
    def med(key):
        vals = [s[key] for s in samples if s[key] is not None]
        return statistics.median(vals) if vals else None

    return {"n": len(samples), "first_step_s": med("first_step_s"), "first_content_s": med("first_content_s"),
            "total_s": med("total_s"), "samples": samples}


def pct(vals: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (numpy's default)."""
    s = sorted(vals)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def health(base: str) -> dict:
    return httpx2.get(base + "/health", timeout=10).json()


def cpu_seconds(pid: int) -> float | None:
    """The server process's CPU time so far (user + system, all threads): what a request costs whatever
    else runs on the machine, where wall time depends on the other jobs' load."""
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def load_round(base: str, pid: int, bodies: list[list[dict]], probe_seed: int) -> dict:
    """The clients against one server, with a streaming probe (not counted) alongside while they run."""
    before, cpu0 = health(base), cpu_seconds(pid)
    results: list = []
    start = threading.Barrier(len(bodies) + 1)
    threads = [threading.Thread(target=client, args=(base, b, results, start), daemon=True) for b in bodies]
    for t in threads:
        t.start()
    start.wait()
    t_start = time.perf_counter()
    loaded: list = []
    while any(t.is_alive() for t in threads):
        time.sleep(0.05)  # probe while the load runs, once the clients' first requests have queued
        if any(t.is_alive() for t in threads):
            body = {**bodies[len(loaded) % len(bodies)][0], "seed": probe_seed + len(loaded)}
            loaded.append(first_events(base, body))
    for t in threads:
        t.join()
    after, cpu1 = health(base), cpu_seconds(pid)
    wall = max(r[0] + r[1] for r in results) - t_start
    return {"results": results, "cpu_s": None if cpu0 is None else cpu1 - cpu0, "probes": loaded, "wall_s": wall,
            "batches": after["batches"] - before["batches"],
            "rows": after["rows_done"] - before["rows_done"], "max_batch_seen": after["max_batch_seen"]}


def summarize(label: str, max_batch: int, window_ms: float, idle: list[dict], rounds: list[dict]) -> dict:
    """One server's rounds pooled: rates over the summed wall time, latency quantiles over every request."""
    results = [r for rd in rounds for r in rd["results"]]
    ok = [r for r in results if r[4] is None]
    lat = [r[1] for r in ok]
    wall = sum(rd["wall_s"] for rd in rounds)
    batches, rows = sum(rd["batches"] for rd in rounds), sum(rd["rows"] for rd in rounds)
    generate_s = sum(sum({r[3] for r in rd["results"] if r[4] is None}) for rd in rounds)  # a batch's rows share it
    tokens = sum(r[2] for r in ok)
    cpu = None if any(rd["cpu_s"] is None for rd in rounds) else sum(rd["cpu_s"] for rd in rounds)
    return {
        "label": label, "max_batch": max_batch, "window_ms": window_ms, "requests": len(results), "ok": len(ok),
        "errors": [r[4] for r in results if r[4] is not None][:10], "wall_s": wall,
        "requests_per_s": len(ok) / wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
        "latency_p50_s": pct(lat, 0.5) if lat else None, "latency_p95_s": pct(lat, 0.95) if lat else None,
        "engine_batches": batches, "engine_rows": rows, "mean_batch": rows / batches if batches else None,
        "max_batch_seen": max(rd["max_batch_seen"] for rd in rounds), "generate_s": generate_s,
        "generate_share": generate_s / wall, "server_cpu_s": cpu,
        "server_cpu_s_per_request": cpu / rows if cpu is not None and rows else None,
        "rounds": [{"wall_s": rd["wall_s"], "ok": sum(r[4] is None for r in rd["results"]),
                    "requests_per_s": sum(r[4] is None for r in rd["results"]) / rd["wall_s"],
                    "tokens_per_s": sum(r[2] for r in rd["results"]) / rd["wall_s"],
                    "mean_batch": rd["rows"] / rd["batches"] if rd["batches"] else None, "cpu_s": rd["cpu_s"]}
                   for rd in rounds],
        "ttfe_idle": probe_summary(idle), "ttfe_load": probe_summary([p for rd in rounds for p in rd["probes"]]),
    }


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(modes: dict) -> None:
    print(f"{'server':<22} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'batch':>6} {'gen %':>6} "
          f"{'cpu s/req':>9} {'step idle':>9} {'text idle':>9} {'step load':>9} {'text load':>9}")
    for m in modes.values():
        name = f"{m['label']} (max {m['max_batch']})"
        print(f"{name:<22} {m['requests_per_s']:>7.2f} {m['tokens_per_s']:>7.1f} {fmt(m['latency_p50_s'], '.2f'):>7} "
              f"{fmt(m['latency_p95_s'], '.2f'):>7} {fmt(m['mean_batch'], '.1f'):>6} {100 * m['generate_share']:>5.0f}% "
              f"{fmt(m['server_cpu_s_per_request'], '.3f'):>9} "
              f"{fmt(m['ttfe_idle']['first_step_s'], '.3f'):>9} {fmt(m['ttfe_idle']['first_content_s'], '.3f'):>9} "
              f"{fmt(m['ttfe_load']['first_step_s'], '.3f'):>9} {fmt(m['ttfe_load']['first_content_s'], '.3f'):>9}")


def machine() -> dict:
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import difflm

    record = {
        "name": args.name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["bench/serve_throughput.py", *(sys.argv[1:] if argv is None else argv)], "machine": machine(),
        "versions": {"torch": torch.__version__, "difflm": difflm.__version__}, "settings": vars(args), "modes": {},
    }
    out_path = Path(args.out_dir) / f"{args.name}.json"
    bodies = requests_for(args)
    print(f"serve throughput: {args.model}, {args.decode}, gen_length {args.gen_length}, {args.steps} steps; "
          f"{args.clients} clients x {args.requests} requests x {args.rounds} rounds per server; "
          f"load {record['machine']['load_average']}", flush=True)
    t0 = time.perf_counter()
    modes = (("batched", args.max_batch, args.window_ms), ("one-at-a-time", 1, 0.0))
    try:
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(server(args, mb, win)) for _, mb, win in modes]
            idle = []
            for base, _ in servers:  # warm-up (first forward, tokenizer, page faults), then the idle probes
                first_events(base, {**bodies[0][0], "seed": 1})
                idle.append([first_events(base, {**bodies[p % len(bodies)][0], "seed": 2 + p}) for p in range(args.probes)])
            rounds: list[list[dict]] = [[], []]
            for rnd in range(args.rounds):  # alternate the order (ABBA...): a load change hits both sides
                for k in ((0, 1) if rnd % 2 == 0 else (1, 0)):
                    rd = load_round(*servers[k], requests_for(args, rnd), probe_seed=500 + 100 * rnd)
                    rounds[k].append(rd)
                    print(f"  round {rnd + 1} {modes[k][0]}: {sum(r[4] is None for r in rd['results'])}/"
                          f"{len(rd['results'])} ok in {rd['wall_s']:.1f} s", flush=True)
                    record["modes"] = {m[0]: summarize(*m, idle[j], rounds[j]) for j, m in enumerate(modes) if rounds[j]}
                    atomic_write_json(out_path, record)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        record["error"] = str(err)
        atomic_write_json(out_path, record)
        return 1
    b, s = record["modes"]["batched"], record["modes"]["one-at-a-time"]
    record["ratio"] = {"requests_per_s": b["requests_per_s"] / s["requests_per_s"],
                       "tokens_per_s": b["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else None,
                       "requests_per_s_per_round": [x["requests_per_s"] / y["requests_per_s"]
                                                    for x, y in zip(b["rounds"], s["rounds"])],
                       "server_cpu_per_request": (s["server_cpu_s_per_request"] / b["server_cpu_s_per_request"]
                                                  if b["server_cpu_s_per_request"] else None)}
    record["ratio"]["requests_per_s_median_round"] = statistics.median(record["ratio"]["requests_per_s_per_round"])
    record["elapsed_s"] = time.perf_counter() - t0
    record["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    atomic_write_json(out_path, record)
    print_table(record["modes"])
    r = record["ratio"]
    by_round = ", ".join(f"{x:.2f}x" for x in r["requests_per_s_per_round"])
    print(f"batched / one-at-a-time: {r['requests_per_s']:.2f}x requests/s ({by_round} by round), "
          f"{fmt(r['tokens_per_s'], '.2f')}x tokens/s; server CPU seconds per request: "
          f"{fmt(r['server_cpu_per_request'], '.2f')}x fewer; "
          f"wrote {out_path} ({record['elapsed_s']:.0f} s)")
    failed = any(m["ok"] < m["requests"] for m in record["modes"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
