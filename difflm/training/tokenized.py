"""`difflm tokenize`: instruction data (or raw text) -> a tokenized folder that sft/r2ft read.

Each example becomes one row of exactly `max_length` token ids::

    [ prompt | response | EOS EOS ... EOS ]
      prompt_len  response_len   (padding: always EOS, as LLaDA's SFT does it)

plus `prompt_len`, `response_len`, `answer_len` (the response and the EOS tokens the EOS policy
trains: all -> max_length - prompt_len, first -> response_len + 1, none -> response_len) and
`has_eos` (False when the response was cut to fit). For `format: text` the documents are joined
(each followed by EOS) and cut into max_length chunks: prompt_len 0, answer_len max_length.

Prompts use `difflm.data.prompts` (the same templates generation uses): `alpaca` is the paper's
template, `chat` the tokenizer's chat template (the response then ends with the end-of-turn token,
e.g. LLaDA's <|eot_id|>, before the EOS padding). Empty answers are dropped; examples that do not
fit are dropped or truncated (`data.overflow`); counts and length percentiles are reported.

The output folder is a `datasets.DatasetDict` saved with `save_to_disk` (splits `train` and, with
`data.eval_size`, `eval`), plus `difflm_tokenize.json` (ids, settings, stats) and `recipe.yaml`.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from difflm.config import save_resolved, to_dict
from difflm.errors import ConfigError, first_line

from .losses import answer_length
from .recipes import TrainRecipe

__all__ = ["TokenizeResult", "load_tokenizer_and_ids", "read_rows", "tokenize", "load_tokenized", "META_FILE"]

META_FILE = "difflm_tokenize.json"
_LOCAL_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class TokenizeResult:
    path: Path
    stats: dict[str, Any]
    meta: dict[str, Any]


# -- tokenizer and ids without loading the weights --------------------------------------------------
def load_tokenizer_and_ids(model_cfg) -> tuple[Any, Any, str]:
    """(tokenizer, TokenIds, family) of the recipe's model, reading only config.json and the
    tokenizer files (no weights)."""
    from transformers import AutoTokenizer

    from difflm.models import detect_family, resolve_ids
    from difflm.models.loading import resolve_source

    if not model_cfg.name:
        raise ConfigError("no model given: set model.name (its tokenizer and ids are used)", key="model.name")
    source, config, _local = resolve_source(model_cfg.name)
    family = model_cfg.family if model_cfg.family != "auto" else detect_family(config, model_cfg.name)
    tok_source = model_cfg.tokenizer or source
    if family == "mdlm" and not model_cfg.tokenizer and not any(
        (Path(source) / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    ):
        tok_source = "gpt2"  # kuleshov-group/mdlm-owt ships no tokenizer: it is GPT-2's
    try:
        tok = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise ConfigError(f"cannot load the tokenizer of {tok_source!r}: {first}", key="model.tokenizer") from None
    vocab = config.get("embedding_size") or config.get("vocab_size")
    ids = resolve_ids(family, config, tok, vocab).validate(family, vocab, model_cfg.name)
    if ids.eos_id is None:
        raise ConfigError(f"{model_cfg.name} has no EOS id; it is needed as the answer end and padding", key="model")
    return tok, ids, family


# -- reading the raw rows ---------------------------------------------------------------------------
def _local_files(source: str) -> list[str] | None:
    """The local data files `source` names (a file, a folder or a glob), or None for a Hub name."""
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in _LOCAL_TYPES and p.is_file())
        if not files:
            raise ConfigError(f"{source} contains no .json/.jsonl/.parquet/.csv files", key="data.source")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(glob.glob(os.path.expanduser(source)))
        if not files:
            raise ConfigError(f"no files match {source}", key="data.source")
        return files
    if source.startswith((".", "/", "~")) or Path(source).suffix in _LOCAL_TYPES:
        raise ConfigError(f"data file {source} does not exist", key="data.source")
    return None


def read_rows(source: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """The raw rows of a local file/folder/glob or a Hub dataset, as dicts."""
    import datasets

    files = _local_files(source)
    try:
        if files is not None:
            kinds = {_LOCAL_TYPES.get(Path(f).suffix) for f in files}
            if None in kinds or len(kinds) != 1:
                raise ConfigError(
                    f"data files must all be one of .json/.jsonl, .parquet, .csv: {', '.join(files[:3])}",
                    key="data.source",
                )
            ds = datasets.load_dataset(kinds.pop(), data_files=files, split="train")
        else:
            ds = datasets.load_dataset(source, split=split)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 (datasets raises many kinds: offline, missing, bad JSON)
        first = first_line(err)
        hint = " (the Hub is offline: use a local file)" if files is None and os.environ.get("HF_DATASETS_OFFLINE") else ""
        raise ConfigError(f"cannot read data {source!r}: {first}{hint}", key="data.source") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


# -- tokenizing ---------------------------------------------------------------------------------------
def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {
        "min": int(arr.min()),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "max": int(arr.max()),
        "mean": float(arr.mean()),
    }


def _encode(tok, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(map(int, ids)) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def _chat_prompt_text(tok, messages: list[dict]) -> str:
    """A chat prompt as text: the tokenizer's chat template with the assistant header. Encoded with
    `_encode` (no added special tokens: the template writes its own BOS), these are the ids generation
    feeds the model for the same messages (`DiffusionLM.chat_ids`; tests/test_training_data.py checks it)."""
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _prompt_and_response_texts(rows: list[dict], data, tok) -> tuple[list[str | None], list[str | None]]:
    """(prompt text or None when unusable, response text or None when empty) for each row."""
    from difflm.data.prompts import format_prompt

    prompts: list[str | None] = []
    responses: list[str | None] = []
    chat_fn = functools.partial(_chat_prompt_text, tok)
    for i, row in enumerate(rows):
        if data.format == "chat" and data.messages_field:
            messages = row.get(data.messages_field)
            if not isinstance(messages, list) or not messages:
                raise ConfigError(f"row {i}: field {data.messages_field!r} is not a list of messages", key="data")
            last = messages[-1]
            if not isinstance(last, dict) or last.get("role") != "assistant":
                raise ConfigError(f"row {i}: the last message must be the assistant's answer", key="data")
            context = [dict(role=m["role"], content=m["content"]) for m in messages[:-1]]
            prompts.append(_chat_prompt_text(tok, context))
            responses.append(str(last.get("content") or ""))
            continue
        if data.instruction_field not in row:
            raise ConfigError(
                f"row {i} has no field {data.instruction_field!r} (fields: {', '.join(map(str, row))}); "
                "set data.instruction_field",
                key="data.instruction_field",
            )
        instruction = str(row.get(data.instruction_field) or "")
        inp = row.get(data.input_field)
        inp = str(inp) if inp is not None else None
        if data.format == "chat" and not getattr(tok, "chat_template", None):
            raise ConfigError("format chat needs a tokenizer with a chat template", key="data.format")
        prompts.append(format_prompt(instruction, inp, data.format, chat_fn=chat_fn))  # as generation
        out = row.get(data.output_field)
        responses.append(str(out) if out is not None else "")
    return prompts, responses


def _tokenize_instructions(rows: list[dict], data, tok, ids) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    length = data.max_length
    prompts, responses = _prompt_and_response_texts(rows, data, tok)
    if data.format == "chat":
        responses = [r.strip() if r is not None else r for r in responses]  # the chat template trims turns
    keep_rows = [i for i, r in enumerate(responses) if r and r.strip()]
    dropped_empty = len(rows) - len(keep_rows)
    prompt_ids = _encode(tok, [prompts[i] for i in keep_rows])
    response_ids = _encode(tok, [responses[i] for i in keep_rows])
    eot = ids.eot_id if data.format == "chat" and ids.eot_id is not None and ids.eot_id != ids.eos_id else None
    out_ids, out_p, out_r, out_a, out_e = [], [], [], [], []
    dropped_long = truncated_prompt = truncated_response = 0
    for p_ids, r_ids in zip(prompt_ids, response_ids):
        if eot is not None:
            r_ids = r_ids + [eot]
        if len(p_ids) + len(r_ids) + 1 > length:
            if data.overflow == "drop":
                dropped_long += 1
                continue
            if len(p_ids) > length - 2:  # keep the prompt's END (the "### Response:" header) and >= 1 answer token
                p_ids = p_ids[len(p_ids) - (length - 2):]
                truncated_prompt += 1
            room = length - len(p_ids)
            if len(r_ids) + 1 > room:
                r_ids = r_ids[:room]
                truncated_response += 1
        has_eos = len(p_ids) + len(r_ids) < length
        out_ids.append(p_ids + r_ids)
        out_p.append(len(p_ids))
        out_r.append(len(r_ids))
        out_e.append(has_eos)
        out_a.append(answer_length(len(p_ids), len(r_ids), length, data.eos_policy, has_eos))
    arr = np.full((len(out_ids), length), ids.eos_id, dtype=np.int32)
    for i, seq in enumerate(out_ids):
        arr[i, : len(seq)] = seq
    columns = {
        "input_ids": arr,
        "prompt_len": np.asarray(out_p, dtype=np.int32),
        "response_len": np.asarray(out_r, dtype=np.int32),
        "answer_len": np.asarray(out_a, dtype=np.int32),
        "has_eos": np.asarray(out_e, dtype=bool),
    }
    stats = {
        "rows": len(rows),
        "kept": len(out_ids),
        "dropped_empty": dropped_empty,
        "dropped_too_long": dropped_long,
        "truncated_prompt": truncated_prompt,
        "truncated_response": truncated_response,
        "prompt_tokens": _percentiles(out_p),
        "response_tokens": _percentiles(out_r),
        "answer_tokens": _percentiles(out_a),
        "total_tokens": _percentiles([p + r + (1 if e else 0) for p, r, e in zip(out_p, out_r, out_e)]),
    }
    return columns, stats


def _tokenize_text(rows: list[dict], data, tok, ids) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    length = data.max_length
    texts = []
    empty = 0
    for i, row in enumerate(rows):
        if data.text_field not in row:
            raise ConfigError(f"row {i} has no field {data.text_field!r}; set data.text_field", key="data.text_field")
        text = str(row.get(data.text_field) or "")
        if text.strip():
            texts.append(text)
        else:
            empty += 1
    stream: list[int] = []
    doc_lengths = []
    for seq in _encode(tok, texts):
        stream.extend(seq)
        stream.append(ids.eos_id)
        doc_lengths.append(len(seq) + 1)
    n = len(stream) // length
    arr = np.asarray(stream[: n * length], dtype=np.int32).reshape(n, length)
    columns = {
        "input_ids": arr,
        "prompt_len": np.zeros(n, dtype=np.int32),
        "response_len": np.full(n, length, dtype=np.int32),
        "answer_len": np.full(n, length, dtype=np.int32),
        "has_eos": np.ones(n, dtype=bool),
    }
    stats = {
        "rows": len(rows),
        "kept": n,
        "dropped_empty": empty,
        "documents": len(texts),
        "tokens": len(stream),
        "tokens_dropped_at_end": len(stream) - n * length,
        "document_tokens": _percentiles(doc_lengths),
    }
    return columns, stats


def tokenize(
    recipe: TrainRecipe,
    overwrite: bool = False,
    rows: list[dict] | None = None,
    status: Callable[[str], None] | None = None,
) -> TokenizeResult:
    """Tokenize `recipe.data` with the tokenizer of `recipe.model` into `recipe.data.path`.

    `rows` may be given directly (a list of dicts) instead of reading `data.source`. Refuses to
    replace an existing folder unless `overwrite`. Returns the path, the stats and the metadata.
    """
    data = recipe.data
    out = Path(data.path)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it", key="data.path")
    say = status or (lambda msg: None)
    tok, ids, family = load_tokenizer_and_ids(recipe.model)
    if rows is None:
        say(f"reading {data.source}")
        rows = read_rows(data.source, data.split, data.limit)
    elif data.limit is not None:
        rows = rows[: data.limit]
    if not rows:
        raise ConfigError(f"{data.source} has no rows", key="data.source")
    say(f"tokenizing {len(rows)} rows")
    if data.format == "text":
        columns, stats = _tokenize_text(rows, data, tok, ids)
    else:
        columns, stats = _tokenize_instructions(rows, data, tok, ids)
    if len(columns["input_ids"]) == 0:
        raise ConfigError(
            f"no example survived tokenization ({json.dumps({k: v for k, v in stats.items() if isinstance(v, int)})}); "
            "check the fields, data.max_length and data.overflow",
            key="data",
        )
    dsd = _split(columns, data)
    stats["train"] = len(dsd["train"])
    stats["eval"] = len(dsd["eval"]) if "eval" in dsd else 0
    meta = {
        "format": data.format,
        "max_length": data.max_length,
        "eos_policy": data.eos_policy,
        "overflow": data.overflow,
        "source": data.source,
        "model": recipe.model.name,
        "family": family,
        "tokenizer": recipe.model.tokenizer or recipe.model.name,
        "eos_id": ids.eos_id,
        "mask_id": ids.mask_id,
        "eot_id": ids.eot_id,
        "pad_id": ids.pad_id,
        "vocab_size": len(tok),
        "stats": stats,
    }
    say(f"writing {out}")
    from difflm.io import atomic_directory

    with atomic_directory(out) as tmp:  # the previous dataset stays until this one is complete
        dsd.save_to_disk(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_resolved({"model": to_dict(recipe.model), "data": to_dict(data)}, tmp / "recipe.yaml")
    return TokenizeResult(out, stats, meta)


def _split(columns: dict[str, np.ndarray], data):
    """The columns as a `DatasetDict`: `train`, and `eval` (`data.eval_size` rows, a seeded draw) when asked."""
    import datasets
    import pyarrow as pa

    kept = len(columns["input_ids"])
    flat = pa.array(columns["input_ids"].reshape(-1))
    table = pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(flat, data.max_length),
            **{k: pa.array(v) for k, v in columns.items() if k != "input_ids"},
        }
    )
    ds = datasets.Dataset(table)
    n_eval = int(data.eval_size) if data.eval_size >= 1 else int(round(data.eval_size * kept))
    if n_eval >= kept:
        raise ConfigError(f"eval_size {data.eval_size} leaves no training examples (kept {kept})", key="data.eval_size")
    if n_eval > 0:
        parts = ds.train_test_split(test_size=n_eval, seed=data.seed, shuffle=True)
        return datasets.DatasetDict({"train": parts["train"], "eval": parts["test"]})
    return datasets.DatasetDict({"train": ds})


def load_tokenized(path: str | os.PathLike):
    """(DatasetDict with torch format, metadata) of a folder written by `tokenize`."""
    import datasets

    path = Path(path)
    if not (path / META_FILE).is_file():
        raise ConfigError(
            f"no tokenized data at {path}: run `difflm tokenize` with this recipe first", key="data.path"
        )
    meta = json.loads((path / META_FILE).read_text())
    dsd = datasets.load_from_disk(str(path))
    if not isinstance(dsd, datasets.DatasetDict):
        dsd = datasets.DatasetDict({"train": dsd})
    dsd = dsd.with_format("torch")
    return dsd, meta
