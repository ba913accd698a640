"""Evaluation instruction sets and user instruction files.

`load_eval_set(name)` returns a list of items, each a dict with

- ``id``: a stable string: the dataset's own id where it has one (arena_hard's ``question_id``),
  else ``f"{name}-{row}"`` with ``row`` the 0-based row of the source file (so ids survive a
  ``limit`` or a change in wiki's paragraph filter);
- ``instruction``: the prompt text;
- ``dataset``: the eval set's name, except for alpaca_eval, which keeps its own ``dataset`` field
  (``helpful_base``, ``koala``, ...) because alpaca_eval's output JSON reports it;
- ``eval_set``: the eval set's name (always);
- carried fields: alpaca_eval ``input`` (if any) and ``reference`` (the hub's reference output);
  gsm8k ``answer`` (the gold solution ending in ``#### N``); arena_hard ``question_id``,
  ``category`` and, where given, ``cluster`` (v0.1) / ``subcategory`` (v2.0); mt_bench ``question_id``, ``category``, ``turn`` (1), ``turns`` (every turn's question, for
  the second-turn run) and ``reference_answers`` (FastChat's per-turn reference answers, where given);
  wiki ``category`` and ``entity``; wikitext ``reference`` (the rest of the paragraph).

Sources (`EVAL_SETS`). By default from the Hugging Face Hub through `datasets.load_dataset`;
with ``data_path`` from a local JSON list, JSONL or parquet file with the *same* schema as the hub
files, without the Hub. ``wiki`` needs neither: its 504 items ship inside the package.

=============  ==========================================================  ====================
name           Hub source                                                   fields read
=============  ==========================================================  ====================
alpaca_eval    ``tatsu-lab/alpaca_eval``, file ``alpaca_eval.json`` (805)   instruction, dataset,
                                                                            output, [input]
gsm8k          ``openai/gsm8k`` config ``main`` split ``test`` (1319)       question, answer
mt_bench       ``HuggingFaceH4/mt_bench_prompts`` split ``train`` (80), or   prompt_id, category,
               FastChat's ``question.jsonl``                                prompt | question_id,
                                                                            category, turns
wiki           shipped: ``difflm/data/paper_wiki_entities.json`` (504)      id, category, entity
wikitext       ``Salesforce/wikitext`` ``wikitext-103-raw-v1`` ``test``     text
arena_hard     ``lmarena-ai/arena-hard-auto``, file                         question_id | uid,
               ``data/arena-hard-v0.1/question.jsonl`` (500)                category,
                                                                            turns[0].content |
                                                                            prompt
=============  ==========================================================  ====================

alpaca_eval's hub repo is a loading-script dataset, which `datasets` >= 4 no longer runs, so its
JSON file is read with the ``json`` builder. arena_hard accepts both of the repo's schemas:
v0.1 (``question_id``, ``turns: [{"content"}]``) and v2.0 (``uid``, ``prompt``).

mt_bench: both schemas are read, FastChat's (``question_id``, ``category``, ``turns``, optional
``reference``) and the Hub file's (``prompt_id``, ``category``, ``prompt``: the turns, ``reference``).
The item is the first turn; `second_turn_item` builds the second from it and the model's first answer.

wiki: the paper's Wiki set (Seo et al. 2025): 504 entities, 63 in each of 8 Mintaka categories
(history, music, sports, movies, books, geography, politics, videogames), ids the Mintaka question
ids, prompt exactly ``Please give me an explanation about ``{entity}''.`` (LaTeX-style quotes, as
the authors' file has them). The entities are facts from Mintaka (Amazon Science, CC BY 4.0).
A WikiText file given as wiki's ``data_path`` is refused with a message naming ``wikitext``.

wikitext rule (open-ended continuation; this set was called ``wiki`` before): each row of wikitext is a line; lines are stripped, headings
(`` = Title = ``) and lines of at most `WIKI_MIN_CHARS` (200) characters are skipped; wikitext's
``@-@``, ``@,@``, ``@.@`` joins are undone; the prompt is the first `WIKI_PROMPT_WORDS` (32)
whitespace-separated words and ``reference`` is the rest of the paragraph.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from difflm.errors import ConfigError

__all__ = [
    "EVAL_SETS", "WIKI_MIN_CHARS", "WIKI_PROMPT", "WIKI_PROMPT_WORDS", "load_eval_set", "read_inputs",
    "second_turn_item", "wiki_prompt",
]

EVAL_SETS = ("alpaca_eval", "gsm8k", "mt_bench", "wiki", "wikitext", "arena_hard")
#: the paper's Wiki prompt, character for character
WIKI_PROMPT = "Please give me an explanation about ``{entity}''."
WIKI_ENTITIES_FILE = Path(__file__).with_name("paper_wiki_entities.json")
WIKI_MIN_CHARS = 200
WIKI_PROMPT_WORDS = 32

# name -> (repo shown in errors, load_dataset args, kwargs)
_HUB = {
    "alpaca_eval": (
        "tatsu-lab/alpaca_eval",
        ("json",),
        {"data_files": "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json", "split": "train"},
    ),
    "gsm8k": ("openai/gsm8k", ("openai/gsm8k", "main"), {"split": "test"}),
    "mt_bench": ("HuggingFaceH4/mt_bench_prompts", ("HuggingFaceH4/mt_bench_prompts",), {"split": "train"}),
    "wikitext": ("Salesforce/wikitext", ("Salesforce/wikitext", "wikitext-103-raw-v1"), {"split": "test"}),
    "arena_hard": (
        "lmarena-ai/arena-hard-auto",
        ("json",),
        {
            "data_files": "hf://datasets/lmarena-ai/arena-hard-auto/data/arena-hard-v0.1/question.jsonl",
            "split": "train",
        },
    ),
}


# ----------------------------------------------------------------------------- file reading


def _read_records(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, item) pairs from a JSON list, JSONL or parquet file.

    A file whose first non-blank character is ``[`` is a JSON list (line numbers are then item
    numbers); otherwise one JSON value per non-blank line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file", key="data_path")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # noqa: BLE001 - any reader error is a bad file
            raise ConfigError(f"{p}: not a readable parquet file ({e})") from e
        return list(enumerate(rows, 1))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e})") from e
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from e
        return list(enumerate(items, 1))
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{lineno}: invalid JSON line ({e.msg})") from e
    return out


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"must be a whole number >= 1, got {limit!r}", key="limit")


def _check_unique(items: list[dict], where: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item["id"] in seen:
            raise ConfigError(f"{where}: duplicate id {item['id']!r}; ids must be unique")
        seen.add(item["id"])


def read_inputs(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Instructions for ``difflm generate --input FILE``.

    FILE is a JSON list or JSONL of objects, each with a string ``instruction``; other fields are
    carried through. ``id`` is kept (as a string) when present, else ``f"{stem}-{i}"`` with ``i``
    the 0-based item index and ``stem`` the file name without extension. Errors (ConfigError): a
    malformed line (``file:line``), an item that is not an object or lacks ``instruction``, a
    duplicate id, an empty file, ``limit`` < 1."""
    _check_limit(limit)
    p = Path(path)
    items = []
    for i, (lineno, rec) in enumerate(_read_records(p)):
        where = f"{p}:{lineno}: item {i}"
        if not isinstance(rec, dict):
            raise ConfigError(f"{where} is a {type(rec).__name__}, expected an object with 'instruction'")
        if not isinstance(rec.get("instruction"), str) or not rec["instruction"].strip():
            raise ConfigError(f"{where} has no 'instruction' text (keys: {', '.join(rec) or 'none'})")
        item = dict(rec)
        item["id"] = str(rec["id"]) if rec.get("id") is not None else f"{p.stem}-{i}"
        items.append(item)
    if not items:
        raise ConfigError(f"{p}: no instructions in the file")
    _check_unique(items, str(p))
    return items[:limit] if limit else items


