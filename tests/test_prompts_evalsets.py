"""Prompt formats (exact strings) and eval sets / instruction files read from the shipped fixtures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from difflm.data.evalsets import EVAL_SETS, load_eval_set, read_inputs
from difflm.data.prompts import PROMPT_FORMATS, encode_prompt, format_prompt
from difflm.errors import ConfigError

FIX = Path(__file__).parent / "fixtures"
HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


# ----------------------------------------------------------------------------- prompts


def test_alpaca_exact():
    assert format_prompt("Add 2 and 3.") == HEAD + "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert (
        format_prompt("Translate.", "Bonjour", "alpaca")
        == HEAD + "### Instruction:\nTranslate.\n\nBonjour\n\n### Response:\n"
    )
    # empty / blank input: no input block
    assert format_prompt("Hi.", "") == format_prompt("Hi.", "   ") == format_prompt("Hi.")


def test_alpaca_cot_and_raw_exact():
    assert (
        format_prompt("What is 6*7?", fmt="alpaca-cot")
        == HEAD + "### Instruction:\nWhat is 6*7?\nLet's think step by step.\n\n### Response:\n"
    )
    assert (
        format_prompt("Q?", "ctx", fmt="alpaca-cot")
        == HEAD + "### Instruction:\nQ?\nLet's think step by step.\n\nctx\n\n### Response:\n"
    )
    assert format_prompt("Once upon a time", fmt="raw") == "Once upon a time"
    assert format_prompt("Summarise:", "the text", fmt="raw") == "Summarise:\nthe text"


def test_chat_needs_tokenizer_and_unknown_format():
    with pytest.raises(ConfigError, match="chat"):
        format_prompt("Hi", fmt="chat")
    seen = []
    assert format_prompt("Hi", "there", fmt="chat", chat_fn=lambda m: seen.append(m) or "X") == "X"
    assert seen == [[{"role": "user", "content": "Hi\n\nthere"}]]
    with pytest.raises(ConfigError, match="alpaca, alpaca-cot, paper-cot, raw, chat"):
        format_prompt("Hi", fmt="vicuna")
    assert PROMPT_FORMATS == ("alpaca", "alpaca-cot", "paper-cot", "raw", "chat")


def test_paper_cot_exact():
    """The paper's CoT template (Appendix E, Tables 6-7), character for character as the authors' code writes it:
    alpaca's second sentence replaced, the instruction itself untouched (unlike alpaca-cot)."""
    paper = ("Below is an instruction that describes a task. Think through the problem carefully, explaining in "
             "detail before arriving at the final answer.\n\n### Instruction:\nWho is Larry Page?\n\n### Response:\n")
    assert format_prompt("Who is Larry Page?", fmt="paper-cot") == paper
    assert format_prompt("Who is Larry Page?", "  ", fmt="paper-cot") == paper
    assert format_prompt("Q?", "ctx", fmt="paper-cot").endswith("### Instruction:\nQ?\n\nctx\n\n### Response:\n")
    assert "Let's think step by step." not in paper and not paper.startswith(HEAD)


class CharTokenizer:
    """A stand-in tokenizer: one id per character; records the add_special_tokens flag."""

    chat_template = "<user>{{ content }}</user><assistant>"

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append(add_special_tokens)
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        assert add_generation_prompt and not tokenize
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_encode_prompt():
    tok = CharTokenizer()
    ids = encode_prompt(tok, "Hi", None, "raw")
    assert ids == [ord("H"), ord("i")] and tok.calls == [False]
    assert encode_prompt(tok, "Hi") == [ord(c) for c in format_prompt("Hi")]
    # a model adapter with .tokenizer works too
    model = type("M", (), {"tokenizer": tok})()
    assert encode_prompt(model, "Hi", fmt="chat") == [ord(c) for c in "<user>Hi</user><assistant>"]
    # chat_ids_fn wins
    assert encode_prompt(tok, "Hi", "x", "chat", chat_ids_fn=lambda m: [1, 2, len(m[0]["content"])]) == [1, 2, 5]
    no_template = CharTokenizer()
    no_template.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        encode_prompt(no_template, "Hi", fmt="chat")
    with pytest.raises(ConfigError, match="allowed"):
        encode_prompt(tok, "Hi", fmt="nope")


# ----------------------------------------------------------------------------- eval sets


def test_alpaca_eval_fixture():
    items = load_eval_set("alpaca_eval", FIX / "alpaca_eval.json")
    assert len(items) == 5
    assert [i["id"] for i in items] == [f"alpaca_eval-{k}" for k in range(5)]
    assert items[0]["instruction"] == "Name three primary colors."
    assert items[0]["dataset"] == "helpful_base" and items[0]["eval_set"] == "alpaca_eval"
    assert items[3]["input"] == "The library opens at nine." and "input" not in items[0]
    assert items[0]["reference"] == "Red, yellow and blue."


