"""`difflm eval report`: runs side by side, as a table, a Markdown file and PNG plots.

    from difflm.eval.report import build_report
    rep = build_report(["runs/gsm8k-conv.json", "runs/gsm8k-llada.json"], out_dir="runs/report")
    rep["rows"][0]["accuracy"], rep["files"]

Each RUN is a `difflm generate` output (OUT.json, with OUT.json.manifest.json beside it) or a folder
searched for them. Per run the report collects:

- settings from the manifest (model, adapter, method, steps, gen_length, kernel, top-k, device);
- GSM8K accuracy and standard error from OUT.json.gsm8k.json (`difflm eval gsm8k`), or scored on the
  fly when the records carry gold ``answer`` fields (`difflm generate --eval-set gsm8k` keeps them);
- AlpacaEval win rate / LC win rate from OUT.json.alpaca.json (`difflm eval alpaca`; never computed
  here: the judge costs money);
- fluency (rep-2, rep-4, distinct-2, empty share, repetition by position) from OUT.json.fluency.json
  (`difflm eval fluency`), or computed on the fly with whitespace tokens;
- speed from the manifest: content tokens per forward pass (content = generated tokens before the first
  EOS/EOT, no prompt or padding) and content tokens per second, with the device named.

- gen-PPL mean / median and the inlier share from OUT.json.fluency.json when `difflm eval fluency --scorer` wrote
  them (never computed here: they need a scorer model);
- lm-eval results files (results_*.json of lm-eval's --output_path) as rows of their own (`summarize_lm_eval`).

With `x` (`--x decode.kernel_size`): every score against that recipe key (`score_table`, `plot_score_vs_key`):
the key's value per run comes from the manifest's `sweep_point` (`difflm sweep`), the resolved recipe or the
manifest; for lm-eval rows from model_args.

Every number carries its source: the row's ``manifest`` path and ``sources`` (metric -> file, or
"computed from OUT.json"), repeated in the Markdown file's Sources section.

Files written to `out_dir` (atomically): report.md, report.json, and the plots
score_vs_steps.png (GSM8K accuracy and/or AlpacaEval win rate vs steps, one line per method; runs
without scores are left out), repetition_vs_position.png (the rep-n curve of each run) and
tokens_per_nfe.png (content tokens per NFE of each run, AR decoding = 1).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from difflm.errors import ConfigError
from difflm.io import atomic_write_bytes

__all__ = ["COLUMNS", "TERMINAL_COLUMNS", "build_report", "collect_inputs", "render_markdown", "score_table",
           "summarize_lm_eval", "summarize_run"]


def summarize_run(run) -> dict[str, Any]:
    """One report row for a loaded `difflm.eval.runs.Run` (see the module doc)."""
    from difflm.eval.fluency import fluency_metrics
    from difflm.eval.gsm8k import score_records

    out_file = str(run.output_path)
    s = run.settings()
    m = run.manifest or {}
    row: dict[str, Any] = {
        "label": run.label,
        "outputs": out_file,
        "manifest": str(run.manifest_path) if run.manifest_path else None,
        **s,
        "effective_kernel": _effective_kernel(m.get("decode") or {}),
        "items": len(run.records),
        "sources": {},
    }
    # GSM8K
    g = run.results.get("gsm8k")
    if g is not None:
        row.update(accuracy=g.get("accuracy"), accuracy_stderr=g.get("stderr"), accuracy_n=g.get("n"))
        row["sources"]["accuracy"] = str(run.results_paths["gsm8k"])
    elif run.records and all("answer" in r for r in run.records):
        sc = score_records(run.records)
        row.update(accuracy=sc["accuracy"], accuracy_stderr=sc["stderr"], accuracy_n=sc["n"])
        row["sources"]["accuracy"] = f"computed from {out_file} (answer fields)"
    else:
        row.update(accuracy=None, accuracy_stderr=None, accuracy_n=None)
    # AlpacaEval
    a = run.results.get("alpaca") or {}
    row.update(
        win_rate=a.get("win_rate"),
        win_rate_stderr=a.get("standard_error"),
        lc_win_rate=a.get("length_controlled_winrate"),
        lc_win_rate_stderr=a.get("lc_standard_error"),
    )
    if a:
        row["sources"]["win_rate"] = str(run.results_paths["alpaca"])
    # fluency
    f = run.results.get("fluency")
    if f is not None:
        agg, curve = f.get("aggregate", {}), f.get("position_curve", [])
        fs = (f.get("settings") or {}).get("fluency") or {}
        row["sources"]["fluency"] = str(run.results_paths["fluency"])
        row["fluency_tokens"] = fs.get("tokens")
        row["position_n"] = fs.get("position_n")
    else:
        fm = fluency_metrics([r["output"] for r in run.records],
                             content_tokens=[r.get("content_tokens") for r in run.records])
        agg, curve = fm["aggregate"], fm["position_curve"]
        row["sources"]["fluency"] = f"computed from {out_file} (whitespace tokens)"
        row["fluency_tokens"] = "whitespace"
        row["position_n"] = fm["settings"]["position_n"]
    row.update(  # gen-PPL and the inlier share: only from `difflm eval fluency --scorer` (needs a model)
        gen_ppl_mean=agg.get("gen_ppl_mean"), gen_ppl_median=agg.get("gen_ppl_median"),
        inlier_share=agg.get("inlier_share"),
    )
    row["sweep_point"] = m.get("sweep_point")
    row.update(
        rep_2=agg.get("rep_2"),
        rep_4=agg.get("rep_4"),
        distinct_2=agg.get("distinct_2"),
        empty_share=agg.get("empty_share"),
        frequent_share=agg.get("frequent_share"),
        position_curve=curve,
    )
    # speed (manifest)
    row.update(
        content_tokens=m.get("content_tokens"),
        content_tokens_per_nfe=m.get("content_tokens_per_nfe"),
        tokens_per_second=m.get("tokens_per_second"),
        nfe_per_item=m.get("nfe_per_item_mean"),
        effective_sample_rate=m.get("effective_sample_rate"),  # r* = L*/S, S = steps (paper's Table 10)
    )
    if run.manifest_path:
        row["sources"]["speed"] = str(run.manifest_path)
    for task, path in run.stale.items():
        row["sources"][f"{task} (ignored)"] = f"{path} scored another version of {out_file}; rerun difflm eval {task}"
    return row


def _effective_kernel(decode: dict) -> int | None:
    """The conv window K the run used (DecodeConfig's rule: even K + 1, defaults), None for other methods."""
    import dataclasses

    from difflm.decoding.config import CONV_METHODS, DecodeConfig

    if decode.get("method") not in CONV_METHODS:
        return None
    known = {f.name for f in dataclasses.fields(DecodeConfig)}
    try:
        return DecodeConfig(**{k: v for k, v in decode.items() if k in known}).effective_kernel_size()
    except (TypeError, ValueError):
        return decode.get("kernel_size")


def _unique_labels(rows: list[dict]) -> None:
    seen: dict[str, int] = {}
    for r in rows:
        seen[r["label"]] = seen.get(r["label"], 0) + 1
    for r in rows:
        if seen[r["label"]] > 1:
            r["label"] = Path(r["outputs"]).stem
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
        if counts[r["label"]] > 1:
            r["label"] = f"{r['label']}#{counts[r['label']]}"


def _fmt(v: Any, digits: int = 3, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.{digits}f}"
    return str(v)


def _pm(v: Any, se: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    scale = 100.0 if pct else 1.0
    s = f"{scale * v:.1f}"
    return s if se is None else f"{s} ± {scale * se:.1f}"


#: (header, function row -> text) for the Markdown and terminal tables
COLUMNS = [
    ("run", lambda r: r["label"]),
    ("model", lambda r: _short(r.get("model")) + (f" + {_short(r['adapter'])}" if r.get("adapter") else "")),
    ("method", lambda r: _fmt(r.get("method"))),
    ("steps", lambda r: _fmt(r.get("steps"))),
    ("L", lambda r: _fmt(r.get("gen_length"))),
    ("K", lambda r: _fmt(r.get("effective_kernel"))),
    ("top-k", lambda r: _fmt(r.get("top_k"))),
    ("items", lambda r: _fmt(r.get("items"))),
    ("GSM8K acc %", lambda r: _pm(r.get("accuracy"), r.get("accuracy_stderr"), pct=True)),
    ("win rate %", lambda r: _pm(r.get("win_rate"), r.get("win_rate_stderr"))),
    ("LC win %", lambda r: _pm(r.get("lc_win_rate"), r.get("lc_win_rate_stderr"))),
    ("rep-2", lambda r: _fmt(r.get("rep_2"))),
    ("rep-4", lambda r: _fmt(r.get("rep_4"))),
    ("distinct-2", lambda r: _fmt(r.get("distinct_2"))),
    ("empty %", lambda r: _fmt(r.get("empty_share"), pct=True)),
    ("tok/NFE", lambda r: _fmt(r.get("content_tokens_per_nfe"), 2)),
    ("r*", lambda r: _fmt(r.get("effective_sample_rate"), 2)),
    ("tok/s", lambda r: _fmt(r.get("tokens_per_second"), 1)),
    ("device", lambda r: _fmt(r.get("device"))),
]


#: the columns of the terminal table (the Markdown file has all of COLUMNS)
TERMINAL_COLUMNS = ("run", "method", "steps", "L", "K", "GSM8K acc %", "win rate %", "LC win %", "rep-2", "rep-4",
                    "empty %", "tok/NFE", "tok/s")


def _short(name: Any) -> str:
    if not name:
        return "-"
    return Path(str(name)).name or str(name)


def render_markdown(rows: list[dict], plots: list[str] | None = None, title: str = "difflm eval report") -> str:
    """The report as Markdown: the table, the plots, and a Sources section tracing every number."""
    head = [c[0] for c in COLUMNS]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(fn(r)).replace("|", "\\|") for _, fn in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "GSM8K accuracy: share of items whose last number equals the gold answer, ± sqrt(p(1-p)/n). "
        "Win rates: alpaca_eval, in %, ± standard error. rep-n: repeated n-gram rate; distinct-2: distinct "
        "bigrams / bigrams over the run. tok/NFE: content tokens (before the first EOS/EOT, no prompt or "
        "padding) per model forward pass; tok/s: content tokens per second of decoding on the device named.",
        "",
    ]
    for p in plots or []:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    lines += ["## Sources", ""]
    for r in rows:
        lines.append(f"- **{r['label']}**: outputs `{r['outputs']}`, manifest `{r.get('manifest') or 'none'}`")
        for metric, src in sorted(r["sources"].items()):
            lines.append(f"  - {metric}: `{src}`")
    return "\n".join(lines) + "\n"


def _save_fig(fig, path: Path) -> bool:
    """Write `fig` as a PNG (atomically) and close it; True (the plot functions' "written")."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    plt.close(fig)
    return True


def _label_axes(ax, xlabel: str, ylabel: str, **legend) -> None:
    """Axis labels, y from 0, a light grid and the legend (`legend`: its keyword arguments)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(**legend)


def _group_key(r: dict, multi_model: bool) -> str:
    key = str(r.get("method") or "?")
    if multi_model:
        key += f" ({_short(r.get('model'))}{' + ' + _short(r['adapter']) if r.get('adapter') else ''})"
    return key


def plot_score_vs_steps(rows: list[dict], path: Path) -> bool:
    """Accuracy and/or win rate vs steps, one line per method; False when no run has a score."""
    import matplotlib.pyplot as plt

    panels = []
    if any(r.get("accuracy") is not None and r.get("steps") for r in rows):
        panels.append(("GSM8K accuracy (%)", lambda r: r.get("accuracy"), lambda r: r.get("accuracy_stderr"), 100.0))
    if any((r.get("lc_win_rate") is not None or r.get("win_rate") is not None) and r.get("steps") for r in rows):
        def wr(r):
            return r.get("lc_win_rate") if r.get("lc_win_rate") is not None else r.get("win_rate")

        def wr_se(r):
            return r.get("lc_win_rate_stderr") if r.get("lc_win_rate") is not None else r.get("win_rate_stderr")

        panels.append(("AlpacaEval win rate (%, LC when available)", wr, wr_se, 1.0))
    if not panels:
        return False
    multi = len({(r.get("model"), r.get("adapter")) for r in rows}) > 1
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, val, se, scale) in zip(axes[0], panels):
        groups: dict[str, list[tuple[int, float, float]]] = {}
        for r in rows:
            if val(r) is None or not r.get("steps"):
                continue
            groups.setdefault(_group_key(r, multi), []).append((int(r["steps"]), scale * val(r), scale * (se(r) or 0.0)))
        for name, pts in sorted(groups.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=name)
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in groups.values() for p in pts})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        _label_axes(ax, "denoising steps", title, title="method")
    return _save_fig(fig, path)