# ----------------------------------------------------------------------------- eval sets


def _load_hub(name: str) -> list[dict]:
    repo, args, kwargs = _HUB[name]
    try:
        import datasets

        ds = datasets.load_dataset(*args, **kwargs)
        return [dict(r) for r in ds]
    except Exception as e:  # noqa: BLE001 - offline, missing, gated, ...: all need a local copy
        raise ConfigError(
            f"eval set {name}: could not load {repo} from the Hub (offline?); "
            f"pass --data-path with a local copy ({type(e).__name__})"
        ) from e


def wiki_prompt(entity: str) -> str:
    """The paper's Wiki prompt for one entity."""
    return WIKI_PROMPT.format(entity=entity)


def _mt_bench_turns(rec: dict) -> list[str]:
    turns = rec["turns"] if "turns" in rec else rec["prompt"]
    if isinstance(turns, str) or not turns or not all(isinstance(t, str) for t in turns):
        raise TypeError("turns")
    return list(turns)


def second_turn_item(first: dict, first_answer: str) -> dict:
    """The second MT-Bench turn of `first` (an mt_bench item or its record): ``instruction`` is the second
    question, ``messages`` the conversation so far (the first question, the model's own first answer, the
    second question), ``turn`` 2, id ``<question_id>-turn2``."""
    turns = first.get("turns") or []
    if len(turns) < 2:
        raise ConfigError(f"item {first.get('id')}: no second turn (turns: {len(turns)})", key="data.turns")
    item = {k: v for k, v in first.items() if k in _ITEM_KEYS}
    item.update(id=f"{first.get('question_id', first['id'])}-turn2", instruction=turns[1], turn=2,
                messages=[{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first_answer},
                          {"role": "user", "content": turns[1]}])
    return item


