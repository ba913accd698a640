r"""Fluency diagnostics: repetition, diversity, lengths, and repetition by distance from the prompt.

The paper's long-decoding-window problem (Seo et al. 2025): tokens far from the prompt are decoded with
little context, so outputs grow repetitive and fall back on very frequent tokens. These metrics make it
measurable. All are computed on the output *text* (already cut at the first EOS/EOT by `difflm
generate`), split into tokens t_1 .. t_N: the model's tokenizer ids when a tokenizer is given (then
positions are model-token positions after the prompt), else whitespace-separated words.

Definitions (one output of N tokens; an n-gram is a window (t_i, ..., t_{i+n-1}); G_n = the N - n + 1
n-grams of the output as a list, U(G_n) the set of distinct ones):

- **rep-n** (repeated n-gram rate, Welleck et al. 2019):  rep_n = 1 - |U(G_n)| / |G_n|, the share of
  n-grams that repeat an earlier n-gram of the same output. Undefined (None) when N < n. Reported for
  n = 2 and 4; the aggregate is the mean over the outputs where it is defined.
- **distinct-n** (Li et al. 2016), over the whole run: distinct_n = |U(G_n^1) ∪ ... ∪ U(G_n^M)| / sum_m
  |G_n^m| for the M outputs (distinct n-grams across all outputs over all n-grams). Per output,
  ``distinct_1`` = |U(G_1)| / N (the type-token ratio).
- **longest repeated span**: the largest L such that some span of L consecutive tokens occurs at least
  twice in the output (occurrences may overlap: "a b a b a" has L = 3). 0 when nothing repeats.
- **frequent-token share**: with F = the k (=100) most frequent tokens of a corpus (by default the run's
  own outputs; ties broken by first occurrence), share = (number of tokens of the output in F) / N. The
  aggregate pools all tokens: sum_m |{i : t_i^m in F}| / sum_m N_m.
- **length**: N (metric tokens); ``content_tokens`` is the record's own count of generated model tokens
  before the first EOS/EOT (from `difflm generate`), averaged as ``content_tokens_mean``.
- **empty share**: the share of outputs with N = 0 (nothing but whitespace before EOS).
- **repetition by position**: position i (0-based after the prompt) is a *repeat* when the n-gram that
  ends at i, (t_{i-n+1}, ..., t_i), occurred earlier in the same output, ending at some j < i; positions
  i < n - 1 have no n-gram and are not counted. Positions are grouped in bins [b*w, (b+1)*w) (w = 64)
  and rate_b = (repeat positions in bin b, over all outputs) / (positions >= n - 1 in bin b, over all
  outputs). Over a whole output, the repeat positions / counted positions is exactly rep_n. Default
  n = 4. A curve that rises with the bin is the long-window failure.

Generative perplexity under an AR scorer and the inlier share: `difflm.eval.genppl` (added to the results by
`evaluate_file(..., scorer=...)`).

    from difflm.eval.fluency import fluency_metrics
    m = fluency_metrics(["a b a b a b", "the cat sat"])
    m["aggregate"]["rep_2"], m["items"][0]["longest_repeat"]     # (0.3, 4)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Hashable, Sequence

from difflm.errors import ConfigError

__all__ = [
    "distinct_n",
    "fluency_metrics",
    "frequent_tokens",
    "longest_repeated_span",
    "ngrams",
    "rep_n",
    "repeat_flags",
    "repetition_by_position",
    "tokenize",
]

Tokens = Sequence[Hashable]


def tokenize(texts: Sequence[str], tokenizer: Any = None) -> list[list[Hashable]]:
    """Tokens of each text: tokenizer ids (no special tokens added) when given, else ``str.split()``."""
    if tokenizer is None:
        return [t.split() for t in texts]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) if t.strip() else [] for t in texts]


def ngrams(tokens: Tokens, n: int) -> list[tuple]:
    """The N - n + 1 n-grams of `tokens` (empty when N < n)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(tokens: Tokens, n: int) -> float | None:
    """rep_n = 1 - |distinct n-grams| / |n-grams|; None when there is no n-gram."""
    grams = ngrams(tokens, n)
    if not grams:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(token_lists: Sequence[Tokens], n: int) -> float | None:
    """Corpus distinct-n: distinct n-grams over all outputs / all n-grams; None when there are none."""
    total = 0
    seen: set[tuple] = set()
    for toks in token_lists:
        grams = ngrams(toks, n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def longest_repeated_span(tokens: Tokens) -> int:
    """The length of the longest span of consecutive tokens that occurs at least twice (overlaps allowed)."""
    import numpy as np

    n = len(tokens)
    if n < 2:
        return 0
    index: dict[Hashable, int] = {}
    ids = np.fromiter((index.setdefault(t, len(index)) for t in tokens), dtype=np.int64, count=n)
    best = 0
    for d in range(1, n):
        if n - d <= best:  # a run at shift d is at most n - d long
            break
        eq = ids[:-d] == ids[d:]
        if not eq.any():
            continue
        edges = np.diff(np.concatenate(([0], eq.astype(np.int8), [0])))
        runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
        best = max(best, int(runs.max()))
    return best


def repeat_flags(tokens: Tokens, n: int) -> list[bool | None]:
    """Per position i: None when i < n - 1, else whether the n-gram ending at i occurred earlier."""
    flags: list[bool | None] = [None] * min(len(tokens), n - 1)
    seen: set[tuple] = set()
    for i in range(n - 1, len(tokens)):
        g = tuple(tokens[i - n + 1 : i + 1])
        flags.append(g in seen)
        seen.add(g)
    return flags


def repetition_by_position(token_lists: Sequence[Tokens], n: int = 4, bin_width: int = 64) -> list[dict]:
    """The repetition curve: for each bin [start, end) of positions, {start, end, positions, repeats, rate}
    pooled over all outputs (rate None for a bin without counted positions). Bins run up to the longest
    output."""
    if bin_width < 1 or n < 1:
        raise ValueError("bin_width and n must be >= 1")
    longest = max((len(t) for t in token_lists), default=0)
    n_bins = -(-longest // bin_width)
    counted = [0] * n_bins
    repeats = [0] * n_bins
    for toks in token_lists:
        for i, flag in enumerate(repeat_flags(toks, n)):
            if flag is None:
                continue
            b = i // bin_width
            counted[b] += 1
            repeats[b] += int(flag)
    return [
        {
            "start": b * bin_width,
            "end": (b + 1) * bin_width,
            "positions": counted[b],
            "repeats": repeats[b],
            "rate": repeats[b] / counted[b] if counted[b] else None,
        }
        for b in range(n_bins)
    ]


def frequent_tokens(token_lists: Sequence[Tokens], k: int = 100) -> set[Hashable]:
    """The k most frequent tokens over all lists (ties: the token seen first wins)."""
    counts: Counter = Counter()
    for toks in token_lists:
        counts.update(toks)
    return {t for t, _ in counts.most_common(k)}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def fluency_metrics(
    texts: Sequence[str],
    *,
    tokenizer: Any = None,
    ids: Sequence[str] | None = None,
    content_tokens: Sequence[int | None] | None = None,
    frequent_corpus: Sequence[str] | None = None,
    top_frequent: int = 100,
    position_n: int = 4,
    bin_width: int = 64,
) -> dict[str, Any]:
    """All fluency metrics of a list of output texts (see the module doc for the formulas).

    `frequent_corpus` (texts) defines the frequent-token set F; default: `texts` themselves.
    Returns {"items": [per output], "aggregate": {...}, "position_curve": [...], "settings": {...}}.
    """
    toks = tokenize(texts, tokenizer)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(texts))]
    content_tokens = list(content_tokens) if content_tokens is not None else [None] * len(texts)
    freq_src = toks if frequent_corpus is None else tokenize(frequent_corpus, tokenizer)
    frequent = frequent_tokens(freq_src, top_frequent)
    items = []
    for rid, t, ct in zip(ids, toks, content_tokens):
        items.append({
            "id": rid,
            "tokens": len(t),
            "content_tokens": ct,
            "empty": len(t) == 0,
            "rep_2": rep_n(t, 2),
            "rep_4": rep_n(t, 4),
            "distinct_1": len(set(t)) / len(t) if t else None,
            "longest_repeat": longest_repeated_span(t),
            "frequent_share": sum(x in frequent for x in t) / len(t) if t else None,
        })
    n_tok = sum(len(t) for t in toks)
    m = len(items)
    aggregate = {
        "outputs": m,
        "rep_2": _mean([it["rep_2"] for it in items]),
        "rep_4": _mean([it["rep_4"] for it in items]),
        "distinct_1": distinct_n(toks, 1),
        "distinct_2": distinct_n(toks, 2),
        "distinct_4": distinct_n(toks, 4),
        "longest_repeat_mean": _mean([float(it["longest_repeat"]) for it in items]),
        "longest_repeat_max": max((it["longest_repeat"] for it in items), default=None),
        "frequent_share": sum(sum(x in frequent for x in t) for t in toks) / n_tok if n_tok else None,
        "tokens_mean": n_tok / m if m else None,
        "content_tokens_mean": _mean([float(c) for c in content_tokens if c is not None]),
        "empty_share": sum(it["empty"] for it in items) / m if m else None,
    }
    return {
        "items": items,
        "aggregate": aggregate,
        "position_curve": repetition_by_position(toks, position_n, bin_width),
        "settings": {
            "tokens": "tokenizer" if tokenizer is not None else "whitespace",
            "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
            "top_frequent": top_frequent,
            "frequent_from": "outputs" if frequent_corpus is None else "given corpus",
            "position_n": position_n,
            "bin_width": bin_width,
        },
    }


