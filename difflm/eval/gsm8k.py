"""GSM8K scoring: the last number of each output against the gold answer after ``####``.

    from difflm.eval.gsm8k import extract_answer, is_correct, score_records
    extract_answer("So she pays $1,234.00.")      # "1234.00"
    is_correct("The answer is 18.00", "... #### 18")   # True

Answer extraction (`extract_answer`), in order:

1. If the text has LaTeX ``\\boxed{...}`` with a number inside, the last number inside the LAST
   boxed expression is the answer (models trained on MATH-style data box their final answer and may
   write more numbers after it).
2. Otherwise the last number in the text.

What counts as a number: digits with optional ``,`` thousands groups (``1,234,567``; ``12,34`` is two
numbers) and an optional decimal part (``18.00``, ``.5``); an optional sign (``-`` or the Unicode
minus) and an optional currency sign (``$``, ``€``, ``£``, ``¥``) in front, in either order
(``-$5``, ``$-5``). A trailing ``.`` (end of sentence) is not part of the number. Decisions for
the ambiguous cases, chosen so that a number written *as an answer* is found and a label is not:

- A digit run glued to a letter *before* it is part of a word and skipped: ``Q3``, ``mp3``, ``H2O``,
  ``v2`` are not answers. Letters *after* the digits are units or ordinals and the number counts:
  ``5km``, ``10am``, ``3rd`` give 5, 10, 3.
- ``-`` is a sign only at the start of the text or after a space or an opening bracket / ``=`` /
  ``:`` / ``$``; after a digit it is a binary minus (``5-3`` gives 3, not -3), after a letter it is a
  hyphen inside a word (``COVID-19`` is skipped as a whole).
- A number directly after another number's ``.`` (``1.2.3``) is a version string: only ``1.2`` counts.
- Percent signs and units are ignored (``20%`` gives 20). Fractions are not evaluated (``3/4`` gives 4).

`extract_answer` returns the number as written, with ``$``, ``,`` and a leading ``+`` removed and the
sign and decimals kept (``"-5"``, ``"18.00"``, ``"0.5"`` for ``.5``); `is_correct` compares it with
the gold number as exact decimals, so ``18.00 == 18`` and ``1,000 == 1000``. The reference
implementation's regex mis-scores ``$18``, ``18.00`` and ``-5``.

Accuracy is reported with its standard error sqrt(p (1 - p) / n) (binomial, n items).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from difflm.errors import ConfigError

__all__ = [
    "accuracy_stderr",
    "extract_answer",
    "gold_answer",
    "is_correct",
    "score_records",
    "to_decimal",
]

_NUMBER = re.compile(
    r"(?P<sign>[-+\u2212]?)(?P<cur>[$€£¥]?)(?P<sign2>[-+\u2212]?)"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
)
_SIGN_OK_BEFORE = set(" \t\n\r([{=:$<>*/~\"'") | {""}
_BOXED = "\\boxed"


def _boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` (balanced braces), in order."""
    out = []
    start = 0
    while True:
        i = text.find(_BOXED, start)
        if i < 0:
            return out
        j = i + len(_BOXED)
        while j < len(text) and text[j] == " ":
            j += 1
        if j >= len(text) or text[j] != "{":
            start = j
            continue
        depth = 0
        for k in range(j, len(text)):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
                if depth == 0:
                    out.append(text[j + 1 : k])
                    start = k + 1
                    break
        else:  # unbalanced: take the rest
            out.append(text[j + 1 :])
            return out


def _numbers(text: str) -> list[str]:
    """Every answer-like number of `text` (see the module doc), normalised, in order."""
    found = []
    for m in _NUMBER.finditer(text):
        before = text[m.start() - 1] if m.start() > 0 else ""
        first_sign, cur, second_sign = m.group("sign"), m.group("cur"), m.group("sign2")
        sign = first_sign or second_sign
        if first_sign and before not in _SIGN_OK_BEFORE:
            if before.isalpha() or before == "_":
                continue  # a hyphen inside a word: COVID-19
            sign = second_sign  # a binary operator after a digit, ')' or '%': 5-3 -> 3
        if not first_sign and not cur and (before.isalnum() or before == "_"):
            continue  # glued to a word (Q3, mp3) or to a previous number (the .3 of 1.2.3)
        num = m.group("num").replace(",", "")
        if num.startswith("."):
            num = "0" + num
        found.append(("-" if sign in ("-", "\u2212") else "") + num)
    return found


def extract_answer(text: str | None) -> str | None:
    """The answer number of a model output (see the module doc), or None when there is none.

    >>> extract_answer("She pays $1,234.")
    '1234'
    >>> extract_answer("The answer is \\\\boxed{-5} (not 7)")
    '-5'
    """
    if not text:
        return None
    for content in reversed(_boxed_contents(text)):
        nums = _numbers(content)
        if nums:
            return nums[-1]
    nums = _numbers(text)
    return nums[-1] if nums else None