# the item fields a second-turn item keeps from its first turn
_ITEM_KEYS = ("dataset", "eval_set", "question_id", "category", "turns", "reference_answers")


def _wiki_clean(text: str) -> str:
    return re.sub(r" @([-,.])@ ", r"\1", text.strip())


def _convert(name: str, row: int, rec: dict) -> dict | None:
    """One source row -> one item (None: skipped)."""
    default_id = f"{name}-{row}"
    if name == "alpaca_eval":
        item = {"id": str(rec.get("id", default_id)), "instruction": rec["instruction"],
                "dataset": rec.get("dataset") or name}
        if rec.get("input"):
            item["input"] = rec["input"]
        if rec.get("output") is not None:
            item["reference"] = rec["output"]
    elif name == "gsm8k":
        item = {"id": str(rec.get("id", default_id)), "instruction": rec["question"],
                "dataset": name, "answer": rec["answer"]}
    elif name == "mt_bench":
        qid = rec.get("question_id", rec.get("prompt_id"))
        if qid is None:
            raise KeyError("question_id")
        turns = _mt_bench_turns(rec)
        item = {"id": str(qid), "instruction": turns[0], "dataset": name, "question_id": str(qid),
                "category": rec["category"], "turn": 1, "turns": turns}
        if rec.get("reference"):
            item["reference_answers"] = list(rec["reference"])
    elif name == "wiki":
        item = {"id": str(rec["id"]), "instruction": wiki_prompt(rec["entity"]), "dataset": name,
                "category": rec["category"], "entity": rec["entity"]}
    elif name == "wikitext":
        text = _wiki_clean(rec["text"])
        if len(text) <= WIKI_MIN_CHARS or text.startswith("="):
            return None
        words = text.split()
        item = {"id": default_id, "instruction": " ".join(words[:WIKI_PROMPT_WORDS]), "dataset": name,
                "reference": " ".join(words[WIKI_PROMPT_WORDS:])}
    else:  # arena_hard: v0.1 {question_id, category, turns} or v2.0 {uid, category, prompt}
        qid = rec.get("question_id") or rec.get("uid") or default_id
        turns = rec.get("turns")
        prompt = turns[0]["content"] if turns else rec["prompt"]
        item = {"id": str(qid), "instruction": prompt, "dataset": name,
                "question_id": str(qid), "category": rec.get("category")}
        for extra in ("cluster", "subcategory"):  # v0.1's category is one value; its cluster says more
            if rec.get(extra) is not None:
                item[extra] = rec[extra]
    item["eval_set"] = name
    return item


def load_eval_set(name: str, data_path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """The items of eval set `name` (see the module doc), the first `limit` of them if given.

    Without `data_path` the set comes from the Hub; when that fails (e.g. offline) a ConfigError
    says to pass ``--data-path``."""
    if name not in EVAL_SETS:
        raise ConfigError(f"unknown eval set {name!r}; allowed: {', '.join(EVAL_SETS)}", key="eval_set")
    _check_limit(limit)
    where = str(data_path) if data_path is not None else f"eval set {name}"
    if data_path is not None:
        rows = [rec for _, rec in _read_records(data_path)]
    elif name == "wiki":
        rows = json.loads(WIKI_ENTITIES_FILE.read_text(encoding="utf-8"))
    else:
        rows = _load_hub(name)
    items = []
    for row, rec in enumerate(rows):
        try:
            item = _convert(name, row, rec)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            if name == "wiki" and isinstance(rec, dict) and "text" in rec:
                raise ConfigError(f"{where}: a WikiText file; the WikiText task is now --eval-set wikitext "
                                  "(wiki is the paper's 504 Mintaka entities)", key="eval_set") from e
            raise ConfigError(
                f"{where}: row {row} does not match the {name} schema (missing or bad {e}); "
                f"see difflm.data.evalsets for the fields"
            ) from e
        if item is not None:
            items.append(item)
            if limit and len(items) >= limit:
                break
    if not items:
        raise ConfigError(f"{where}: no {name} items found")
    _check_unique(items, where)
    return items