def plot_repetition_vs_position(rows: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    curves = [(r["label"], [b for b in r.get("position_curve") or [] if b.get("rate") is not None]) for r in rows]
    curves = [(lab, c) for lab, c in curves if c]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, c) in enumerate(curves):  # 10 colours, then the next line style: no two curves look alike
        ax.plot([(b["start"] + b["end"]) / 2 for b in c], [b["rate"] for b in c], marker=".", label=label,
                color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[(i // 10) % 4])
    ns = sorted({str(r.get("position_n")) for r in rows if r.get("position_n")})
    _label_axes(ax, "position after the prompt (bin centre, tokens)", f"repeated {'/'.join(ns) or 'n'}-gram rate",
                fontsize="small")
    return _save_fig(fig, path)


def plot_tokens_per_nfe(rows: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    pts = [(r["label"], r["content_tokens_per_nfe"], r.get("tokens_per_second"), r.get("device"))
           for r in rows if r.get("content_tokens_per_nfe") is not None]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(pts) + 2), 4))
    bars = ax.bar(range(len(pts)), [p[1] for p in pts], color="tab:blue")
    for bar, (_, v, tps, _) in zip(bars, pts):
        txt = f"{v:.2f}" + (f"\n{tps:.0f} tok/s" if tps else "")
        ax.annotate(txt, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="AR decoding (1 token per pass)")
    ax.set_xticks(range(len(pts)), [p[0] for p in pts], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("content tokens per forward pass")
    ax.set_ylim(0, 1.25 * max([p[1] for p in pts] + [1.0]))  # room for the labels above the bars and the legend
    devices = sorted({str(p[3]) for p in pts if p[3]})
    if devices:
        ax.set_title("device: " + "; ".join(devices), fontsize=8)
    ax.legend(fontsize="small")
    return _save_fig(fig, path)


def build_report(
    runs: list[str | Path], out_dir: str | Path = "runs/report", title: str = "difflm eval report",
    x: str | None = None, scores: list[str] | None = None,
) -> dict[str, Any]:
    """Collect the runs (files or folders: generate outputs and lm-eval results files), write report.md,
    report.json and the PNG plots to `out_dir`. With `x` (a dotted recipe key, e.g. decode.kernel_size) also
    a table and a plot of `scores` (default: every score some run has) against that key.

    Returns {"rows": [...], "files": {name: path}, "x": {...} or None}. Raises ConfigError when no run is found,
    no run has the key `x`, or a score is unknown.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    from difflm.eval.runs import load_run
    from difflm.io import atomic_write_json, atomic_write_text

    if not runs:
        raise ConfigError("give at least one run: an outputs JSON of difflm generate or a folder of them", key="runs")
    outputs, lm_files = collect_inputs(list(runs))
    rows = []
    for p in outputs:
        run = load_run(p)
        row = summarize_run(run)
        if x:
            row["x"] = _run_key_value(run, x)
        rows.append(row)
    for p in lm_files:
        row = summarize_lm_eval(p)
        if x:
            row["x"] = _lm_eval_key_value(row, x)
        rows.append(row)
    _unique_labels(rows)
    vs = score_table(rows, x, scores) if x else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    plots = []
    for name, fn in (
        ("score_vs_steps.png", plot_score_vs_steps),
        ("repetition_vs_position.png", plot_repetition_vs_position),
        ("tokens_per_nfe.png", plot_tokens_per_nfe),
    ):
        if fn(rows, out / name):
            files[name] = str(out / name)
            plots.append(str(out / name))
    if vs is not None:
        name = f"score_vs_{_slug(x)}.png"
        if plot_score_vs_key(vs, out / name):
            files[name] = str(out / name)
            plots.append(str(out / name))
    md = render_markdown(rows, plots, title)
    if vs is not None:
        md += "\n" + render_score_table_markdown(vs)
    if any(r.get("lm_eval") for r in rows):
        md += "\n" + render_lm_eval_markdown(rows)
    atomic_write_text(out / "report.md", md)
    files["report.md"] = str(out / "report.md")
    atomic_write_json(out / "report.json", {"title": title, "rows": rows, "x": vs})
    files["report.json"] = str(out / "report.json")
    return {"rows": rows, "files": files, "x": vs}


# -- inputs: generate outputs and lm-eval results files ------------------------------------------------------
def _is_lm_eval_results(path: Path) -> bool:
    """An lm-eval results file (``results_*.json`` of ``--output_path``): a JSON object with results and config."""
    import json

    if not (path.name.startswith("results") and path.suffix == ".json"):
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("results"), dict) and "config" in data


def collect_inputs(paths: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """(generate outputs, lm-eval results files) named in `paths` or found in folders (recursively). A file beside
    an output (its manifest, config, eval results: `DIR/*.json` globs pick them up) and a sweep's index are
    skipped. ConfigError for a missing path or a folder with neither."""
    from difflm.eval.runs import _SIDE_SUFFIXES, _is_outputs_file

    outputs: list[Path] = []
    lm: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            hits = sorted(q for q in p.rglob("*.json") if _is_outputs_file(q))
            lm_hits = sorted(q for q in p.rglob("results*.json") if _is_lm_eval_results(q))
            if not hits and not lm_hits:
                raise ConfigError(f"{p}: no difflm generate outputs (OUT.json with OUT.json.manifest.json) and no "
                                  "lm-eval results (results_*.json) in the folder", key="runs")
            outputs.extend(hits)
            lm.extend(lm_hits)
        elif p.is_file():
            if p.name.endswith(_SIDE_SUFFIXES) or p.name == "sweep.yaml":
                continue
            (lm if _is_lm_eval_results(p) else outputs).append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder", key="runs")

    def dedup(ps: list[Path]) -> list[Path]:
        seen: set[Path] = set()
        return [q for q in ps if not (q.resolve() in seen or seen.add(q.resolve()))]

    outputs, lm = dedup(outputs), dedup(lm)
    if not outputs and not lm:
        raise ConfigError("no runs among the files given (only manifests or eval results?)", key="runs")
    return outputs, lm


def _model_args(config: dict) -> dict[str, Any]:
    """lm-eval's model_args: a dict (lm-eval >= 0.4.3) or a "k=v,k=v" string (values read as YAML)."""
    from difflm.config import parse_overrides

    args = config.get("model_args")
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, str) and args.strip():
        out = {}
        for part in args.split(","):
            k, sep, v = part.partition("=")
            if sep and k.strip():
                out[k.strip()] = parse_overrides([f"v={v}"])["v"] if v.strip() else ""
        return out
    return {}


def summarize_lm_eval(path: str | Path) -> dict[str, Any]:
    """One report row for an lm-eval results file: the settings from its model_args and every numeric metric
    (``lm_eval``: {"task/metric": value}, ``lm_eval_stderr`` likewise)."""
    import json

    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    cfg = data.get("config") or {}
    args = _model_args(cfg)
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for task, res in sorted((data.get("results") or {}).items()):
        for key, v in res.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or key == "sample_len":
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}/{metric}" + ("" if filt in ("", "none") else f" [{filt}]")
            if metric.endswith("_stderr"):
                stderr[name.replace("_stderr", "")] = float(v)
            else:
                metrics[name] = float(v)
    label = f"{path.parent.parent.name}/{path.parent.name}" if path.parent.parent.name else path.parent.name
    return {
        "label": label or path.stem,
        "outputs": str(path),
        "manifest": None,
        "kind": "lm-eval",
        "model": args.get("pretrained") or data.get("model_name") or cfg.get("model"),
        "adapter": args.get("adapter"),
        "method": args.get("decode") or cfg.get("model"),
        "steps": args.get("steps"),
        "gen_length": args.get("gen_length"),
        "kernel_size": args.get("kernel_size"),
        "effective_kernel": args.get("kernel_size"),
        "top_k": args.get("top_k"),
        "model_args": args,
        "lm_eval": metrics,
        "lm_eval_stderr": stderr,
        "items": None,
        "sources": {"lm-eval": str(path)},
    }