def test_gsm8k_fixture():
    items = load_eval_set("gsm8k", FIX / "gsm8k.jsonl")
    assert len(items) == 20
    assert {i["dataset"] for i in items} == {"gsm8k"}
    assert items[0]["id"] == "gsm8k-0" and items[19]["id"] == "gsm8k-19"
    assert items[0]["instruction"].startswith("Mara buys 3 notebooks")
    assert all("\n#### " in i["answer"] for i in items)
    assert items[0]["answer"].endswith("#### 12")


def test_wikitext_fixture():
    items = load_eval_set("wikitext", FIX / "wikitext.jsonl")
    # 10 rows: blanks, headings and a short line are skipped; ids are source rows
    assert [i["id"] for i in items] == ["wikitext-3", "wikitext-5", "wikitext-7", "wikitext-8", "wikitext-9"]
    assert {i["eval_set"] for i in items} == {"wikitext"}
    first = items[0]
    assert first["instruction"].split() == first["instruction"].split(" ") and len(first["instruction"].split()) == 32
    assert first["instruction"].startswith("The Lantern Valley Railway was a narrow gauge line")
    assert first["reference"].endswith("busiest of its kind in the county .")
    assert "ridge-top road" in items[2]["instruction"] + " " + items[2]["reference"]
    assert "2,000 people" in items[3]["reference"]


def test_arena_hard_both_schemas():
    items = load_eval_set("arena_hard", FIX / "arena_hard.jsonl")
    assert [i["id"] for i in items] == ["a1f0c2d3e4b5", "b2e1d3c4f5a6", "c3d2e1f0a9b8"]
    assert items[0]["question_id"] == "a1f0c2d3e4b5" and items[0]["category"] == "arena-hard-v0.1"
    assert items[0]["instruction"].startswith("Write a spreadsheet formula")
    assert items[2]["instruction"].startswith("Explain the difference") and items[2]["category"] == "hard_prompt"
    assert items[0]["cluster"] == "Spreadsheet Formulas" and items[2]["subcategory"] == "coding"


def test_paper_wiki_shipped_set():
    """The paper's Wiki set ships in the package: 504 Mintaka entities, 8 categories x 63, the exact prompt."""
    import collections

    items = load_eval_set("wiki")
    assert len(items) == 504 and len({i["id"] for i in items}) == 504
    assert collections.Counter(i["category"] for i in items) == {c: 63 for c in (
        "history", "music", "sports", "movies", "books", "geography", "politics", "videogames")}
    first = items[0]
    assert first["id"] == "fae46b21" and first["entity"] == "Mark Twain" and first["category"] == "history"
    # two backticks, the entity, two apostrophes, a full stop
    assert first["instruction"] == "Please give me an explanation about " + "`" * 2 + "Mark Twain" + "'" * 2 + "."
    assert first["dataset"] == first["eval_set"] == "wiki"
    assert all(i["instruction"] == f"Please give me an explanation about ``{i['entity']}''." for i in items)
    assert [i["id"] for i in load_eval_set("wiki", limit=3)] == [i["id"] for i in items[:3]]


def test_paper_wiki_local_file_and_old_wikitext_file():
    items = load_eval_set("wiki", FIX / "wiki_entities.json")
    rows = json.loads((FIX / "wiki_entities.json").read_text())
    assert [i["id"] for i in items] == [r["id"] for r in rows]
    assert items[2]["instruction"] == "Please give me an explanation about ``Shaquille O'Neal''."
    assert [i["category"] for i in items] == ["history", "music", "sports", "videogames"]
    # a WikiText file under the old name: one line naming the new one
    with pytest.raises(ConfigError, match="wikitext") as e:
        load_eval_set("wiki", FIX / "wikitext.jsonl")
    assert "\n" not in str(e.value)


def test_mt_bench_both_schemas(tmp_path):
    fastchat = load_eval_set("mt_bench", FIX / "mt_bench_question.jsonl")
    assert [i["id"] for i in fastchat] == ["81", "91", "111", "121"]
    assert [i["category"] for i in fastchat] == ["writing", "roleplay", "math", "coding"]
    first = fastchat[0]
    assert first["question_id"] == "81" and first["turn"] == 1 and first["eval_set"] == first["dataset"] == "mt_bench"
    assert first["instruction"].startswith("Write a short blog post") and len(first["turns"]) == 2
    assert "reference_answers" not in first and fastchat[2]["reference_answers"][0].endswith("area is 32.")
    hub = load_eval_set("mt_bench", FIX / "mt_bench_prompts.jsonl")
    assert [i["id"] for i in hub] == ["30442153", "81720359", "5093861"]
    assert hub[0]["instruction"] == first["instruction"] and hub[0]["turns"] == first["turns"]
    assert [i["category"] for i in hub] == ["writing", "math", "stem"] and "reference_answers" not in hub[0]
    # the Hub file is parquet: the same rows read from parquet
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIX / "mt_bench_prompts.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert load_eval_set("mt_bench", tmp_path / "train.parquet") == hub
    with pytest.raises(ConfigError, match="mt_bench schema"):
        load_eval_set("mt_bench", FIX / "gsm8k.jsonl")