def load_tokenizer(name: str) -> Any:
    """A Hugging Face tokenizer from a folder or Hub name: `difflm.models.tokenizer.load_tokenizer` (cached
    copies only when the Hub is offline or unreachable, so a machine without network gets an error in
    seconds), with any failure reported as bad input."""
    from difflm.errors import ConfigError, error_summary
    from difflm.models.tokenizer import load_tokenizer as load_model_tokenizer

    try:
        # trust_remote_code=False: never the interactive prompt for checkpoints with remote code (LLaDA's
        # own format); their tokenizers are standard ones
        return load_model_tokenizer(name, source=name, local=False, family="ar", trust_remote_code=False)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a missing or bad tokenizer is bad input
        raise ConfigError(f"cannot load tokenizer {name!r} ({error_summary(e)})", key="tokenizer") from None


def evaluate_file(
    outputs: str | Path,
    *,
    tokenizer: str | None = None,
    frequent_from: str | Path | None = None,
    top_frequent: int = 100,
    position_n: int = 4,
    bin_width: int = 64,
    results: str | Path | None = None,
    tokenizer_obj: Any = None,
    scorer: str | None = None,
    scorer_obj: Any = None,
    scorer_dtype: str = "auto",
    device: str | None = None,
    context: str = "bos",
    max_length: int | None = None,
    batch_size: int = 8,
    inlier_reference: str | Path | None = None,
    reference_limit: int | None = None,
    inlier_scale: str = "ppl",
    on_progress: Any = None,
) -> dict[str, Any]:
    """Fluency metrics of a `difflm generate` output file, written to `results` (default
    OUT.json.fluency.json) with the run's manifest path and settings. `frequent_from` is another outputs
    file (e.g. the reference answers) whose tokens define the frequent set.

    With `scorer` (a causal LM name or folder; or a loaded one as `scorer_obj`): generative perplexity per
    output and its mean / median / pooled value (`difflm.eval.genppl`), and with `inlier_reference` (a file
    of reference texts) the inlier share. `on_progress(what, done, total)` reports the scoring."""
    from difflm.eval.runs import load_run, results_path
    from difflm.io import atomic_write_json

    run = load_run(outputs)
    if inlier_reference is not None and scorer is None and scorer_obj is None:
        raise ConfigError("the inlier share needs a scorer (--scorer)", key="inlier_reference")
    ref = None
    if inlier_reference is not None:  # a bad reference file fails before the scorer loads
        from difflm.eval.genppl import read_reference_texts

        ref = read_reference_texts(inlier_reference, reference_limit)
    tok = tokenizer_obj if tokenizer_obj is not None else (load_tokenizer(tokenizer) if tokenizer else None)
    corpus = [r["output"] for r in load_run(frequent_from).records] if frequent_from else None
    m = fluency_metrics(
        [r["output"] for r in run.records],
        tokenizer=tok,
        ids=[str(r.get("id", i)) for i, r in enumerate(run.records)],
        content_tokens=[r.get("content_tokens") for r in run.records],
        frequent_corpus=corpus,
        top_frequent=top_frequent,
        position_n=position_n,
        bin_width=bin_width,
    )
    if scorer is not None or scorer_obj is not None:
        _add_gen_ppl(m, run.records, ref, scorer=scorer, scorer_obj=scorer_obj, scorer_dtype=scorer_dtype,
                     device=device, context=context, max_length=max_length, batch_size=batch_size,
                     inlier_scale=inlier_scale, inlier_reference=inlier_reference, on_progress=on_progress)
    if tokenizer:
        m["settings"]["tokenizer"] = tokenizer
    if frequent_from:
        m["settings"]["frequent_from"] = str(frequent_from)
    out = {
        "task": "fluency",
        "outputs": str(run.output_path),
        "manifest": str(run.manifest_path) if run.manifest_path else None,
        "outputs_sha256": run.digest,
        "settings": {**run.settings(), **{"fluency": m["settings"]}},
        "aggregate": m["aggregate"],
        "position_curve": m["position_curve"],
        **({"inlier": m["inlier"]} if "inlier" in m else {}),
        "items": m["items"],
    }
    path = Path(results) if results else results_path(run.output_path, "fluency")
    atomic_write_json(path, out)
    out["results_path"] = str(path)
    return out