def to_decimal(value: str | None) -> Decimal | None:
    """A number string -> Decimal (None when it does not parse)."""
    if value is None:
        return None
    try:
        d = Decimal(value.replace(",", "").replace("$", "").strip())
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def gold_answer(answer_text: str | None) -> str | None:
    """The gold number of a GSM8K ``answer`` field: the text after the last ``####`` (``,`` and ``$``
    stripped); a field without ``####`` is read with `extract_answer`."""
    if answer_text is None:
        return None
    answer_text = str(answer_text)
    if "####" in answer_text:
        tail = answer_text.rsplit("####", 1)[1].strip()
        nums = _numbers(tail)
        if nums:
            return nums[0]
        return tail.replace(",", "").replace("$", "").strip() or None
    return extract_answer(answer_text)


def is_correct(output_text: str | None, gold_answer_text: str | None) -> bool:
    """Whether the output's answer (`extract_answer`) equals the gold number (`gold_answer`) as an exact
    decimal. False when either has no number."""
    pred = to_decimal(extract_answer(output_text))
    gold = to_decimal(gold_answer(gold_answer_text))
    return pred is not None and gold is not None and pred == gold


def accuracy_stderr(n_correct: int, n: int) -> float:
    """Standard error of an accuracy p = n_correct / n: sqrt(p (1 - p) / n); 0 for n = 0."""
    if n <= 0:
        return 0.0
    p = n_correct / n
    return math.sqrt(p * (1.0 - p) / n)


def _gold_from_data(data_path: str | Path | None) -> dict[str, str]:
    from difflm.data.evalsets import load_eval_set

    return {str(it["id"]): it["answer"] for it in load_eval_set("gsm8k", data_path=data_path)}


def score_records(records: list[dict], gold: dict[str, str] | None = None) -> dict[str, Any]:
    """Score generate records ({id, output, answer?}) against gold answers.

    `gold` maps id -> gold answer text; without it each record's carried ``answer`` field is used (what
    `difflm generate --eval-set gsm8k` writes). Returns {accuracy, stderr, n, correct, no_answer, items},
    items = [{id, prediction, gold, correct}] in record order. Raises ConfigError when a record has no
    gold answer.
    """
    items = []
    for r in records:
        rid = str(r.get("id"))
        gold_text = gold.get(rid) if gold is not None else r.get("answer")
        if gold_text is None:
            where = "the gold data" if gold is not None else "the record (no 'answer' field)"
            raise ConfigError(
                f"no gold answer for item {rid!r} in {where}; pass --data-path with the GSM8K test set", key="gold"
            )
        pred = extract_answer(r.get("output", ""))
        items.append({
            "id": rid,
            "prediction": pred,
            "gold": gold_answer(gold_text),
            "correct": is_correct(r.get("output", ""), gold_text),
        })
    n = len(items)
    n_correct = sum(it["correct"] for it in items)
    return {
        "accuracy": n_correct / n if n else 0.0,
        "stderr": accuracy_stderr(n_correct, n),
        "n": n,
        "correct": n_correct,
        "no_answer": sum(it["prediction"] is None for it in items),
        "items": items,
    }


def evaluate_file(
    outputs: str | Path,
    data_path: str | Path | None = None,
    use_hub: bool = False,
    results: str | Path | None = None,
) -> dict[str, Any]:
    """Score a `difflm generate` output file and write the results JSON (atomically).

    Gold answers: from `data_path` (a local copy of the GSM8K test set) when given, else from the Hub
    when `use_hub`, else from the records' own ``answer`` fields. Results go to `results` (default
    ``OUT.json.gsm8k.json``): {task, outputs, manifest, accuracy, stderr, n, correct, no_answer, settings
    (the manifest's decode settings, model, adapter, prompt format), items}.
    """
    from difflm.eval.runs import load_run, results_path

    run = load_run(outputs)
    gold = _gold_from_data(data_path) if (data_path is not None or use_hub) else None
    scored = score_records(run.records, gold)
    out = {
        "task": "gsm8k",
        "outputs": str(run.output_path),
        "manifest": str(run.manifest_path) if run.manifest_path else None,
        "outputs_sha256": run.digest,
        "gold_source": str(data_path) if data_path else ("openai/gsm8k" if use_hub else "records"),
        **{k: scored[k] for k in ("accuracy", "stderr", "n", "correct", "no_answer")},
        "settings": run.settings(),
        "items": scored["items"],
    }
    from difflm.io import atomic_write_json

    path = Path(results) if results else results_path(run.output_path, "gsm8k")
    atomic_write_json(path, out)
    out["results_path"] = str(path)
    return out
