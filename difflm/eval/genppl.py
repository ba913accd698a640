r"""Generative perplexity (gen-PPL) of outputs under an autoregressive scorer, and the inlier share.

The paper (Seo et al. 2025, Figs. 4 and 8, Table 7) and MDLM score generated text with an AR causal LM
(GPT-2 large); difflm takes any causal LM `load_model` can load (family "ar"), e.g. the packaged
``smollm2-135m-instruct`` offline.

Definition (one output). o_1 .. o_N = the scorer tokenizer's ids of the output text (no special tokens
added; the text is the record's ``output``, already cut at the first EOS/EOT by `difflm generate`).
c = the context ids, by `context`:

- ``bos`` (default, as MDLM's eval): c = [b], b = the scorer's BOS id (its EOS id when it has no BOS,
  as GPT-2's ``<|endoftext|>``);
- ``prompt``: c = [b] + ids(instruction [+ "\n\n" + input] + "\n\n") — the raw prompt text;
- ``chat``: c = the scorer's chat template with the instruction as the user turn and the assistant
  header appended (`DiffusionLM.chat_ids`; the template writes its own BOS).

Only output tokens are scored: NLL = -sum_{i=1..N} log p(o_i | c, o_<i), gen-PPL = exp(NLL / N)
(``nll_mean`` = NLL / N = log gen-PPL). N = 0 (an empty output): no gen-PPL (None).

Long texts: a window holds at most W = `max_length` tokens. The first window is c + o_1 .. o_{W-|c|};
each further window is [b] + the next W - 1 output tokens (scored conditioned on BOS and its own
window only, as MDLM splits samples into independent chunks of the scorer's context). Every output
token is scored exactly once. A context longer than W // 2 keeps its first token and its last
W // 2 - 1 tokens. log-softmax in float32 (float64 when the scorer is float64).

Batching: windows are sorted by length and right-padded into batches with an attention mask; causal
attention and positions 0..n-1 make each row's log-probabilities those of the row alone (up to float
rounding across kernel paths; tested).

Aggregates over the outputs with N >= 1: ``gen_ppl_mean``, ``gen_ppl_median``, and ``gen_ppl_pooled``
= exp(sum NLL / sum N) (MDLM's metric: all tokens pooled).

Inlier share (Table 7): the same scoring of reference texts (e.g. the SFT training responses) gives
values r_1 .. r_M on the chosen `scale` (``ppl``: gen-PPL; ``log``: log gen-PPL = mean NLL), with mean
mu and population standard deviation sigma (ddof 0). An output is an inlier when its value v satisfies
mu - k sigma <= v <= mu + k sigma (k = 2); the share = inliers / all outputs (an empty output has no
gen-PPL and is never an inlier).

    from difflm.eval.genppl import score_texts
    res = score_texts(scorer, ["The cat sat on the mat."])   # scorer: a loaded DiffusionLM of family "ar"
    res[0]["gen_ppl"], res[0]["scored_tokens"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from difflm.errors import ConfigError

__all__ = [
    "CONTEXTS",
    "SCALES",
    "aggregate",
    "inlier_share",
    "load_scorer",
    "read_reference_texts",
    "score_texts",
]

CONTEXTS = ("bos", "prompt", "chat")
SCALES = ("ppl", "log")
#: the text fields read from a reference record, in this order
REFERENCE_FIELDS = ("output", "text", "response", "completion")


@dataclass
class _Window:
    item: int
    ids: list[int]
    start: int  #: the first scored position in `ids` (the tokens before it are context)


def load_scorer(name: str, *, dtype: str = "auto", device: str | None = None):
    """The scorer as a `DiffusionLM` of family "ar" (`difflm.models.load_model`); ConfigError otherwise."""
    from difflm.models import load_model

    model = load_model(name, family="auto", dtype=dtype, device=device)
    if model.family != "ar":
        raise ConfigError(
            f"scorer {name} is a {model.family} model; gen-PPL needs an autoregressive causal LM (family ar, "
            "e.g. smollm2-135m-instruct or gpt2-large)", key="scorer")
    if model.tokenizer is None:
        raise ConfigError(f"scorer {name} has no tokenizer", key="scorer")
    return model


def _bos(scorer) -> int:
    ids = scorer.ids
    b = ids.bos_id if ids.bos_id is not None else ids.eos_id
    if b is None:
        raise ConfigError(f"scorer {scorer.name}: no BOS or EOS id to condition on", key="scorer")
    return int(b)


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"]) if text else []


def _prompt_text(instruction: str, input_text: str | None) -> str:
    return instruction + (f"\n\n{input_text}" if input_text else "")


def _context_ids(scorer, context: str, instruction: str | None, input_text: str | None, limit: int) -> list[int]:
    b = _bos(scorer)
    if context == "bos":
        return [b]
    if instruction is None:
        raise ConfigError(f"context {context} needs the prompt of every text (an 'instruction' field)", key="context")
    if context == "prompt":
        ctx = [b] + _encode(scorer.tokenizer, _prompt_text(instruction, input_text) + "\n\n")
    elif context == "chat":
        ctx = list(scorer.chat_ids(_prompt_text(instruction, input_text)))
    else:
        raise ConfigError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}", key="context")
    if len(ctx) > limit:  # keep the first token (BOS) and the end of the prompt
        ctx = ctx[:1] + ctx[len(ctx) - (limit - 1):]
    return ctx


def _windows(item: int, ctx: list[int], out: list[int], max_length: int, bos: int) -> list[_Window]:
    wins: list[_Window] = []
    if not out:
        return wins
    first = max_length - len(ctx)
    wins.append(_Window(item, ctx + out[:first], len(ctx)))
    for s in range(first, len(out), max_length - 1):
        wins.append(_Window(item, [bos] + out[s : s + max_length - 1], 1))
    return wins


def window_count(n_tokens: int, context_len: int, max_length: int) -> int:
    """How many windows an output of `n_tokens` takes (0 for an empty one)."""
    if n_tokens <= 0:
        return 0
    rest = n_tokens - (max_length - context_len)
    return 1 + max(0, -(-rest // (max_length - 1)))


def _resolve_max_length(scorer, max_length: int | None) -> int:
    ctx = scorer.max_length
    if max_length is None:
        return min(ctx, 1024) if ctx else 1024
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise ConfigError(f"must be a whole number >= 4, got {max_length!r}", key="max_length")
    if ctx and max_length > ctx:
        raise ConfigError(f"must be <= the scorer's context length {ctx}, got {max_length}", key="max_length")
    return max_length


def score_texts(
    scorer,
    texts: Sequence[str],
    *,
    prompts: Sequence[tuple[str | None, str | None]] | None = None,
    context: str = "bos",
    max_length: int | None = None,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Per text: {"gen_ppl", "nll_mean", "nll_sum", "scored_tokens", "windows"} (gen_ppl and nll_mean None
    for an empty text). `prompts` gives (instruction, input) per text for the ``prompt``/``chat`` contexts.
    `on_progress(done_windows, total_windows)` after every batch."""
    import torch

    if context not in CONTEXTS:
        raise ConfigError(f"must be one of {', '.join(CONTEXTS)}, got {context!r}", key="context")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"must be a whole number >= 1, got {batch_size!r}", key="batch_size")
    if prompts is not None and len(prompts) != len(texts):
        raise ValueError("prompts and texts differ in length")
    W = _resolve_max_length(scorer, max_length)
    bos = _bos(scorer)
    tok = scorer.tokenizer
    windows: list[_Window] = []
    for i, text in enumerate(texts):
        out = _encode(tok, text) if text.strip() else []
        instr, inp = prompts[i] if prompts is not None else (None, None)
        ctx = _context_ids(scorer, context, instr, inp, W // 2) if out else []
        windows.extend(_windows(i, ctx, out, W, bos))
    nll = [0.0] * len(texts)
    count = [0] * len(texts)
    nwin = [0] * len(texts)
    order = sorted(range(len(windows)), key=lambda j: -len(windows[j].ids))
    pad = scorer.ids.pad_or_eos if scorer.ids.pad_or_eos is not None else bos
    float64 = scorer.dtype == torch.float64
    done = 0
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            batch = [windows[j] for j in order[s : s + batch_size]]
            L = max(len(w.ids) for w in batch)
            ids = torch.tensor([w.ids + [pad] * (L - len(w.ids)) for w in batch])
            am = torch.tensor([[1] * len(w.ids) + [0] * (L - len(w.ids)) for w in batch])
            logits = scorer(ids, attention_mask=am)
            logp = torch.log_softmax(logits[:, :-1].to(torch.float64 if float64 else torch.float32), dim=-1)
            tgt = ids[:, 1:].to(logp.device)
            tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double().cpu()
            for r, w in enumerate(batch):
                # position j of the window (j >= start) is predicted by the logits at j - 1
                part = tok_lp[r, w.start - 1 : len(w.ids) - 1]
                nll[w.item] -= float(part.sum())
                count[w.item] += len(w.ids) - w.start
                nwin[w.item] += 1
            done += len(batch)
            if on_progress:
                on_progress(done, len(order))
    res = []
    for i in range(len(texts)):
        m = nll[i] / count[i] if count[i] else None
        res.append({
            "gen_ppl": math.exp(m) if m is not None else None,
            "nll_mean": m,
            "nll_sum": nll[i],
            "scored_tokens": count[i],
            "windows": nwin[i],
        })
    return res


def _median(v: list[float]) -> float | None:
    if not v:
        return None
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def aggregate(scores: Sequence[dict]) -> dict[str, Any]:
    """Mean, median and pooled gen-PPL over the scored texts (see the module doc)."""
    vals = [s["gen_ppl"] for s in scores if s["gen_ppl"] is not None]
    tokens = sum(s["scored_tokens"] for s in scores)
    total = sum(s["nll_sum"] for s in scores)
    return {
        "gen_ppl_mean": sum(vals) / len(vals) if vals else None,
        "gen_ppl_median": _median(vals),
        "gen_ppl_pooled": math.exp(total / tokens) if tokens else None,
        "gen_ppl_scored": len(vals),
        "gen_ppl_unscored": len(scores) - len(vals),
        "gen_ppl_tokens": tokens,
    }


def _value(s: dict, scale: str) -> float | None:
    return s["gen_ppl"] if scale == "ppl" else s["nll_mean"]


def inlier_share(outputs: Sequence[dict], reference: Sequence[dict], *, scale: str = "ppl", k: float = 2.0) -> dict:
    """The share of `outputs` whose value on `scale` lies in [mu - k sigma, mu + k sigma] of `reference`'s
    (population std); per-output flags in "inlier". Raises ConfigError when fewer than 2 reference texts
    have a gen-PPL."""
    if scale not in SCALES:
        raise ConfigError(f"must be one of {', '.join(SCALES)}, got {scale!r}", key="inlier_scale")
    ref = [_value(s, scale) for s in reference if s["gen_ppl"] is not None]
    if len(ref) < 2:
        raise ConfigError(f"the inlier reference has {len(ref)} non-empty texts; need at least 2", key="inlier_reference")
    mu = sum(ref) / len(ref)
    sigma = math.sqrt(sum((r - mu) ** 2 for r in ref) / len(ref))
    lo, hi = mu - k * sigma, mu + k * sigma
    flags = []
    for s in outputs:
        v = _value(s, scale)
        flags.append(v is not None and lo <= v <= hi)
    return {
        "inlier_share": sum(flags) / len(flags) if flags else None,
        "inliers": sum(flags),
        "outputs": len(flags),
        "scale": scale,
        "k": k,
        "reference_mean": mu,
        "reference_std": sigma,
        "low": lo,
        "high": hi,
        "reference_texts": len(ref),
        "inlier": flags,
    }


def read_reference_texts(path: str | Path, limit: int | None = None) -> tuple[list[str], list[tuple[str | None, str | None]]]:
    """(texts, (instruction, input) per text) of a reference file: a JSON list or JSONL (or parquet) of
    strings, or of objects with a text field (the first of output, text, response, completion: alpaca /
    alpaca_eval records, `difflm generate` outputs, plain text records). Empty texts are kept (they are
    not scored). ConfigError for anything else."""
    from difflm.data.evalsets import _read_records

    p = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"must be a whole number >= 1, got {limit!r}", key="reference_limit")
    texts: list[str] = []
    prompts: list[tuple[str | None, str | None]] = []
    for i, (lineno, rec) in enumerate(_read_records(p)):
        if isinstance(rec, str):
            texts.append(rec)
            prompts.append((None, None))
        elif isinstance(rec, dict):
            field = next((f for f in REFERENCE_FIELDS if isinstance(rec.get(f), str)), None)
            if field is None:
                raise ConfigError(
                    f"{p}:{lineno}: item {i} has no text field ({', '.join(REFERENCE_FIELDS)}); "
                    f"keys: {', '.join(map(str, rec)) or 'none'}", key="inlier_reference")
            texts.append(rec[field])
            instr = rec.get("instruction")
            inp = rec.get("input")
            prompts.append((instr if isinstance(instr, str) else None, inp if isinstance(inp, str) else None))
        else:
            raise ConfigError(
                f"{p}:{lineno}: item {i} is a {type(rec).__name__}; expected a string or an object with "
                f"{'/'.join(REFERENCE_FIELDS)}", key="inlier_reference")
        if limit and len(texts) >= limit:
            break
    if not texts:
        raise ConfigError(f"{p}: no texts in the file", key="inlier_reference")
    return texts, prompts