def _add_gen_ppl(m: dict, records: list[dict], ref, *, scorer, scorer_obj, scorer_dtype, device, context, max_length,
                 batch_size, inlier_scale, inlier_reference, on_progress) -> None:
    """Score the records (and the inlier reference) under the scorer; put the results into `m`."""
    from difflm.eval.genppl import CONTEXTS, SCALES, aggregate, inlier_share, load_scorer, score_texts

    if context not in CONTEXTS:
        raise ConfigError(f"must be one of {', '.join(CONTEXTS)}, got {context!r}", key="context")
    if inlier_scale not in SCALES:
        raise ConfigError(f"must be one of {', '.join(SCALES)}, got {inlier_scale!r}", key="inlier_scale")
    model = scorer_obj if scorer_obj is not None else load_scorer(scorer, dtype=scorer_dtype, device=device)

    def progress(what):
        return (lambda done, total: on_progress(what, done, total)) if on_progress else None

    prompts = [(r.get("instruction"), r.get("input")) for r in records]
    scores = score_texts(model, [r["output"] for r in records], prompts=prompts, context=context,
                         max_length=max_length, batch_size=batch_size, on_progress=progress("outputs"))
    for it, sc in zip(m["items"], scores):
        it.update(gen_ppl=sc["gen_ppl"], nll_mean=sc["nll_mean"], scored_tokens=sc["scored_tokens"])
    m["aggregate"].update(aggregate(scores))
    settings = {
        "scorer": scorer or getattr(model, "name", None),
        "context": context,
        "max_length": max_length if max_length is not None else (min(model.max_length, 1024) if model.max_length else 1024),
        "batch_size": batch_size,
        "scorer_dtype": str(model.dtype).replace("torch.", ""),
    }
    if ref is not None:
        texts, ref_prompts = ref
        cache = _reference_cache_path(inlier_reference, texts, ref_prompts, settings)
        ref_scores = _read_cache(cache, len(texts))
        if ref_scores is None:
            ref_scores = score_texts(model, texts, prompts=ref_prompts, context=context, max_length=max_length,
                                     batch_size=batch_size, on_progress=progress("reference"))
            _write_cache(cache, ref_scores)
        settings["reference_cache"] = str(cache)
        inl = inlier_share(scores, ref_scores, scale=inlier_scale)
        for it, flag in zip(m["items"], inl.pop("inlier")):
            it["inlier"] = flag
        ref_agg = aggregate(ref_scores)
        m["aggregate"]["inlier_share"] = inl["inlier_share"]
        m["inlier"] = {**inl, "reference": str(inlier_reference), "reference_gen_ppl_mean": ref_agg["gen_ppl_mean"],
                       "reference_gen_ppl_median": ref_agg["gen_ppl_median"]}
        settings.update(inlier_reference=str(inlier_reference), inlier_scale=inlier_scale)
    m["settings"]["gen_ppl"] = settings


def _reference_cache_path(reference, texts, prompts, settings: dict) -> Path:
    """REF.genppl-<key>.json beside the reference file: the reference's gen-PPL scores, keyed by the texts, their
    prompts and the scoring settings (scorer, context, window, dtype), so that scoring many outputs files against
    one large reference (every row of a table) scores it once."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([texts, prompts, {k: settings[k] for k in
                                                    ("scorer", "context", "max_length", "scorer_dtype")}]).encode())
    ref = Path(reference)
    return ref.with_name(f"{ref.name}.genppl-{h.hexdigest()[:16]}.json")


def _read_cache(path: Path, n: int) -> list[dict] | None:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, list) and len(data) == n else None


def _write_cache(path: Path, scores: list[dict]) -> None:
    from difflm.io import atomic_write_json

    try:
        atomic_write_json(path, scores, indent=None)
    except OSError:  # a read-only folder: no cache, nothing else changes
        pass
