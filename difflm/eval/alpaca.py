"""AlpacaEval: judge `difflm generate` outputs against reference answers with the `alpaca_eval` package.

    difflm generate --recipe recipes/generate-alpaca-eval.yaml -o runs/alpaca-conv.json
    difflm generate --recipe recipes/reference-nucleus.yaml -m YOUR/AR-SFT-MODEL -o runs/reference.json
    OPENAI_API_KEY=... difflm eval alpaca --outputs runs/alpaca-conv.json --reference runs/reference.json

The files `difflm generate` writes are the JSON list alpaca_eval reads (``instruction``, ``output``,
``generator``, ``dataset``, plus extra fields it ignores); alpaca_eval pairs the two files by
``instruction`` and asks the annotator (an LLM judge) which output is better.

Paper setting (Seo et al. 2025): the reference is an AR model of the same size, SFT'd the same way and
decoded with nucleus sampling p = 0.95; the annotator is GPT-4-turbo (AlpacaEval 2.0's default,
``weighted_alpaca_eval_gpt4_turbo``), and the headline number is the length-controlled (LC) win rate.

Any set: the outputs of ``--eval-set mt_bench|wiki|arena_hard|alpaca_eval|...`` (or any instruction file)
are judged against a reference file of the same instructions.

Reported: win rate and its standard error (alpaca_eval's ``get_winrate``: the mean preference for the
model, draws counting one half, in %), the LC win rate with its standard error on every set
(`difflm.eval.lc`: alpaca_eval's ``length_controlled_v1`` on the full 805-instruction AlpacaEval set when
its Hub file is at hand, else its ``length_controlled_minimal`` GLM, computed offline), n, and the same per
set, per category and per MT-Bench turn (``by_eval_set``, ``by_category``, ``by_turn``).

The judge: any OpenAI-compatible endpoint and model (`difflm.eval.judge`), with the annotator's own prompt
and parser. Annotations are cached after every chunk of `chunk_size` pairs: a judge that stops answering
(refused, timed out) ends the run with one line naming its URL, and a rerun asks only for the pairs not yet
in the cache.

Network and keys: the judge calls an API. The key its backend needs is checked before anything is
loaded: OpenAI annotators need ``OPENAI_API_KEY`` (or ``OPENAI_API_KEYS``, or an
``OPENAI_CLIENT_CONFIG_PATH`` file), Anthropic ones ``ANTHROPIC_API_KEY``, Google ``GOOGLE_API_KEY``,
Cohere ``COHERE_API_KEY``, the Hugging Face Inference API ``HUGGINGFACEHUB_API_TOKEN``. A missing key is a
ConfigError (one line, exit 2 in the CLI). Local annotators (``huggingface_local_completions``,
``vllm_local_completions``) need no key.

Files: alpaca_eval's own outputs (annotations.json, leaderboard.csv) and the judge cache go to
``OUT.json.alpaca_eval/``; the summary to ``OUT.json.alpaca.json``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from difflm.errors import ConfigError, DifflmError, error_summary
from difflm.eval.judge import JudgeEndpoint

__all__ = [
    "ALPACA_EVAL_SIZE",
    "DEFAULT_ANNOTATOR",
    "DEFAULT_CHUNK_SIZE",
    "JudgeError",
    "JudgeEndpoint",
    "annotator_backends",
    "check_judge_key",
    "evaluate_files",
    "load_outputs",
]

DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
ALPACA_EVAL_SIZE = 805
#: pairs judged between two writes of the annotation cache (at most this many answers are asked again after a
#: judge failure; alpaca_eval's default, 128, would lose up to 127)
DEFAULT_CHUNK_SIZE = 16
#: the columns of an outputs file handed to alpaca_eval (the rest, e.g. MT-Bench's list-valued `turns`, stays
#: out of its merge, which cannot hash lists); categories etc. are read from the records by difflm
_JUDGE_COLUMNS = ("instruction", "output", "generator")


class JudgeError(DifflmError):
    """The judge did not answer (refused, timed out, an HTTP error): one line, naming its URL."""

#: fn_completions backend -> (environment variables, any of which suffices; who it calls)
_BACKEND_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "openai_completions": (("OPENAI_API_KEY", "OPENAI_API_KEYS"), "the OpenAI API"),
    "anthropic_completions": (("ANTHROPIC_API_KEY",), "the Anthropic API"),
    "bedrock_anthropic_completions": (("AWS_ACCESS_KEY_ID", "AWS_PROFILE"), "AWS Bedrock"),
    "google_completions": (("GOOGLE_API_KEY",), "the Google API"),
    "cohere_completions": (("COHERE_API_KEY",), "the Cohere API"),
    "huggingface_api_completions": (("HUGGINGFACEHUB_API_TOKEN",), "the Hugging Face Inference API"),
    "jinachat_completions": (("JINA_CHAT_API_KEY",), "the JinaChat API"),
}


def _package_dir() -> Path:
    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the alpaca_eval package is not installed: pip install 'difflm[eval]' (alpaca-eval)")
    return Path(list(spec.submodule_search_locations)[0])


def _import_alpaca_eval():
    try:
        import alpaca_eval
        import alpaca_eval.metrics
        import alpaca_eval.utils
    except ModuleNotFoundError as e:
        if e.name == "pkg_resources":
            raise ConfigError(
                "alpaca_eval needs pkg_resources, which setuptools >= 81 no longer ships: pip install 'setuptools<81'"
            ) from None
        raise ConfigError(f"the alpaca_eval package is not installed ({e}): pip install 'difflm[eval]'") from None
    return alpaca_eval


def annotator_config_path(annotator: str | os.PathLike) -> Path:
    """The configs.yaml of an annotator: a name from alpaca_eval's evaluators_configs, a folder, or a file."""
    p = Path(annotator)
    if p.is_file():
        return p
    if p.is_dir() and (p / "configs.yaml").is_file():
        return p / "configs.yaml"
    base = _package_dir() / "evaluators_configs"
    cfg = base / str(annotator) / "configs.yaml"
    if not cfg.is_file():
        names = sorted(d.name for d in base.iterdir() if (d / "configs.yaml").is_file()) if base.is_dir() else []
        hint = f"; e.g. {', '.join(n for n in names if 'gpt4_turbo' in n)[:200]}" if names else ""
        raise ConfigError(f"unknown alpaca_eval annotator {str(annotator)!r}{hint}", key="annotator")
    return cfg


