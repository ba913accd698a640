"""`difflm tokenize` as a library: formats, EOS policies, overflow, held-out split, packing, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difflm.config import from_dict, merge
from difflm.data.prompts import encode_prompt
from difflm.errors import ConfigError
from difflm.training import TrainRecipe, tokenize
from difflm.training.data import load_tokenized

FIX = Path(__file__).resolve().parent / "fixtures" / "train"


def make(model: Path, out: Path, **data) -> TrainRecipe:
    base = {"model": {"name": str(model)}, "data": {"source": str(FIX / "alpaca_tiny.jsonl"), "max_length": 128, "path": str(out)}}
    return from_dict(TrainRecipe, merge(base, {"data": data}))


@pytest.fixture(scope="module")
def tok(tiny_native_llada_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_native_llada_dir))


@pytest.fixture(scope="module")
def ids(tiny_native_llada_dir):
    return json.loads((tiny_native_llada_dir / "config.json").read_text())


def rows(ds):
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("policy", ["all", "first", "none"])
def test_alpaca_layout_counts_and_eos_policies(tiny_native_llada_dir, tmp_path, tok, ids, policy):
    res = tokenize(make(tiny_native_llada_dir, tmp_path / "d", eos_policy=policy))
    s = res.stats
    assert (s["rows"], s["kept"], s["dropped_empty"], s["dropped_too_long"]) == (18, 16, 1, 1)
    assert set(s["prompt_tokens"]) >= {"p50", "p90", "p99", "max"}
    dsd, meta = load_tokenized(tmp_path / "d")
    assert meta["eos_policy"] == policy and meta["eos_id"] == ids["eos_token_id"] and meta["mask_id"] == ids["mask_token_id"]
    src = [json.loads(x) for x in (FIX / "alpaca_tiny.jsonl").read_text().splitlines()][:16]
    eos = ids["eos_token_id"]
    for src_row, row in zip(src, rows(dsd["train"])):
        prompt = encode_prompt(tok, src_row["instruction"], src_row["input"], "alpaca")
        answer = tok(src_row["output"], add_special_tokens=False)["input_ids"]
        seq = row["input_ids"].tolist()
        p, r = int(row["prompt_len"]), int(row["response_len"])
        assert (p, r) == (len(prompt), len(answer)) and len(seq) == 128
        assert seq[:p] == prompt and seq[p : p + r] == answer and set(seq[p + r :]) == {eos}
        assert bool(row["has_eos"])
        assert int(row["answer_len"]) == {"all": 128 - p, "first": r + 1, "none": r}[policy]


def test_overflow_truncate_keeps_prompt_end_and_cuts_the_answer(tiny_native_llada_dir, tmp_path):
    res = tokenize(make(tiny_native_llada_dir, tmp_path / "d", overflow="truncate", eos_policy="first"))
    assert res.stats["kept"] == 17 and res.stats["truncated_response"] == 1 and res.stats["dropped_too_long"] == 0
    dsd, _ = load_tokenized(tmp_path / "d")
    cut = [r for r in rows(dsd["train"]) if not bool(r["has_eos"])]
    assert len(cut) == 1
    p, r = int(cut[0]["prompt_len"]), int(cut[0]["response_len"])
    assert p + r == 128 and int(cut[0]["answer_len"]) == r  # no room for an EOS: none is trained


def test_truncate_a_prompt_longer_than_max_length(tiny_native_llada_dir, tmp_path, tok):
    long = [{"instruction": "Tell me a joke. " * 20, "input": "", "output": "No."}]
    res = tokenize(make(tiny_native_llada_dir, tmp_path / "d", overflow="truncate", max_length=64), rows=long)
    assert res.stats["truncated_prompt"] == 1
    dsd, _ = load_tokenized(tmp_path / "d")
    row = dsd["train"][0]
    full = encode_prompt(tok, long[0]["instruction"], "", "alpaca")
    assert row["input_ids"][: int(row["prompt_len"])].tolist() == full[-62:]  # ends with "### Response:\n"
    with pytest.raises(ConfigError, match="no example survived"):
        tokenize(make(tiny_native_llada_dir, tmp_path / "e", max_length=64), rows=long)


def test_eval_split_and_overwrite(tiny_native_llada_dir, tmp_path):
    res = tokenize(make(tiny_native_llada_dir, tmp_path / "d", eval_size=0.25))
    assert (res.stats["train"], res.stats["eval"]) == (12, 4)
    with pytest.raises(ConfigError, match="--overwrite"):
        tokenize(make(tiny_native_llada_dir, tmp_path / "d", eval_size=3))
    res = tokenize(make(tiny_native_llada_dir, tmp_path / "d", eval_size=3), overwrite=True)
    assert (res.stats["train"], res.stats["eval"]) == (13, 3)
    assert (tmp_path / "d" / "recipe.yaml").is_file() and not (tmp_path / "d.tmp").exists()


def test_chat_messages_end_with_eot_then_eos(tiny_native_llada_dir, tmp_path, tok, ids):
    res = tokenize(make(tiny_native_llada_dir, tmp_path / "d", source=str(FIX / "chat_tiny.jsonl"), format="chat",
                        messages_field="messages"))
    assert (res.stats["kept"], res.stats["dropped_empty"]) == (3, 1)
    dsd, _ = load_tokenized(tmp_path / "d")
    third = dsd["train"][2]
    msgs = [json.loads(x) for x in (FIX / "chat_tiny.jsonl").read_text().splitlines()][2]["messages"]
    prompt_text = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    p, r = int(third["prompt_len"]), int(third["response_len"])
    seq = third["input_ids"].tolist()
    assert seq[:p] == prompt and prompt_text.startswith("<|bos|>") and prompt_text.endswith("<|end_header_id|>\n\n")
    assert seq[p : p + r] == tok("6", add_special_tokens=False)["input_ids"] + [ids["eot_token_id"]]
    assert seq[p + r] == ids["eos_token_id"]


def test_chat_format_from_instruction_data(tiny_native_llada_dir, tmp_path, tok):
    res = tokenize(make(tiny_native_llada_dir, tmp_path / "d", format="chat", max_length=64))
    assert res.stats["kept"] == 16
    dsd, _ = load_tokenized(tmp_path / "d")
    p = int(dsd["train"][0]["prompt_len"])
    assert dsd["train"][0]["input_ids"][:p].tolist() == encode_prompt(tok, "List three fruits.", "", "chat")


def test_text_packing(tiny_native_llada_dir, tmp_path, tok, ids):
    res = tokenize(make(tiny_native_llada_dir, tmp_path / "d", source=str(FIX / "text_tiny.jsonl"), format="text",
                        max_length=32, eos_policy="all"))
    texts = [json.loads(x)["text"] for x in (FIX / "text_tiny.jsonl").read_text().splitlines()]
    stream = []
    for t in texts:
        if t.strip():
            stream += tok(t, add_special_tokens=False)["input_ids"] + [ids["eos_token_id"]]
    assert res.stats["kept"] == len(stream) // 32 and res.stats["dropped_empty"] == 1
    dsd, meta = load_tokenized(tmp_path / "d")
    got = [x for r in rows(dsd["train"]) for x in r["input_ids"].tolist()]
    assert got == stream[: len(got)]
    first = dsd["train"][0]
    assert (int(first["prompt_len"]), int(first["answer_len"])) == (0, 32) and meta["format"] == "text"


def test_bad_sources_and_fields_fail_with_one_line(tiny_native_llada_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        tokenize(make(tiny_native_llada_dir, tmp_path / "a", source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ConfigError, match="instruction_field"):
        tokenize(make(tiny_native_llada_dir, tmp_path / "b", instruction_field="prompt"))
    with pytest.raises(ConfigError, match="data.source"):
        tokenize(make(tiny_native_llada_dir, tmp_path / "c", source=str(tmp_path)))  # an empty folder
    with pytest.raises(ConfigError, match="no tokenized data"):
        load_tokenized(tmp_path / "missing")


def test_a_failed_tokenize_keeps_the_previous_dataset(tiny_native_llada_dir, tmp_path, monkeypatch):
    """The disk fills up while `tokenize --overwrite` writes: the previous dataset stays, nothing is left over."""
    import datasets

    out = tmp_path / "d"
    tokenize(make(tiny_native_llada_dir, out, eval_size=0.25))
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_save = datasets.DatasetDict.save_to_disk

    def disk_full(self, path, *a, **k):
        real_save(self, path, *a, **k)  # the arrow files are written ...
        raise OSError(28, "No space left on device")  # ... and then the disk is full

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tokenize(make(tiny_native_llada_dir, out, eval_size=3), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    dsd, meta = load_tokenized(out)
    assert (len(dsd["train"]), len(dsd["eval"])) == (12, 4) and meta["stats"]["eval"] == 4
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", real_save)
    tokenize(make(tiny_native_llada_dir, out, eval_size=3), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and len(load_tokenized(out)[0]["eval"]) == 3


# -- the prompt ids training trains on are the ids generation feeds the model --------------------------------
class _Captured(Exception):
    pass


def _generation_prompt_ids(model, item: dict, fmt: str, monkeypatch) -> list[int]:
    """The prompt ids `difflm generate` (`iter_batches`) passes to the decoder for one item: the real code
    path up to `difflm.decoding.generate`, which is replaced by a recorder (the decoding is not under test)."""
    import difflm.decoding
    from difflm.decoding import DecodeConfig
    from difflm.generation import iter_batches

    seen = {}

    def record(model, ids, cfg, attention_mask=None, **kwargs):
        seen["ids"] = ids[0][attention_mask[0].bool()].tolist()
        raise _Captured

    monkeypatch.setattr(difflm.decoding, "generate", record)
    with pytest.raises(_Captured):
        next(iter_batches(model, [item], DecodeConfig(), prompt_format=fmt, batch_size=1))
    return seen["ids"]


PARITY_ROWS = [
    {"instruction": "List three fruits.", "input": "", "output": "Apple, pear, plum."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say <|eot_id|> hello\n", "input": "  ", "output": "hello"},  # a special-token string, blank input
]


@pytest.mark.parametrize("fmt", ["alpaca", "alpaca-cot", "raw", "chat"])
def test_training_prompt_ids_equal_generation_prompt_ids(tiny_native_llada_dir, tmp_path, fmt, monkeypatch):
    """For every prompt format both share (and the tiny tokenizer's chat template), the prompt part of a
    tokenized example is exactly what generation encodes for the same instruction and input."""
    from difflm.models import load_model

    tokenize(make(tiny_native_llada_dir, tmp_path / "d", format=fmt), rows=PARITY_ROWS)
    train_rows = rows(load_tokenized(tmp_path / "d")[0]["train"])
    assert len(train_rows) == len(PARITY_ROWS)
    model = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu")
    for src, row in zip(PARITY_ROWS, train_rows):
        trained = row["input_ids"][: int(row["prompt_len"])].tolist()
        item = {"id": "x", "instruction": src["instruction"], "input": src["input"]}
        assert trained == _generation_prompt_ids(model, item, fmt, monkeypatch), (fmt, src)


def test_chat_messages_prompt_ids_equal_generation_prompt_ids(tiny_native_llada_dir, tmp_path, monkeypatch):
    """Chat data (`messages_field`): the context before the answer, one user turn, is encoded as generation
    encodes that turn (`DiffusionLM.chat_ids`: the template tokenized by transformers, not text + encode)."""
    from difflm.models import load_model

    turns = ["What is 2 + 2?", "Name a colour.\n\nOne word."]
    data = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": "ok"}]} for u in turns]
    tokenize(make(tiny_native_llada_dir, tmp_path / "d", format="chat", messages_field="messages"), rows=data)
    train_rows = rows(load_tokenized(tmp_path / "d")[0]["train"])
    model = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu")
    assert len(train_rows) == len(turns)
    for user, row in zip(turns, train_rows):
        trained = row["input_ids"][: int(row["prompt_len"])].tolist()
        assert trained == model.chat_ids(user)
        assert trained == _generation_prompt_ids(model, {"id": "x", "instruction": user}, "chat", monkeypatch)


def test_the_old_module_name_still_imports_with_a_deprecation_warning():
    import importlib

    import difflm.training.data as old
    import difflm.training.tokenized as new

    with pytest.warns(DeprecationWarning, match="difflm.training.tokenized"):
        importlib.reload(old)
    assert old.__all__ == new.__all__ and old.load_tokenized is new.load_tokenized and old.tokenize is new.tokenize
    assert old.META_FILE == new.META_FILE