# -- a score against a recipe key ----------------------------------------------------------------------------
def _walk(node: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _run_key_value(run, key: str) -> Any:
    """The value of a dotted recipe key for a generate run: its manifest's ``sweep_point``, else the resolved
    recipe beside it (OUT.json.config.yaml), else the manifest; None when none has it."""
    from difflm.config import load_yaml

    m = run.manifest or {}
    if key in (m.get("sweep_point") or {}):
        return m["sweep_point"][key]
    cfg = run.output_path.with_name(run.output_path.name + ".config.yaml")
    if cfg.is_file():
        found, v = _walk(load_yaml(cfg), key)
        if found:
            return v
    found, v = _walk(m, key)
    if found:
        return v
    if key == "model.name" and isinstance(m.get("model"), str):
        return m["model"]
    return None


def _lm_eval_key_value(row: dict, key: str) -> Any:
    """An lm-eval row's value of a dotted key: model_args by the key's last part (decode.kernel_size ->
    kernel_size; model.name -> pretrained)."""
    args = row.get("model_args") or {}
    if key in args:
        return args[key]
    last = key.rsplit(".", 1)[-1]
    if key == "model.name":
        last = "pretrained"
    if key == "decode.method":
        last = "decode"
    return args.get(last)


#: scores of a generate run that `--x` can plot: name -> (row field, scale for display)
RUN_SCORES = {
    "gsm8k_accuracy": ("accuracy", 100.0),
    "win_rate": ("win_rate", 1.0),
    "lc_win_rate": ("lc_win_rate", 1.0),
    "rep_2": ("rep_2", 1.0),
    "rep_4": ("rep_4", 1.0),
    "distinct_2": ("distinct_2", 1.0),
    "gen_ppl_mean": ("gen_ppl_mean", 1.0),
    "gen_ppl_median": ("gen_ppl_median", 1.0),
    "inlier_share": ("inlier_share", 1.0),
    "r_star": ("effective_sample_rate", 1.0),
    "tokens_per_nfe": ("content_tokens_per_nfe", 1.0),
    "tokens_per_second": ("tokens_per_second", 1.0),
}


_PERCENT_SCORES = ("gsm8k_accuracy", "win_rate", "lc_win_rate")


def _row_scores(r: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, (fieldname, scale) in RUN_SCORES.items():
        v = r.get(fieldname)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = scale * float(v)
    for name, v in (r.get("lm_eval") or {}).items():
        out[name] = float(v)
    return out


def _group(r: dict, key: str, multi_model: bool) -> str:
    """Runs in one line of the plot: the same sweep point apart from `key`, else the same method (and model)."""
    if r.get("kind") == "lm-eval":
        return f"lm-eval {_short(r.get('model'))}"
    sp = {k: v for k, v in (r.get("sweep_point") or {}).items() if k != key}
    if sp:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sp.items())
    if r.get("sweep_point") or key == "decode.method":  # the method is what varies: one line per model
        return _short(r.get("model")) + (f" + {_short(r['adapter'])}" if r.get("adapter") else "")
    return _group_key(r, multi_model)


def _slug(key: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "_", key.rsplit(".", 1)[-1])


def score_table(rows: list[dict], key: str, scores: list[str] | None = None) -> dict[str, Any]:
    """{"key", "scores", "rows": [{"label", "group", "x", name: value...}]} sorted by group then x.

    ConfigError when no row has the key, or a requested score is not one any row has."""
    with_x = [r for r in rows if r.get("x") is not None]
    if not with_x:
        raise ConfigError(f"no run has a value for {key}: give a recipe key the runs differ in (a sweep's keys are "
                          "in its manifests' sweep_point, e.g. decode.kernel_size)", key="x")
    available: list[str] = []
    for r in with_x:
        for name in _row_scores(r):
            if name not in available:
                available.append(name)
    if scores:
        bad = [s for s in scores if s not in available]
        if bad:
            raise ConfigError(f"no run has the score {bad[0]!r}; available: {', '.join(available) or 'none'}",
                              key="score")
        chosen = list(scores)
    else:
        chosen = available
    multi = len({(r.get("model"), r.get("adapter")) for r in with_x}) > 1
    out_rows = []
    for r in with_x:
        sc = _row_scores(r)
        out_rows.append({"label": r["label"], "group": _group(r, key, multi), "x": r["x"],
                         **{n: sc.get(n) for n in chosen}})

    def sort_key(t):
        x = t["x"]
        return (t["group"], 0 if isinstance(x, (int, float)) else 1, x if isinstance(x, (int, float)) else str(x))

    out_rows.sort(key=sort_key)
    return {"key": key, "scores": chosen, "rows": out_rows}


def render_score_table_markdown(vs: dict) -> str:
    head = [vs["key"], "group", "run", *vs["scores"]]
    lines = [f"## Scores vs {vs['key']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in vs["rows"]:
        cells = [_fmt(t["x"]), t["group"], t["label"], *[_fmt(t[s]) for s in vs["scores"]]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "gsm8k_accuracy in %; win rates in % (alpaca_eval); r_star = unmask events per step (r*); "
              "lm-eval scores as lm-eval reports them (task/metric).", ""]
    return "\n".join(lines)


def render_lm_eval_markdown(rows: list[dict]) -> str:
    lines = ["## lm-eval results", "", "| run | model_args | task/metric | value |", "|---|---|---|---|"]
    for r in rows:
        if r.get("kind") != "lm-eval":
            continue
        args = ",".join(f"{k}={v}" for k, v in (r.get("model_args") or {}).items())
        for name, v in r["lm_eval"].items():
            se = r["lm_eval_stderr"].get(name)
            lines.append(f"| {r['label']} | {args} | {name} | {v:.4f}" + (f" ± {se:.4f}" if se is not None else "") + " |")
    return "\n".join(lines) + "\n"


def plot_score_vs_key(vs: dict, path: Path) -> bool:
    """One panel per score, one line per group, against the key's values (numbers: a numeric axis, log2 when
    they span a factor of 8 or more; other values: in order of first appearance)."""
    import matplotlib.pyplot as plt

    scores = [s for s in vs["scores"] if any(t[s] is not None for t in vs["rows"])]
    if not scores:
        return False
    xs = [t["x"] for t in vs["rows"]]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    cats = list(dict.fromkeys(map(str, xs)))
    colour = {g: f"C{i % 10}" for i, g in enumerate(sorted({t["group"] for t in vs["rows"]}))}  # one per group
    n = len(scores)
    cols = min(n, 3)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(5 * cols, 3.6 * -(-n // cols)), squeeze=False)
    for ax, s in zip(axes.flat, scores):
        groups: dict[str, list[tuple[Any, float]]] = {}
        for t in vs["rows"]:
            if t[s] is not None:
                groups.setdefault(t["group"], []).append((t["x"] if numeric else cats.index(str(t["x"])), t[s]))
        for g, pts in sorted(groups.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=g, color=colour[g])
        if numeric:
            vals = sorted(set(xs))
            if min(vals) > 0 and max(vals) / min(vals) >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xticks(vals, [_fmt(v) for v in vals])
            ax.minorticks_off()
        else:
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
        ax.set_xlabel(vs["key"])
        ax.set_ylabel(s + (" (%)" if s in _PERCENT_SCORES else ""))
        ax.grid(alpha=0.3)
        if len(groups) > 1 or n == 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _save_fig(fig, path)