def test_mt_bench_second_turn_item():
    from difflm.data.evalsets import second_turn_item

    first = load_eval_set("mt_bench", FIX / "mt_bench_question.jsonl")[2]
    second = second_turn_item(first, "The area is 32.")
    assert second["id"] == "111-turn2" and second["turn"] == 2 and second["question_id"] == "111"
    assert second["instruction"] == first["turns"][1] and second["category"] == "math"
    assert second["messages"] == [{"role": "user", "content": first["turns"][0]},
                                  {"role": "assistant", "content": "The area is 32."},
                                  {"role": "user", "content": first["turns"][1]}]
    with pytest.raises(ConfigError, match="no second turn"):
        second_turn_item(dict(first, turns=first["turns"][:1]), "x")


def test_data_path_json_list_and_parquet(tmp_path):
    rows = [json.loads(line) for line in (FIX / "gsm8k.jsonl").read_text().splitlines()]
    (tmp_path / "g.json").write_text(json.dumps(rows))
    assert load_eval_set("gsm8k", tmp_path / "g.json") == load_eval_set("gsm8k", FIX / "gsm8k.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
    assert load_eval_set("gsm8k", tmp_path / "g.parquet") == load_eval_set("gsm8k", FIX / "gsm8k.jsonl")


def test_limit_and_bad_names(tmp_path):
    items = load_eval_set("gsm8k", FIX / "gsm8k.jsonl", limit=3)
    assert [i["id"] for i in items] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert len(load_eval_set("wikitext", FIX / "wikitext.jsonl", limit=2)) == 2
    assert len(load_eval_set("arena_hard", FIX / "arena_hard.jsonl", limit=100)) == 3
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="limit"):
            load_eval_set("gsm8k", FIX / "gsm8k.jsonl", limit=bad)
    with pytest.raises(ConfigError, match="alpaca_eval, gsm8k, mt_bench, wiki, wikitext, arena_hard"):
        load_eval_set("mmlu", FIX / "gsm8k.jsonl")
    assert EVAL_SETS == ("alpaca_eval", "gsm8k", "mt_bench", "wiki", "wikitext", "arena_hard")
    with pytest.raises(ConfigError, match="no such file"):
        load_eval_set("gsm8k", tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="gsm8k schema"):  # wrong file for the set
        load_eval_set("gsm8k", FIX / "wikitext.jsonl")


def test_hub_offline_is_an_immediate_config_error(tmp_path):
    """Offline, a set without --data-path fails in one line without trying the network at all (a try would
    go through the Hub client's retries, tens of seconds). A fresh interpreter: `datasets` reads the offline
    flags when it is imported."""
    code = (
        "from difflm.data.evalsets import load_eval_set\n"
        "from difflm.errors import ConfigError\n"
        "from difflm.testing import network_attempts\n"
        "with network_attempts() as attempts:\n"
        "    try:\n"
        "        load_eval_set('gsm8k')\n"
        "    except ConfigError as e:\n"
        "        print(e)\n"
        "    else:\n"
        "        print('no ConfigError')\n"
        "print(len(attempts), attempts[:3])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    msg, tries = res.stdout.splitlines()[:2]
    assert msg.startswith(
        "eval set gsm8k: could not load openai/gsm8k from the Hub (offline?); pass --data-path with a local copy"
    )
    assert tries == "0 []", tries


# ----------------------------------------------------------------------------- read_inputs


def test_read_inputs_fixture():
    items = read_inputs(FIX / "instructions.jsonl")
    assert [i["id"] for i in items] == ["greet", "instructions-1", "7"]
    assert items[0]["note"] == "extra fields are carried through" and items[0]["generator"] == "my-model"
    assert items[1]["input"].startswith("The meeting") and items[1]["topic"] == "summary"
    assert read_inputs(FIX / "instructions.jsonl", limit=1) == items[:1]


def test_read_inputs_json_list(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps([{"instruction": "a"}, {"instruction": "b", "x": 1}]))
    assert read_inputs(p) == [{"instruction": "a", "id": "mine-0"}, {"instruction": "b", "x": 1, "id": "mine-1"}]


def test_read_inputs_errors(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"instruction": "a"}\n\n{"instruction": "b"\n')
    with pytest.raises(ConfigError, match=r"in\.jsonl:3: invalid JSON"):
        read_inputs(p)
    p.write_text('{"instruction": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(ConfigError, match=r"in\.jsonl:2: item 1 has no 'instruction'.*prompt"):
        read_inputs(p)
    p.write_text('{"instruction": "a", "id": "x"}\n{"instruction": "b", "id": "x"}\n')
    with pytest.raises(ConfigError, match="duplicate id 'x'"):
        read_inputs(p)
    p.write_text('["just a string"]')
    with pytest.raises(ConfigError, match="item 0 is a str"):
        read_inputs(p)
    p.write_text("[1, 2,\n")
    with pytest.raises(ConfigError, match=r"in\.jsonl:\d+: invalid JSON"):
        read_inputs(p)
    p.write_text("\n")
    with pytest.raises(ConfigError, match="no instructions"):
        read_inputs(p)
