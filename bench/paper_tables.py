"""Run one table of Seo et al. 2025 (arXiv 2509.15188) end to end: generation -> judging -> report.

    python bench/paper_tables.py --table 4                          # what make paper-table-4 runs
    python bench/paper_tables.py --table 3 --model "sft=GSAI-ML/LLaDA-8B-Base+runs/my-lora" --limit 100
    python bench/paper_tables.py --table 1 --judge http://localhost:8000/v1 --judge-model my-judge
    python bench/paper_tables.py --table 9 --dry-run                # print the needs and the commands only
    python bench/paper_tables.py --table 1 --tiny --limit 2 --judge local   # the CPU smoke run

The table files (`recipes/paper/table-N.yaml`), the commands they become and RESULTS.md are built by
`difflm.paper`; this script prints what a table needs (GPU, hours, judge key, models to train first) and runs
the commands in-process (the same `difflm` CLI, without a new Python per command), skipping generations that
are already complete.
Outputs: runs/paper/table-N/ (runs/paper-tiny/ with --tiny); references in runs/paper/references/ (shared).

--judge: an http(s) URL of an OpenAI-compatible server (`difflm eval alpaca --judge-base-url`), an alpaca_eval
annotator name, or `local` (the smoke runs' loopback judge, tests/judge_server.py, started in a thread and
passed as --judge-base-url: it prefers the longer answer). --judge-key-env names the URL's key variable.
Default: alpaca_eval's GPT-4-turbo annotator, the paper's (OPENAI_API_KEY).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from difflm.errors import ConfigError  # noqa: E402
from difflm.paper import TABLES, Step, TinyPreset, load_table, parse_models, plan, results_markdown  # noqa: E402

def _cli_command():
    from typer.main import get_command

    from cli.main import app

    return get_command(app)


def _complete(output: str) -> bool:
    """A generate output that finished (its manifest is written last)."""
    return Path(output).is_file() and Path(output + ".manifest.json").is_file()


def _run_difflm(argv: list[str]) -> int:
    """`difflm ARGS` in this process; returns the exit code."""
    cmd = _cli_command()
    try:
        rc = cmd.main(args=argv, prog_name="difflm", standalone_mode=False)
    except SystemExit as e:  # pragma: no cover - a command that calls sys.exit
        rc = e.code
    return int(rc or 0)


def _run_lm_eval(argv: list[str]) -> int:
    from difflm.eval.lm_eval_model import main

    saved = sys.argv
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = saved
    return 0


def _expand(step: Step) -> list[list[str]]:
    """Judge / score steps of a sweep folder: one command per point file."""
    if "--outputs" not in step.argv:
        return [step.argv]
    i = step.argv.index("--outputs") + 1
    target = Path(step.argv[i])
    if not target.is_dir():
        return [step.argv]
    files = sorted(f for f in target.glob("*.json") if Path(str(f) + ".manifest.json").is_file())
    return [step.argv[:i] + [str(f)] + step.argv[i + 1:] for f in files]


def print_needs(table: dict, judge: str | None, tiny: bool, out=print, judge_key_env: str | None = None) -> None:
    n = table.get("needs") or {}
    out(f"== Table {table['table']}: {table['title']}  ({os.path.relpath(table['_path'])})")
    if tiny:
        out("   CPU smoke run: embedded tiny models, fixtures, a 32-position window (the plumbing, not the paper)")
        return
    import torch

    gpu = "found: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible here"
    out(f"   GPU:   {n.get('gpu', '-')}  [{gpu}]")
    out(f"   hours: {n.get('hours', '-')}")
    if table["judge"] == "pairwise":
        if judge and judge.startswith(("http://", "https://")):
            env = judge_key_env or "OPENAI_API_KEY"
            key = f"JUDGE={judge} (key: ${env} {'[set]' if os.environ.get(env) else '[not set]'}; a loopback URL needs none)"
        elif judge:
            key = f"annotator {judge} (its backend's key)"
        else:
            key = "OPENAI_API_KEY " + ("[set]" if os.environ.get("OPENAI_API_KEY") else "[NOT SET: judging will stop]")
        out(f"   judge: {n.get('judge', '-')}\n          using {key}")
    else:
        out(f"   judge: {n.get('judge', 'none')}")
    for b in n.get("before") or []:
        out(f"   first: {b}")
    for role, ov in (table.get("models") or {}).items():  # local models the table expects, not there yet
        for k in ("model.name", "model.adapter"):
            v = ov.get(k)
            if v and str(v).startswith("runs/") and not (ROOT / v).exists() and not Path(v).exists():
                out(f"   missing ({role}): {v}  (train it first, or MODEL={role}=...)")


def run_table(number, *, out_dir: str, models: str | None = None, limit: int | None = None, judge: str | None = None,
              judge_model: str | None = None, judge_key_env: str | None = None, tiny: bool = False, dry_run: bool = False, rows: list[str] | None = None,
              eval_sets: list[str] | None = None, sweep_points: int | None = None, out=print) -> int:
    """Plan and run one table; returns an exit code (0 ok, 2 bad input or missing features, else the failing
    command's code). RESULTS.md is written at the end (also after a failure: what exists so far)."""
    table = load_table(number, ROOT)
    if rows:
        unknown = set(rows) - {r["id"] for r in table["rows"]}
        if unknown:
            raise ConfigError(f"no row(s) {sorted(unknown)} in table {number}", key="--rows")
        table["rows"] = [r for r in table["rows"] if r["id"] in rows or any(r.get("from_row") == x for x in rows)]
    if eval_sets:
        table["eval_sets"] = [e for e in table["eval_sets"] if e in eval_sets]
    roles = parse_models(models, (table.get("models") or {}).keys())
    print_needs(table, judge, tiny, out, judge_key_env)
    with _judge_server(judge) as (jurl, jmodel):
        preset = None
        if tiny:  # a tiny random causal Llama stands in for every AR model (references, AR rows, the scorer)
            ar = Path(out_dir) / "tiny-ar"
            if not (ar / "config.json").is_file():
                from difflm.testing import build_tiny_ar

                build_tiny_ar(ar)
            preset = TinyPreset(ar=str(ar), scorer=str(ar), sweep_points=sweep_points)
        steps = plan(table, out_dir=out_dir, root=ROOT, models=roles, limit=limit, judge=jurl,
                     judge_model=judge_model or jmodel, judge_key_env=judge_key_env, tiny=preset)
        if dry_run:
            for s in steps:
                out(f"   $ {s.shell()}")
            return 0
        rc = 0
        for s in steps:
            if s.kind in ("generate", "reference") and s.output and _complete(s.output):
                out(f"   (done) {s.output}")
                continue
            for argv in _expand(s):
                out(f"   $ {Step(s.kind, argv).shell()}")
                t0 = time.monotonic()
                if s.kind == "inlier":
                    from difflm.paper import write_inlier_reference

                    if not Path(argv[-1]).is_file():
                        write_inlier_reference(argv[-2], argv[-1])
                    continue
                if s.kind == "lm_eval":
                    if s.output and any(Path(s.output).rglob("results*.json")):
                        out(f"   (done) {s.output}")
                        continue
                    rc = _run_lm_eval(argv[1:])
                else:
                    rc = _run_difflm(argv[1:])
                out(f"   ({time.monotonic() - t0:.1f} s)")
                if rc and s.kind == "report":  # the report is a view of the results: RESULTS.md is still written
                    out(f"warning: exit {rc} from the report: {Step(s.kind, argv).shell()}")
                    rc = 0
                if rc:
                    out(f"error: exit {rc} from: {Step(s.kind, argv).shell()}")
                    break
            if rc:
                break
    tdir = Path(out_dir) / f"table-{table['table']}"
    tdir.mkdir(parents=True, exist_ok=True)
    from difflm.io import atomic_write_text

    atomic_write_text(tdir / "RESULTS.md", results_markdown(table, out_dir, limit=limit, tiny=tiny))
    out(f"   wrote {tdir / 'RESULTS.md'}")
    return rc


@contextlib.contextmanager
def _judge_server(judge: str | None):
    """`local` starts the loopback test judge (tests/judge_server.py) in a thread for the run; its URL then goes
    to `difflm eval alpaca --judge-base-url` like any judge server's (a loopback URL needs no key). Yields
    (judge, model name)."""
    if judge != "local":
        yield judge, None
        return
    tests = ROOT / "tests"
    if not (tests / "judge_server.py").is_file():
        raise ConfigError("--judge local needs tests/judge_server.py (a source checkout)", key="judge")
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    from judge_server import serve_judge

    with serve_judge() as url:
        yield url, "test-judge"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Example: python bench/paper_tables.py --table 4 --limit 100",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, help=f"table number {TABLES[0]}-{TABLES[-1]}, several comma-separated, or all")
    p.add_argument("--model", help="ROLE=NAME[+ADAPTER],... (roles: the table's `models`) or NAME[+ADAPTER] for all")
    p.add_argument("--limit", type=int, help="the first N items of every eval set (references too)")
    p.add_argument("--judge", help="URL of an OpenAI-compatible judge, an alpaca_eval annotator, or `local`")
    p.add_argument("--judge-model", help="model name at the --judge URL (default gpt-4-turbo)")
    p.add_argument("--judge-key-env", help="environment variable holding the --judge URL's key (default OPENAI_API_KEY; "
                   "a loopback URL needs none)")
    p.add_argument("--tiny", action="store_true", help="the CPU smoke run (embedded models, fixtures)")
    p.add_argument("--out", help="output root (default runs/paper, runs/paper-tiny with --tiny)")
    p.add_argument("--rows", help="only these row ids (comma-separated)")
    p.add_argument("--eval-sets", help="only these eval sets of the table (comma-separated)")
    p.add_argument("--dry-run", action="store_true", help="print the needs and the commands, run nothing")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        print(f"error: --limit must be at least 1, got {a.limit}", file=sys.stderr)
        return 2
    if a.tiny:  # the smoke run never needs the Hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    numbers = list(TABLES) if a.table == "all" else [x.strip() for x in a.table.split(",")]
    out_dir = a.out or ("runs/paper-tiny" if a.tiny else "runs/paper")
    try:
        for n in numbers:
            rc = run_table(n, out_dir=out_dir, models=a.model, limit=a.limit, judge=a.judge, judge_model=a.judge_model,
                           judge_key_env=a.judge_key_env,
                           tiny=a.tiny, dry_run=a.dry_run, rows=a.rows.split(",") if a.rows else None,
                           eval_sets=a.eval_sets.split(",") if a.eval_sets else None)
            if rc:
                return rc
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