def annotator_backends(annotator: str | os.PathLike) -> set[str]:
    """The ``fn_completions`` backends an annotator config uses (default: openai_completions)."""
    import yaml

    cfg = yaml.safe_load(annotator_config_path(annotator).read_text(encoding="utf-8")) or {}
    backends = set()
    for sub in cfg.values() if isinstance(cfg, dict) else []:
        if isinstance(sub, dict):
            fn = sub.get("fn_completions", "openai_completions")
            backends.add(fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn)))
    return backends or {"openai_completions"}


def check_judge_key(annotator: str | os.PathLike = DEFAULT_ANNOTATOR, environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError (one line, naming the variable to set) when the annotator's API key is missing."""
    env = os.environ if environ is None else environ
    for backend in sorted(annotator_backends(annotator)):
        if backend not in _BACKEND_KEYS:
            continue  # local or unknown backend: nothing to check
        names, who = _BACKEND_KEYS[backend]
        if any(env.get(n) for n in names):
            continue
        if backend == "openai_completions" and env.get("OPENAI_CLIENT_CONFIG_PATH") and Path(
            env["OPENAI_CLIENT_CONFIG_PATH"]
        ).is_file():
            continue
        alt = " (or OPENAI_CLIENT_CONFIG_PATH=a client config file)" if backend == "openai_completions" else ""
        raise ConfigError(f"the alpaca_eval annotator {annotator} calls {who}: set {names[0]}{alt}", key="annotator")


def load_outputs(path: str | os.PathLike):
    """Read an outputs file with alpaca_eval's own loader (`alpaca_eval.utils.load_or_convert_to_dataframe`)
    and check the columns the judge needs (``instruction``, ``output``; ``generator`` is added from the
    file name when absent). Returns the pandas DataFrame."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file", key="outputs")
    _import_alpaca_eval()
    from alpaca_eval import utils

    try:
        df = utils.load_or_convert_to_dataframe(p)
    except ValueError as e:
        raise ConfigError(f"{p}: alpaca_eval cannot read it ({e})") from None
    missing = [c for c in ("instruction", "output") if c not in df.columns]
    if missing:
        raise ConfigError(f"{p}: no {' / '.join(missing)} column; alpaca_eval needs instruction and output")
    if "generator" not in df.columns:
        df["generator"] = p.stem
    df["output"] = df["output"].fillna("").astype(str)
    return df


def _labels(df) -> dict[str, dict[str, Any]]:
    """instruction -> the record's eval_set / category / turn (the first record with that instruction).
    Records of the WikiText task written before it was renamed say ``eval_set: wiki`` without the paper's
    ``entity``: they are labelled ``wikitext``."""
    out: dict[str, dict[str, Any]] = {}
    cols = [c for c in ("eval_set", "dataset", "category", "turn", "entity") if c in df.columns]
    for rec in df[["instruction", *cols]].to_dict("records"):
        rec = {k: _jsonable(v) for k, v in rec.items()}
        if rec.get("eval_set") == "wiki" and not rec.get("entity"):
            rec["eval_set"] = "wikitext"
        out.setdefault(rec["instruction"], rec)
    return out


@contextlib.contextmanager
def _alpaca_eval_logs():
    """Keep alpaca_eval's root-logger messages (INFO chatter; on a judge error, a full traceback from its
    ``logging.exception``) off the terminal while it runs: they go to a handler here and are dropped."""
    import logging

    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)  # root has a handler: Python's last-resort stderr printer stays unused
    try:
        yield
    finally:
        root.removeHandler(handler)


def _annotator_class():
    """alpaca_eval's `PairwiseAnnotator`, reading its annotation cache with a float preference column and
    without the pairs cached as missing (see below).

    Why: the cache is a JSON file that alpaca_eval reads back with `pd.read_json`, which turns a column of
    whole numbers (preferences 1.0 / 2.0, as a discrete judge or clear logprobs give) into int64. Its
    `_preprocess` then sets draws (identical outputs) with ``df.loc[same, "preference"] = 1.5``: pandas 2
    upcast with a FutureWarning, pandas 3 raises "Invalid value '1.5' for dtype 'int64'", so every rerun
    over cached annotations crashed. A work-around here rather than a pandas<3 pin: it touches only the
    loaded cache (`evaluate` takes the annotator class as a parameter: no patching of alpaca_eval), and
    keeps the rest of the environment (lm-eval, datasets) on the pandas it has.
    """
    import pandas as pd
    from alpaca_eval.annotators import PairwiseAnnotator

    class _CachedFloatPreferenceAnnotator(PairwiseAnnotator):
        def load_(self, path=None):
            super().load_(path)
            df = self.df_annotations
            key = self.annotation_key
            if df is not None and key in df.columns and pd.api.types.is_integer_dtype(df[key]):
                df = self.df_annotations = df.astype({key: "float64"})
            if df is not None and key in df.columns:
                # pairs whose judge answer could not be parsed are cached as "missing" (-1 / null), and
                # alpaca_eval would never ask again, even a fixed server: dropped here, so a rerun asks for them
                self.df_annotations = df[df[key].notna() & (df[key] != self.TMP_MISSING_ANNOTATION)]

    return _CachedFloatPreferenceAnnotator


def _jsonable(v: Any) -> Any:
    """numpy scalars -> Python; NaN (pandas' empty cell) -> None."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            v = v.item()
        except (ValueError, TypeError):
            pass
    if isinstance(v, float) and v != v:
        return None
    return v


def evaluate_files(
    outputs: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    annotator: str = DEFAULT_ANNOTATOR,
    output_dir: str | os.PathLike | None = None,
    max_instances: int | None = None,
    results: str | os.PathLike | None = None,
    annotator_kwargs: dict[str, Any] | None = None,
    judge: JudgeEndpoint | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run alpaca_eval on model outputs vs reference outputs; write and return the summary.

    `judge`: where the judge is (`difflm.eval.judge.JudgeEndpoint`; default: the annotator's own API and model).
    The judge settings and key are checked first (ConfigError, one line). A judge that stops answering raises
    `JudgeError` (one line naming its URL); the pairs judged before stay in the cache. Returns {task, outputs,
    reference, manifest, annotator, judge, win_rate, standard_error, length_controlled_winrate (= lc_win_rate),
    lc_standard_error, lc_method, lc_note, n (= n_total), n_wins, n_wins_base, n_draws, avg_length, by_eval_set,
    by_category, by_turn, output_dir, settings}.
    """
    from difflm.eval.runs import load_run, results_path
    from difflm.io import atomic_write_json

    judge = judge or JudgeEndpoint()
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"must be a whole number >= 1, got {chunk_size!r}", key="chunk_size")
    if judge.custom:
        judge.check(annotator_backends(annotator), str(annotator))
    else:
        check_judge_key(annotator)
    run = load_run(outputs)  # our own checks (records, manifest) before alpaca_eval's
    model_full = load_outputs(outputs)
    ref_df = load_outputs(reference)[list(_JUDGE_COLUMNS)]
    model_df = model_full[list(_JUDGE_COLUMNS)]
    common = set(model_df["instruction"]) & set(ref_df["instruction"])
    if not common:
        raise ConfigError(f"{outputs} and {reference} share no instruction; were they generated on the same set?")
    alpaca_eval = _import_alpaca_eval()
    out_dir = Path(output_dir) if output_dir else Path(str(run.output_path) + ".alpaca_eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    n_pairs = min(len(common), max_instances or len(common))
    full_set = n_pairs == ALPACA_EVAL_SIZE and len(model_df) == ALPACA_EVAL_SIZE
    config = annotator_config_path(annotator)
    annotation_kwargs: dict[str, Any] = {"chunksize": chunk_size}
    judge_name = None
    if judge.custom:
        config, judge_name = judge.annotator_config(config, out_dir)
        annotation_kwargs["client_config_path"] = str(judge.write_client_config(out_dir / "judge_client.yaml"))
    if on_progress:
        on_progress(f"judging {n_pairs} pairs with {judge_name or annotator}"
                    + (f" at {judge.base_url}" if judge.base_url else ""))
    cache = out_dir / "annotations_cache.json"
    try:
        name, row, annotations = _judge(alpaca_eval, model_df, ref_df, config, out_dir, max_instances, full_set,
                                        dict(annotator_kwargs or {}), annotation_kwargs)
    except Exception as e:
        import openai

        if isinstance(e, openai.OpenAIError):
            raise JudgeError(
                f"the judge at {judge.where} did not answer ({error_summary(e)[:160]}); {_cached_pairs(cache)} judged "
                f"pairs are kept in {cache}: rerun to judge the rest"
            ) from None
        if not judge.custom or isinstance(e, DifflmError):
            raise
        # the server answered, but not in the form the annotator parses (typically: no logprobs)
        raise JudgeError(
            f"the annotator {annotator} could not read the answers of the judge at {judge.where} "
            f"({error_summary(e)[:120]}){_parser_hint(config)}; {_cached_pairs(cache)} judged pairs are kept in {cache}"
        ) from None
    groups = _groups(annotations, _labels(model_full))
    ref_manifest = Path(str(reference) + ".manifest.json")
    summary = {
        "task": "alpaca",
        "outputs": str(run.output_path),
        "reference": str(reference),
        "manifest": str(run.manifest_path) if run.manifest_path else None,
        "outputs_sha256": run.digest,
        "reference_manifest": str(ref_manifest) if ref_manifest.is_file() else None,
        "annotator": str(annotator),
        "judge": {"annotator": judge_name or str(annotator), "model": judge.model, "base_url": judge.base_url,
                  "api_key_env": judge.api_key_env if judge.custom else None},
        "generator": name,
        **{k: row.get(k) for k in _LEADERBOARD_KEYS},
        "lc_win_rate": row.get("length_controlled_winrate"),
        "n": row.get("n_total"),
        **groups,
        "output_dir": str(out_dir),
        "settings": run.settings(),
    }
    path = Path(results) if results else results_path(run.output_path, "alpaca")
    atomic_write_json(path, summary)
    summary["results_path"] = str(path)
    return summary


# The leaderboard columns the summary keeps (in this order).
_LEADERBOARD_KEYS = (
    "win_rate", "standard_error", "length_controlled_winrate", "lc_standard_error", "lc_method", "lc_note",
    "discrete_win_rate", "n_total", "n_wins", "n_wins_base", "n_draws", "avg_length",
)


def _parser_hint(config: Path) -> str:
    """What the annotator asks of the judge's answers (for an error message)."""
    import yaml

    try:
        (sub,) = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).values()
        wants_logprobs = bool((sub.get("completions_kwargs") or {}).get("logprobs"))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return ""
    return "; it reads the logprobs of the answer tokens: does the server return logprobs" if wants_logprobs else ""


def _cached_pairs(cache: Path) -> int:
    """Pairs in the annotation cache with a preference (alpaca_eval also stores failed ones, as null)."""
    try:
        return sum(a.get("preference") not in (None, -1) for a in json.loads(cache.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return 0


def _groups(annotations, labels: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """by_eval_set / by_category / by_turn (each {} when the records do not say)."""
    from difflm.eval.lc import group_winrates

    with _alpaca_eval_logs():
        g = group_winrates(annotations, labels, keys=("eval_set", "category", "turn"))
    return {"by_eval_set": g.get("eval_set", {}), "by_category": g.get("category", {}), "by_turn": g.get("turn", {})}


def _judge(alpaca_eval, model_df, ref_df, config: Path, out_dir: Path, max_instances: int | None,
           full_set: bool, kwargs: dict[str, Any], annotation_kwargs: dict[str, Any]):
    """Run `alpaca_eval.evaluate` (annotations cached in `out_dir`); return (generator name, its leaderboard
    row as JSON-able values, the annotations), the row's metrics being alpaca_eval's win rate plus our
    length-controlled one (`difflm.eval.lc`)."""
    from difflm.eval.lc import length_controlled

    seen: dict[str, Any] = {}

    def fn_metric(annotations) -> dict[str, Any]:
        from alpaca_eval import metrics, utils

        df = utils.convert_to_dataframe(annotations)
        seen["annotations"] = df.copy()
        m = dict(metrics.get_winrate(df))
        m.update(length_controlled(df, full_set))
        return m

    kwargs.setdefault("caching_path", str(out_dir / "annotations_cache.json"))
    kwargs.setdefault("Annotator", _annotator_class())  # reruns over the cache (see _annotator_class)
    with _alpaca_eval_logs():
        leaderboard, _ = alpaca_eval.evaluate(
            model_outputs=model_df,
            reference_outputs=ref_df,
            annotators_config=str(config),
            output_path=out_dir,
            precomputed_leaderboard=None,
            is_return_instead_of_print=True,
            fn_metric=fn_metric,
            sort_by="win_rate",
            max_instances=max_instances,
            is_cache_leaderboard=False,
            annotation_kwargs=annotation_kwargs,
            **kwargs,
        )
    name = alpaca_eval.utils.get_generator_name(None, model_df)
    return name, {k: _jsonable(v) for k, v in leaderboard.loc[name].to_dict().items()}, seen["annotations"]
