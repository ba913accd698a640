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

Reported: win rate and its standard error (alpaca_eval's ``get_winrate``: the mean preference for the
model, draws counting one half, in %), and the LC win rate with its standard error
(``get_length_controlled_winrate``). The LC win rate is only computed for the full 805-instruction
AlpacaEval set (its GLM uses each instruction's difficulty, by position in that set) and needs
``df_gamed.csv`` from the Hub dataset ``tatsu-lab/alpaca_eval`` (network, or a cached copy); otherwise
it is reported as null with the reason.

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

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from difflm.errors import ConfigError, error_summary

__all__ = [
    "ALPACA_EVAL_SIZE",
    "DEFAULT_ANNOTATOR",
    "annotator_backends",
    "check_judge_key",
    "evaluate_files",
    "load_outputs",
]

DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
ALPACA_EVAL_SIZE = 805

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


def _lc_metrics(annotations, n_total: int, full_set: bool) -> dict[str, Any]:
    from alpaca_eval import metrics

    if not full_set:
        return {
            "length_controlled_winrate": None,
            "lc_standard_error": None,
            "lc_note": f"LC win rate needs the full {ALPACA_EVAL_SIZE}-instruction AlpacaEval set in order "
            f"(got {n_total} pairs)",
        }
    try:
        m = metrics.get_length_controlled_winrate(annotations, save_weights_dir=None)
    except Exception as e:  # noqa: BLE001 - offline (df_gamed.csv from the Hub) or a GLM failure
        return {
            "length_controlled_winrate": None,
            "lc_standard_error": None,
            "lc_note": f"LC win rate failed: {error_summary(e)}"[:300],
        }
    return {
        "length_controlled_winrate": float(m["length_controlled_winrate"]),
        "lc_standard_error": float(m["lc_standard_error"]),
        "lc_note": None,
    }


def _annotator_class():
    """alpaca_eval's `PairwiseAnnotator`, reading its annotation cache with a float preference column.

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
                self.df_annotations = df.astype({key: "float64"})

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
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run alpaca_eval on model outputs vs reference outputs; write and return the summary.

    The judge key is checked first (ConfigError naming the variable). Returns {task, outputs, reference,
    manifest, annotator, win_rate, standard_error, length_controlled_winrate, lc_standard_error, lc_note,
    n_total, n_wins, n_wins_base, n_draws, avg_length, output_dir, settings}.
    """
    from difflm.eval.runs import load_run, results_path
    from difflm.io import atomic_write_json

    check_judge_key(annotator)
    run = load_run(outputs)  # our own checks (records, manifest) before alpaca_eval's
    model_df = load_outputs(outputs)
    ref_df = load_outputs(reference)
    common = set(model_df["instruction"]) & set(ref_df["instruction"])
    if not common:
        raise ConfigError(f"{outputs} and {reference} share no instruction; were they generated on the same set?")
    alpaca_eval = _import_alpaca_eval()
    out_dir = Path(output_dir) if output_dir else Path(str(run.output_path) + ".alpaca_eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    n_pairs = min(len(common), max_instances or len(common))
    full_set = n_pairs == ALPACA_EVAL_SIZE and len(model_df) == ALPACA_EVAL_SIZE
    if on_progress:
        on_progress(f"judging {n_pairs} pairs with {annotator}")
    name, row = _judge(
        alpaca_eval, model_df, ref_df, annotator, out_dir, max_instances, full_set, dict(annotator_kwargs or {})
    )
    ref_manifest = Path(str(reference) + ".manifest.json")
    summary = {
        "task": "alpaca",
        "outputs": str(run.output_path),
        "reference": str(reference),
        "manifest": str(run.manifest_path) if run.manifest_path else None,
        "outputs_sha256": run.digest,
        "reference_manifest": str(ref_manifest) if ref_manifest.is_file() else None,
        "annotator": str(annotator),
        "generator": name,
        **{k: row.get(k) for k in _LEADERBOARD_KEYS},
        "output_dir": str(out_dir),
        "settings": run.settings(),
    }
    path = Path(results) if results else results_path(run.output_path, "alpaca")
    atomic_write_json(path, summary)
    summary["results_path"] = str(path)
    return summary


# The leaderboard columns the summary keeps (in this order).
_LEADERBOARD_KEYS = (
    "win_rate", "standard_error", "length_controlled_winrate", "lc_standard_error", "lc_note",
    "discrete_win_rate", "n_total", "n_wins", "n_wins_base", "n_draws", "avg_length",
)


def _judge(alpaca_eval, model_df, ref_df, annotator: str, out_dir: Path, max_instances: int | None,
           full_set: bool, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Run `alpaca_eval.evaluate` (annotations cached in `out_dir`); return (generator name, its leaderboard
    row as JSON-able values), the row's metrics being alpaca_eval's win rate plus our length-controlled one."""

    def fn_metric(annotations) -> dict[str, Any]:
        from alpaca_eval import metrics

        m = dict(metrics.get_winrate(annotations))
        m.update(_lc_metrics(annotations, len(annotations), full_set))
        return m

    kwargs.setdefault("caching_path", str(out_dir / "annotations_cache.json"))
    kwargs.setdefault("Annotator", _annotator_class())  # reruns over the cache (see _annotator_class)
    leaderboard, _ = alpaca_eval.evaluate(
        model_outputs=model_df,
        reference_outputs=ref_df,
        annotators_config=str(annotator_config_path(annotator)) if Path(annotator).exists() else annotator,
        output_path=out_dir,
        precomputed_leaderboard=None,
        is_return_instead_of_print=True,
        fn_metric=fn_metric,
        sort_by="win_rate",
        max_instances=max_instances,
        is_cache_leaderboard=False,
        **kwargs,
    )
    name = alpaca_eval.utils.get_generator_name(None, model_df)
    return name, {k: _jsonable(v) for k, v in leaderboard.loc[name].to_dict().items()}
