"""The tables of Seo et al. 2025 (arXiv 2509.15188) as data: one command per table.

`recipes/paper/table-N.yaml` describes table N: the `difflm generate` recipe its rows start from, the
models (roles such as ``sft``, ``r2ft``, ``instruct``: dotted recipe overrides), the eval sets, how the
outputs are judged (``pairwise`` against an AR reference with an LLM judge, ``gsm8k``, ``lm_eval``,
``speed`` or ``rstar`` from the manifests), and the rows: each row a model role, the decode keys it changes
(``set``), an optional sweep over one key, and the numbers the paper prints for it (copied as printed,
strings). This module loads and checks those files (`load_table`), turns a table into the CLI commands
that reproduce it (`plan`: ``difflm generate`` / ``difflm sweep`` / ``difflm eval ...`` /
``difflm-lm-eval`` argument lists), and writes ``RESULTS.md`` with difflm's numbers beside the paper's
(`results_markdown`). `bench/paper_tables.py` runs the plan; ``make paper-table-N`` calls it.

`TinyPreset` turns a table into its CPU smoke run: the embedded models (``tiny-math``,
``tiny-math-r2ft``), lengths scaled to a 32-token window, the test fixtures for the eval sets.

No typer or rich here: the commands are plain argument lists.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from difflm.config import load_yaml
from difflm.errors import ConfigError

__all__ = [
    "JUDGES",
    "TABLES",
    "Step",
    "TinyPreset",
    "judge_options",
    "load_table",
    "parse_models",
    "plan",
    "results_markdown",
    "table_path",
]

TABLES = tuple(range(1, 11))
JUDGES = ("pairwise", "gsm8k", "lm_eval", "speed", "rstar")
_TOP_KEYS = {
    "table", "title", "recipe", "eval_sets", "judge", "references", "models", "needs", "rows", "omitted",
    "notes", "fluency", "lm_eval",
}
_ROW_KEYS = {"id", "label", "model", "recipe", "set", "sweep", "paper", "source", "reference", "from_row", "s_star"}


def table_path(table: int | str, root: str | Path = ".") -> Path:
    """recipes/paper/table-N.yaml under `root` for a number, else the path itself."""
    s = str(table)
    if s.isdigit():
        n = int(s)
        if n not in TABLES:
            raise ConfigError(f"no table {n}: the paper's tables are {TABLES[0]}..{TABLES[-1]}", key="--table")
        return Path(root) / "recipes" / "paper" / f"table-{n}.yaml"
    return Path(s)


def load_table(table: int | str, root: str | Path = ".") -> dict:
    """Read and check a table file; returns its mapping (rows keep their order)."""
    path = table_path(table, root)
    if not path.is_file():
        raise ConfigError(f"{path}: no such table file", key="--table")
    spec = load_yaml(path)
    where = str(path)
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}", key="table")
    for key in ("table", "title", "recipe", "eval_sets", "judge", "rows"):
        if key not in spec:
            raise ConfigError(f"{where}: missing `{key}`", key=key)
    if spec["judge"] not in JUDGES:
        raise ConfigError(f"{where}: judge {spec['judge']!r} is not one of {', '.join(JUDGES)}", key="judge")
    models = spec.get("models") or {}
    refs = spec.get("references") or {}
    ids = [r.get("id") for r in spec["rows"]]
    if len(set(ids)) != len(ids) or None in ids:
        raise ConfigError(f"{where}: every row needs a unique `id`", key="rows")
    for r in spec["rows"]:
        bad = set(r) - _ROW_KEYS
        if bad:
            raise ConfigError(f"{where}: row {r['id']}: unknown key(s) {sorted(bad)}", key="rows")
        if r.get("source") == "reference":
            if r.get("reference", "default") not in refs:
                raise ConfigError(f"{where}: row {r['id']}: no reference {r.get('reference', 'default')!r}", key="rows")
        elif r.get("from_row"):
            if r["from_row"] not in ids:
                raise ConfigError(f"{where}: row {r['id']}: from_row {r['from_row']!r} is not a row", key="rows")
        elif r.get("model") not in models:
            raise ConfigError(f"{where}: row {r['id']}: model {r.get('model')!r} is not one of {sorted(models)}", key="rows")
        if r.get("sweep") and len(r["sweep"]) != 1:
            raise ConfigError(f"{where}: row {r['id']}: sweep one key per row", key="rows")
    if spec["judge"] == "pairwise" and "default" not in refs:
        raise ConfigError(f"{where}: a pairwise table needs references.default", key="references")
    spec["_path"] = where
    return spec


# --------------------------------------------------------------------------------------------- models
def parse_models(text: str | None, roles: Iterable[str]) -> dict[str, dict]:
    """`MODEL=` of the make targets: ``ROLE=NAME[+ADAPTER],...`` for some roles, or ``NAME[+ADAPTER]``
    for every role. Returns role -> dotted overrides (model.name, model.adapter)."""
    roles = list(roles)
    if not text:
        return {}

    def one(v: str) -> dict:
        name, _, adapter = v.partition("+")
        if not name:
            raise ConfigError(f"{text!r}: empty model name", key="MODEL")
        return {"model.name": name, "model.adapter": adapter or None}

    if "=" not in text:
        return {r: one(text) for r in roles}
    out = {}
    for part in text.split(","):
        role, eq, value = part.partition("=")
        role = role.strip()
        if not eq or role not in roles:
            raise ConfigError(
                f"{part!r}: expected ROLE=NAME[+ADAPTER] with ROLE one of {', '.join(roles)}", key="MODEL"
            )
        out[role] = one(value.strip())
    return out


def judge_options(judge: str | None, judge_model: str | None = None, judge_key_env: str | None = None) -> list[str]:
    """`JUDGE=` of the make targets -> `difflm eval alpaca` options: an http(s) URL is an OpenAI-compatible
    server (``--judge-base-url``, ``--judge-model``, ``--judge-api-key-env``), anything else an alpaca_eval
    annotator name."""
    if not judge:
        return []
    if re.match(r"https?://", judge):
        return ["--judge-base-url", judge, "--judge-model", judge_model or "gpt-4-turbo",
                *(["--judge-api-key-env", judge_key_env] if judge_key_env else [])]
    return ["--annotator", judge]


# --------------------------------------------------------------------------------------------- tiny
@dataclass
class TinyPreset:
    """The CPU smoke run of a table: embedded models, a 32-position window, fixtures for the data.

    Lengths: every L (gen_length or total_length) becomes `length`, block and kernel sizes scale by
    length / L (so the ratios and block counts stay the paper's), steps by 1/`step_divisor`."""

    length: int = 32
    step_divisor: int = 8
    min_steps: int = 4
    diffusion: str = "tiny-math"
    diffusion_r2ft: str = "tiny-math-r2ft"
    #: AR stand-in for the AR rows and the references: a causal LM folder or name (bench/paper_tables.py --tiny
    #: builds a tiny random Llama with `difflm.testing.build_tiny_ar`; smollm2 is real but ~50 s per run on 2 cores)
    ar: str = "smollm2-135m-instruct"
    ar_length: int = 16
    data: dict = field(default_factory=lambda: {
        "alpaca_eval": "tests/fixtures/alpaca_eval.json",
        "gsm8k": "tests/fixtures/gsm8k.jsonl",
        "arena_hard": "tests/fixtures/arena_hard.jsonl",
        "mt_bench": "tests/fixtures/paper/mt_bench.jsonl",
        "wiki": None,  # the paper's 504 entities ship inside difflm (difflm/data/evalsets.py)
    })
    #: the gen-PPL scorer of tables 6 and 7 (an AR model; the runner passes its tiny AR)
    scorer: str = "smollm2-135m-instruct"
    inlier_source: str = "tests/fixtures/train/alpaca_tiny.jsonl"
    lm_eval: dict = field(default_factory=lambda: {
        "include_path": "tests/fixtures/eval/lm_eval", "tasks": "difflm_tiny_gen", "apply_chat_template": False,
    })
    batch_size: int = 2
    #: keep only the first and last value of each sweep when set to 2 (the test suite's budget); None: all
    sweep_points: int | None = None

    def model(self, role: str, is_ar: bool) -> dict:
        if is_ar:
            return {"model.name": self.ar, "model.adapter": None, "model.family": "ar", "model.dtype": "float32"}
        name = self.diffusion_r2ft if "r2ft" in role else self.diffusion
        return {"model.name": name, "model.adapter": None, "model.family": "auto", "model.dtype": "float32"}

    def scale(self, key: str, value: Any, paper_length: int) -> Any:
        """A decode value of the paper's setting -> the smoke run's."""
        if value is None:
            return None
        if key in ("decode.block_length", "decode.kernel_size"):
            return max(1, round(value * self.length / paper_length))
        if key == "decode.steps":
            return max(self.min_steps, value // self.step_divisor)
        return value


# --------------------------------------------------------------------------------------------- plan
@dataclass
class Step:
    """One command of a table's plan. `argv[0]` is ``difflm`` or ``difflm-lm-eval``; `output` is the file
    (or folder) it writes; generation steps whose output is complete are skipped by the runner."""

    kind: str
    argv: list[str]
    output: str | None = None
    row: str | None = None
    eval_set: str | None = None
    point: Any = None

    def shell(self) -> str:
        import shlex

        return " ".join(shlex.quote(a) for a in self.argv)


def _resolved(recipe: Mapping, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten recipe + overrides to dotted keys (the values the run will use)."""
    flat: dict[str, Any] = {}

    def walk(d: Mapping, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(recipe, "")
    flat.update(overrides)
    return flat


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(_yaml_value(x) for x in v)
    return str(v)


def _kv(overrides: Mapping[str, Any]) -> list[str]:
    return [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]


def _tiny_overrides(tiny: TinyPreset, flat: Mapping[str, Any], role: str, is_ar: bool, eval_set: str,
                    sweep_key: str | None = None) -> dict[str, Any]:
    """Overrides that turn one paper run into its smoke run (model, lengths, data, batch)."""
    out: dict[str, Any] = dict(tiny.model(role, is_ar))
    paper_length = flat.get("decode.total_length") or flat.get("decode.gen_length") or 1024
    if "decode.total_length" in flat:  # the smoke run's window replaces the paper's total length
        out["decode.total_length"] = None
    out["decode.gen_length"] = tiny.ar_length if is_ar else tiny.length
    for key in ("decode.block_length", "decode.kernel_size", "decode.steps"):
        if key != sweep_key and flat.get(key) is not None:
            out[key] = tiny.scale(key, flat[key], paper_length)
    path = tiny.data.get(eval_set)
    if path:
        out["data.data_path"] = path
    if is_ar or flat.get("data.prompt_format") == "chat":
        out["data.prompt_format"] = "raw"  # the embedded models have no chat template; the tiny AR a short context
    out["batch_size"] = tiny.batch_size
    return out


def _paper_length(flat: Mapping[str, Any]) -> int:
    return int(flat.get("decode.total_length") or flat.get("decode.gen_length") or 1024)


def plan(
    table: Mapping,
    *,
    out_dir: str | Path,
    root: str | Path = ".",
    models: Mapping[str, Mapping[str, Any]] | None = None,
    limit: int | None = None,
    judge: str | None = None,
    judge_model: str | None = None,
    judge_key_env: str | None = None,
    tiny: TinyPreset | None = None,
) -> list[Step]:
    """The commands that reproduce `table` (a `load_table` mapping), in order: references, rows (generate or
    sweep), judging / scoring, report. `models` (`parse_models`) replace the table's roles; `limit` runs the
    first N items of every set; `judge` (`judge_options`) picks the judge; `tiny` makes it the CPU smoke run."""
    root = Path(root)
    out = Path(out_dir)
    tdir = out / f"table-{table['table']}"
    refdir = out / "references"
    nsuf = f"-n{limit}" if limit else ""
    lim = ["--limit", str(limit)] if limit else []
    steps: list[Step] = []
    roles = dict(table.get("models") or {})
    for role, ov in (models or {}).items():
        roles[role] = {**roles.get(role, {}), **ov}

    def recipe_of(path: str) -> dict:
        return load_yaml(root / path)

    def shown(path: str) -> str:  # recipe paths as the user would type them (relative to the working folder)
        import os

        return os.path.relpath(root / path)

    # -- references (shared by every table that uses them: runs/paper/references/)
    ref_files: dict[tuple[str, str], str] = {}
    used_refs: set[str] = set()
    if table["judge"] == "pairwise":
        used_refs.add("default")
    used_refs |= {r.get("reference", "default") for r in table["rows"] if r.get("source") == "reference"}
    for name in sorted(used_refs):
        ref = table["references"][name]
        rec = recipe_of(ref["recipe"])
        for es in table["eval_sets"]:
            ov: dict[str, Any] = {"data.eval_set": es, **(ref.get("set") or {})}
            flat = _resolved(rec, ov)
            if tiny:
                ov.update(_tiny_overrides(tiny, flat, "reference", True, es))
            stem = Path(ref["recipe"]).stem
            tag = "-".join(f"{k.split('.')[-1]}{_yaml_value(v)}" for k, v in (ref.get("set") or {}).items())
            f = refdir / f"{stem}{'-' + tag if tag else ''}-{es}{nsuf}.json"
            ref_files[(name, es)] = str(f)
            steps.append(Step("reference", ["difflm", "generate", "--recipe", shown(ref["recipe"]), "-o", str(f),
                                            *lim, *_kv(ov)], output=str(f), row=f"reference:{name}", eval_set=es))

    # -- the inlier reference texts (tables 6, 7)
    inlier_file = None
    if table.get("fluency"):
        src = table["fluency"]["inlier_reference"]["source"]
        inlier_file = str(refdir / ("inlier-tiny.json" if tiny else "inlier-alpaca.json"))
        steps.append(Step("inlier", ["python", "-m", "difflm.paper", "inlier-reference",
                                     tiny.inlier_source if tiny else src, inlier_file], output=inlier_file))

    # -- rows
    outputs: dict[tuple[str, str], list[str]] = {}
    for r in table["rows"]:
        if r.get("source") == "reference" or r.get("from_row"):
            continue
        role = r["model"]
        rpath = r.get("recipe") or table["recipe"]
        rec = recipe_of(rpath)
        is_ar = (roles[role].get("model.family") or rec.get("model", {}).get("family")) == "ar"
        for es in table["eval_sets"]:
            ov = {**roles[role], **(r.get("set") or {})}
            if table["judge"] != "lm_eval":
                ov = {"data.eval_set": es, **ov}
            flat = _resolved(rec, ov)
            sweep_key, values = (next(iter(r["sweep"].items())) if r.get("sweep") else (None, None))
            if tiny:
                ov.update(_tiny_overrides(tiny, flat, role, is_ar, es, sweep_key))
                if values:
                    if tiny.sweep_points == 2 and len(values) > 2:
                        values = [values[0], values[-1]]
                    values = [tiny.scale(sweep_key, v, _paper_length(flat)) for v in values]
            if table["judge"] == "lm_eval":
                steps += _lm_eval_steps(table, r, rec, ov, sweep_key, values, tdir, limit, tiny)
                outputs[(r["id"], es)] = [str(tdir / r["id"])]
                continue
            if sweep_key:
                d = tdir / f"{r['id']}-{es}{nsuf}"
                steps.append(Step("sweep", ["difflm", "sweep", "--recipe", shown(rpath), "-o", str(d), *lim,
                                            *_kv(ov), f"{sweep_key}={_yaml_value(values)}"],
                                  output=str(d), row=r["id"], eval_set=es))
                outputs[(r["id"], es)] = [str(d)]
            else:
                f = tdir / f"{r['id']}-{es}{nsuf}.json"
                steps.append(Step("generate", ["difflm", "generate", "--recipe", shown(rpath), "-o", str(f),
                                               *lim, *_kv(ov)], output=str(f), row=r["id"], eval_set=es))
                outputs[(r["id"], es)] = [str(f)]

    # -- judging and scoring (sweeps: the runner expands DIR into its point files)
    jopts = judge_options(judge, judge_model, judge_key_env)
    for (rid, es), outs in outputs.items():
        for o in outs:
            if table["judge"] == "pairwise":
                steps.append(Step("judge", ["difflm", "eval", "alpaca", "--outputs", o, "--reference",
                                            ref_files[("default", es)], *jopts], output=o, row=rid, eval_set=es))
            elif table["judge"] == "gsm8k":
                steps.append(Step("gsm8k", ["difflm", "eval", "gsm8k", "--outputs", o], output=o, row=rid, eval_set=es))
            if table.get("fluency"):
                scorer = tiny.scorer if tiny else table["fluency"]["scorer"]
                steps.append(Step("fluency", ["difflm", "eval", "fluency", "--outputs", o, "--scorer", scorer,
                                              "--inlier-reference", inlier_file], output=o, row=rid, eval_set=es))

    # -- report: one for the table, or one per swept row (each plotted against its key)
    runs = [o for outs in outputs.values() for o in outs] + [ref_files[k] for k in ref_files if k[0] != "default"
                                                              or table["judge"] == "speed"]
    sweeps = [r for r in table["rows"] if r.get("sweep")]
    if sweeps:
        for r in sweeps:
            key = next(iter(r["sweep"]))
            for es in table["eval_sets"]:
                steps.append(Step("report", ["difflm", "eval", "report", *outputs[(r["id"], es)], "--out",
                                             str(tdir / f"report-{r['id']}-{es}"), "--title",
                                             f"Table {table['table']}: {r['label']} ({es})", "--x", key],
                                  output=str(tdir / f"report-{r['id']}-{es}"), row=r["id"], eval_set=es))
    else:
        steps.append(Step("report", ["difflm", "eval", "report", *runs, "--out", str(tdir / "report"), "--title",
                                     f"Table {table['table']}: {table['title']}"], output=str(tdir / "report")))
    return steps


def _lm_eval_steps(table, row, rec, ov, sweep_key, values, tdir, limit, tiny) -> list[Step]:
    """`difflm-lm-eval` per sweep point: the difflm model with the row's decode keys as model_args."""
    le = dict(table.get("lm_eval") or {})
    if tiny:
        le = dict(tiny.lm_eval)
    flat = _resolved(rec, ov)
    steps = []
    for v in values or [None]:
        args = {"pretrained": flat.get("model.name")}
        if flat.get("model.adapter"):
            args["adapter"] = flat["model.adapter"]
        if flat.get("model.dtype") and flat["model.dtype"] != "auto":
            args["dtype"] = flat["model.dtype"]
        for k, val in flat.items():
            if k.startswith("decode.") and val is not None and k != "decode.seed":
                args["decode" if k == "decode.method" else k.split(".", 1)[1]] = val
        if sweep_key:
            args[sweep_key.split(".", 1)[1]] = v
        d = tdir / row["id"] / (f"{sweep_key.split('.')[-1]}-{v}" if sweep_key else "run")
        argv = ["difflm-lm-eval", "--model", "difflm", "--model_args",
                ",".join(f"{k}={_yaml_value(x)}" for k, x in args.items()), "--tasks", le["tasks"],
                "--output_path", str(d), "--batch_size", str(flat.get("batch_size") or 8)]
        if le.get("include_path"):
            argv += ["--include_path", le["include_path"]]
        if le.get("apply_chat_template"):
            argv += ["--apply_chat_template"]
        if limit:
            argv += ["--limit", str(limit)]
        steps.append(Step("lm_eval", argv, output=str(d), row=row["id"], eval_set="lm_eval", point=v))
    return steps


# --------------------------------------------------------------------------------------------- inlier texts
def write_inlier_reference(source: str, out: str | Path) -> Path:
    """The texts whose generative perplexity defines the inliers (the paper: the training responses): the
    non-empty `output` fields of an Alpaca-format source (a local JSON / JSONL file, or a Hub dataset name),
    written as a JSON list of {instruction, output} records (the outputs format `difflm eval fluency` reads)."""
    from difflm.io import atomic_write_text

    p = Path(source)
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    else:
        from datasets import load_dataset

        rows = list(load_dataset(source, split="train"))
    recs = [{"instruction": r.get("instruction", ""), "output": r["output"]} for r in rows if str(r.get("output", "")).strip()]
    if not recs:
        raise ConfigError(f"{source}: no non-empty `output` fields", key="inlier_reference")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(recs, indent=1))
    return out


# --------------------------------------------------------------------------------------------- results
def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _num(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "-"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(v: Any, se: Any, digits: int = 2) -> str:
    return "-" if v is None else _num(v, digits) + ("" if se is None else f" ({_num(se, digits)})")


def _output_files(path: str | Path) -> list[Path]:
    """The generate outputs of a file or a sweep folder (manifest beside each)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.glob("*.json") if Path(str(f) + ".manifest.json").is_file())
    return []


def _records(path: Path) -> list[dict]:
    recs = _read_json(path)
    return recs if isinstance(recs, list) else []


def run_metrics(path: str | Path) -> dict[str, Any]:
    """difflm's numbers of one generate output, from the files beside it (missing ones stay None)."""
    p = Path(path)
    man = _read_json(str(p) + ".manifest.json") or {}
    recs = _records(p)
    m: dict[str, Any] = {"manifest": man, "items": man.get("items", len(recs))}
    al = _read_json(str(p) + ".alpaca.json")
    if al:
        m["win_rate"] = al.get("win_rate")  # `difflm eval alpaca`'s summary (difflm/eval/alpaca.py)
        m["win_rate_se"] = al.get("standard_error")
        m["lc_win_rate"] = al.get("lc_win_rate")
        m["lc_win_rate_se"] = al.get("lc_standard_error")
        m["lc_note"] = al.get("lc_note")
    g = _read_json(str(p) + ".gsm8k.json")
    if g:
        m["accuracy"] = 100 * g["accuracy"] if g.get("accuracy") is not None else None
        m["accuracy_se"] = 100 * g["stderr"] if g.get("stderr") is not None else None
    fl = _read_json(str(p) + ".fluency.json")
    if fl:
        agg = fl.get("aggregate") or {}
        m["inlier_share"] = agg.get("inlier_share")  # `difflm eval fluency --scorer --inlier-reference`
        m["gen_ppl_mean"] = agg.get("gen_ppl_mean")
    if recs:
        ct = [r.get("content_tokens", 0) for r in recs]
        m["content_tokens_mean"] = sum(ct) / len(ct)
        m["nonempty_share"] = sum(1 for c in ct if c > 0) / len(ct)
        m["nfe_mean"] = sum(r.get("nfe", 0) for r in recs) / len(recs)
        ev = [r["unmask_events"] for r in recs if r.get("unmask_events") is not None]  # r*'s L* per item
        steps = (man.get("decode") or {}).get("steps")
        if ev and steps:
            m["rstar_recount"] = sum(ev) / len(ev) / steps
    m["effective_sample_rate"] = man.get("effective_sample_rate")  # r* with S = steps (difflm.generation)
    m["effective_sample_rate_nfe"] = man.get("effective_sample_rate_nfe")  # r* with S = NFE
    return m


def _point_value(man: Mapping, key: str) -> Any:
    sp = man.get("sweep_point")
    if isinstance(sp, Mapping) and key in sp:
        return sp[key]
    cur: Any = man
    for part in key.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    return cur


def _lm_eval_accuracy(folder: Path, task: str | None = None) -> tuple[Any, Any, Any]:
    """The accuracy-like metric (exact_match, acc) of lm-eval's newest results_*.json under `folder`, of `task`
    (the group when the task is one) else the first task: (%, its stderr in %, the items evaluated)."""
    files = sorted(folder.rglob("results*.json"), key=lambda f: f.stat().st_mtime)
    if not files:
        return None, None, None
    data = _read_json(files[-1]) or {}
    res = data.get("results") or {}
    ordered = ([(task, res[task])] if task in res else []) + [(k, v) for k, v in res.items() if k != task]
    for name, metrics in ordered:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k.split(",")[0] in ("exact_match", "acc", "accuracy") and "stderr" not in k:
                se = metrics.get(k.replace(",", "_stderr,", 1))
                ns = (data.get("n-samples") or {}).get(name) or {}
                n = ns.get("effective") if isinstance(ns, Mapping) else None
                if n is None and isinstance(metrics.get("sample_len"), int):
                    n = metrics["sample_len"]
                return 100 * v, (100 * se if isinstance(se, (int, float)) else None), n
    return None, None, None


def results_markdown(table: Mapping, out_dir: str | Path, *, limit: int | None = None, tiny: bool = False) -> str:
    """RESULTS.md of a table: difflm's numbers (what the runs wrote) beside the paper's (as printed)."""
    out = Path(out_dir)
    tdir = out / f"table-{table['table']}"
    nsuf = f"-n{limit}" if limit else ""
    import os

    spec = os.path.relpath(table["_path"]) if Path(table["_path"]).is_absolute() else table["_path"]
    lines = [f"# Table {table['table']}: {table['title']}", "",
             f"Spec: `{Path(spec).as_posix()}` · paper: Seo et al. 2025 (arXiv 2509.15188), Table {table['table']}. "
             "Paper numbers are copied as printed (standard errors in parentheses); `-` = not measured here.", ""]
    if tiny:
        t = TinyPreset()
        lines += ["**CPU smoke run** (embedded tiny models, fixtures, a 32-position window): the numbers check the "
                  f"plumbing only and say nothing about the paper. Stand-ins: R2FT roles -> `{t.diffusion_r2ft}`, the "
                  f"other diffusion roles -> `{t.diffusion}`, AR models, references and the gen-PPL scorer -> a tiny random "
                  "causal Llama (`difflm.testing.build_tiny_ar`).", ""]
    judge = table["judge"]
    rows = table["rows"]

    def row_file(r: Mapping, es: str) -> Path:
        return tdir / f"{r['id']}-{es}{nsuf}.json"

    plain = [r for r in rows if not r.get("sweep")]
    swept = [r for r in rows if r.get("sweep")]
    if judge in ("pairwise", "gsm8k") and plain:
        for es in table["eval_sets"]:
            paper_cols = sorted({k for r in rows for k in ((r.get("paper") or {}).get(es) or {})},
                                key=["lc_win_rate", "win_rate", "accuracy", "avg_length", "nonempty_share",
                                     "inlier_share"].index)
            head = ["row", "items"]
            if judge == "gsm8k":
                head += ["accuracy % (difflm)", "accuracy % (paper)"]
            else:
                head += ["LC win % (difflm)", "win % (difflm)"]
                if table.get("fluency"):
                    head += ["avg length", "len > 0", "inlier share"]
                head += [f"{_COL.get(c, c)} (paper)" for c in paper_cols]
            lines += [f"## {es}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            notes = set()
            for r in rows:
                if r.get("sweep"):
                    continue
                m = run_metrics(row_file(r, es))
                p = (r.get("paper") or {}).get(es) or {}
                cells = [r["label"], _num(m.get("items"), 0) if m.get("items") else "-"]
                if judge == "gsm8k":
                    cells += [_pm(m.get("accuracy"), m.get("accuracy_se")), p.get("accuracy", "unknown")]
                else:
                    cells += [_pm(m.get("lc_win_rate"), m.get("lc_win_rate_se")), _pm(m.get("win_rate"), m.get("win_rate_se"))]
                    if table.get("fluency"):
                        cells += [_num(m.get("content_tokens_mean"), 1), _num(m.get("nonempty_share")),
                                  _num(m.get("inlier_share"))]
                    cells += [p.get(c, "unknown") for c in paper_cols]
                    if m.get("lc_note"):
                        notes.add(m["lc_note"])
                lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
            lines += [""] + [f"- LC note: {n}" for n in sorted(notes)] + ([""] if notes else [])
    if judge == "speed":
        es = table["eval_sets"][0]
        metrics: dict[str, dict] = {}
        for r in rows:
            if r.get("source") == "reference":
                ref = table["references"][r.get("reference", "default")]
                tag = "-".join(f"{k.split('.')[-1]}{_yaml_value(v)}" for k, v in (ref.get("set") or {}).items())
                f = out / "references" / f"{Path(ref['recipe']).stem}{'-' + tag if tag else ''}-{es}{nsuf}.json"
                metrics[r["id"]] = run_metrics(f)
            elif not r.get("from_row"):
                metrics[r["id"]] = run_metrics(row_file(r, es))
        head = ["row", "items", "L* (difflm)", "S* (difflm)", "L*/S* (difflm)", "L*norm/S* (difflm)",
                "L* (paper)", "L* gpt4 (paper)", "L*norm (paper)", "S* (paper)", "L*norm/S* (paper)"]
        lines += [f"## {es}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        groups: dict[str, list[str]] = {}
        for r in rows:  # L*norm: mean L* of the diffusion rows of the same group (id prefix: small / large)
            if r.get("source") != "reference" and not r.get("from_row"):
                groups.setdefault(r["id"].split("-")[0], []).append(r["id"])
        for r in rows:
            src = metrics.get(r.get("from_row") or r["id"], {})
            grp = groups.get(r["id"].split("-")[0], [])
            lvals = [metrics[i].get("content_tokens_mean") for i in grp if metrics[i].get("content_tokens_mean") is not None]
            lnorm = sum(lvals) / len(lvals) if lvals else None
            lstar = src.get("content_tokens_mean")
            if r.get("source") == "reference":
                sstar = lnorm  # AR: one forward per token (the paper sets S* = L*norm)
            elif r.get("s_star") == "steps":
                sstar = ((src.get("manifest") or {}).get("decode") or {}).get("steps")
            else:
                sstar = src.get("nfe_mean")
            p = (r.get("paper") or {}).get(es) or {}
            cells = [r["label"], _num(src.get("items"), 0) if src.get("items") else "-", _num(lstar, 1), _num(sstar, 1),
                     _num(lstar / sstar if lstar is not None and sstar else None),
                     _num(lnorm / sstar if lnorm is not None and sstar else None),
                     *(p.get(k, "unknown") for k in ("content_tokens", "content_tokens_gpt4", "content_norm", "s_star",
                                                     "tokens_per_step"))]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    if swept:  # sweeps: gsm8k (table 9), lm_eval (8), rstar (10)
        metric = {"lm_eval": "accuracy", "rstar": "effective_sample_rate", "gsm8k": "accuracy",
                  "pairwise": "lc_win_rate"}[judge]
        for es in table["eval_sets"]:
            lines += [f"## {es}", ""]
            for r in swept:
                key = next(iter(r["sweep"]))
                paper = ((r.get("paper") or {}).get(es) or {}).get(metric) or {}
                lines += [f"### {r['label']} (swept: `{key}`)", ""]
                head = [key.split(".")[-1], "items", f"{metric} (difflm)"]
                if judge == "rstar":
                    head += ["r* recount from unmask_events"]
                head += [f"{metric} (paper)"]
                lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                got: dict[str, list[str]] = {}
                if judge == "lm_eval":
                    base = tdir / r["id"]
                    for d in sorted(base.glob("*")) if base.is_dir() else []:
                        acc, se, n = _lm_eval_accuracy(d, (table.get("lm_eval") or {}).get("tasks"))
                        got[d.name.split("-", 1)[-1]] = [_num(n, 0), _pm(acc, se)]
                else:
                    for f in _output_files(tdir / f"{r['id']}-{es}{nsuf}"):
                        m = run_metrics(f)
                        v = _point_value(m["manifest"], key)
                        if judge == "gsm8k":
                            cell = [_pm(m.get("accuracy"), m.get("accuracy_se"))]
                        elif judge == "pairwise":
                            cell = [_pm(m.get("lc_win_rate"), m.get("lc_win_rate_se"))]
                        else:
                            esr = m.get("effective_sample_rate")
                            cell = [", ".join(f"{k} {_num(x)}" for k, x in esr.items()) if isinstance(esr, Mapping)
                                    else _num(esr), _num(m.get("rstar_recount"))]
                        got[str(v)] = [_num(m.get("items"), 0), *cell]
                if tiny:  # the smoke run's scaled points -> the paper's points they stand for
                    rec = load_yaml(Path(table["_path"]).resolve().parents[2] / (r.get("recipe") or table["recipe"]))
                    flat = _resolved(rec, r.get("set") or {})
                    t = TinyPreset()
                    back = {str(t.scale(key, int(pv), _paper_length(flat))): pv for pv in paper}
                    got = {back.get(k, f"{k} (smoke)"): v for k, v in got.items()}
                # the paper's points first (their order), then any point the paper has no number for
                pts = list(paper) + [k for k in sorted(got, key=lambda s: float(s) if _isnum(s) else 0) if k not in paper]
                for pt in pts:
                    vals = got.get(pt) or ["-"] * (3 if judge == "rstar" else 2)
                    lines.append("| " + " | ".join([pt, *vals, paper.get(pt, "unknown")]) + " |")
                lines.append("")
        if tiny:
            lines += ["(The smoke run scales the swept values to its 32-position window; each row is labelled with the "
                      "paper's value it stands for.)", ""]
    om = table.get("omitted") or []
    if om:
        lines += ["## Rows not run", ""]
        for o in om:
            lines.append(f"- {o['label']}: {o['why']}. Paper: {json.dumps(o.get('paper'))}")
        lines.append("")
    for n in table.get("notes") or []:
        lines.append(f"- {n}")
    return "\n".join(lines).rstrip() + "\n"


_COL = {"lc_win_rate": "LC win %", "win_rate": "win %", "avg_length": "avg length", "nonempty_share": "len > 0",
        "inlier_share": "inlier share", "accuracy": "accuracy %"}


def _isnum(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _main(argv: list[str] | None = None) -> int:
    """`python -m difflm.paper inlier-reference SOURCE OUT` (a step of tables 6 and 7)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "inlier-reference":
        print(write_inlier_reference(args[1], args[2]))
        return 0
    print("usage: python -m difflm.paper inlier-reference SOURCE OUT.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main())
