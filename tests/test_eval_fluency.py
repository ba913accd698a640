"""Fluency metrics on hand-made texts, against values computed by hand (formulas: difflm/eval/fluency.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from difflm.eval.fluency import (
    distinct_n,
    fluency_metrics,
    longest_repeated_span,
    rep_n,
    repeat_flags,
    repetition_by_position,
)

runner = CliRunner()
TEXTS = ["a b a b a b", "the cat sat on the mat", "", "x y"]


def test_rep_n_by_hand():
    t = "a b a b a b".split()
    assert rep_n(t, 2) == pytest.approx(1 - 2 / 5)  # bigrams ab ba ab ba ab: 2 distinct of 5
    assert rep_n(t, 4) == pytest.approx(1 - 2 / 3)  # abab baba abab
    assert rep_n("the cat sat on the mat".split(), 2) == 0.0
    assert rep_n(["x"], 2) is None and rep_n([], 1) is None


def test_distinct_n_by_hand():
    toks = [t.split() for t in TEXTS]
    assert distinct_n(toks, 1) == pytest.approx(9 / 14)  # a b the cat sat on mat x y / 14 tokens
    assert distinct_n(toks, 2) == pytest.approx(8 / 11)  # {ab, ba} + 5 + {xy} / (5 + 5 + 0 + 1)
    assert distinct_n([[]], 2) is None


def test_longest_repeated_span_by_hand():
    assert longest_repeated_span("a b a b a b".split()) == 4  # "a b a b" at 0 and 2
    assert longest_repeated_span("a b a b a".split()) == 3  # overlapping occurrences count
    assert longest_repeated_span("a a a a".split()) == 3
    assert longest_repeated_span("the cat sat on the mat".split()) == 1
    assert longest_repeated_span("x y z".split()) == 0
    assert longest_repeated_span([]) == 0
    assert longest_repeated_span([5, 6, 7, 1, 5, 6, 7, 2, 5, 6]) == 3


def test_repeat_flags_and_position_curve_by_hand():
    assert repeat_flags("a b a b a b".split(), 2) == [None, False, False, True, True, True]
    curve = repetition_by_position([t.split() for t in TEXTS], n=2, bin_width=2)
    assert [(b["start"], b["end"]) for b in curve] == [(0, 2), (2, 4), (4, 6)]
    assert [(b["positions"], b["repeats"]) for b in curve] == [(3, 0), (4, 1), (4, 2)]
    assert [b["rate"] for b in curve] == [0.0, 0.25, 0.5]
    assert repetition_by_position([[]], n=2) == []


def test_fluency_metrics_aggregate_by_hand():
    m = fluency_metrics(TEXTS, top_frequent=2, position_n=2, bin_width=2, content_tokens=[6, 7, 0, None])
    a = m["aggregate"]
    assert a["outputs"] == 4
    assert a["rep_2"] == pytest.approx((0.6 + 0 + 0) / 3)  # empty text has no bigram: left out
    assert a["rep_4"] == pytest.approx((1 / 3 + 0) / 2)
    assert a["distinct_1"] == pytest.approx(9 / 14) and a["distinct_2"] == pytest.approx(8 / 11)
    assert a["longest_repeat_mean"] == pytest.approx((4 + 1 + 0 + 0) / 4) and a["longest_repeat_max"] == 4
    assert a["frequent_share"] == pytest.approx(6 / 14)  # top-2 tokens are a (3) and b (3)
    assert a["tokens_mean"] == pytest.approx(14 / 4)
    assert a["content_tokens_mean"] == pytest.approx((6 + 7 + 0) / 3)
    assert a["empty_share"] == pytest.approx(1 / 4)
    first, _, empty, _ = m["items"]
    assert first["frequent_share"] == 1.0 and first["distinct_1"] == pytest.approx(2 / 6)
    assert empty["empty"] is True and empty["rep_2"] is None and empty["frequent_share"] is None
    assert [b["rate"] for b in m["position_curve"]] == [0.0, 0.25, 0.5]
    # the frequent set can come from another corpus
    other = fluency_metrics(TEXTS, top_frequent=1, frequent_corpus=["mat mat mat"])
    assert other["aggregate"]["frequent_share"] == pytest.approx(1 / 14)


def test_token_level_metrics_use_the_tokenizer(tiny_llada_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llada_dir), trust_remote_code=False)
    m = fluency_metrics(TEXTS, tokenizer=tok)
    assert [it["tokens"] for it in m["items"]] == [len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert m["settings"]["tokens"] == "tokenizer"


def _outputs(tmp_path):
    recs = [{"id": f"r{i}", "instruction": "q", "output": t, "generator": "g", "content_tokens": len(t.split())}
            for i, t in enumerate(TEXTS)]
    out = tmp_path / "out.json"
    out.write_text(json.dumps(recs))
    return out


def test_eval_fluency_cli(tmp_path):
    out = _outputs(tmp_path)
    res = runner.invoke(app, ["eval", "fluency", "--outputs", str(out), "--top-frequent", "2", "--position-n", "2",
                              "--bin-width", "2"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "rep_2" in res.stdout and "repetition by position" in res.stdout
    saved = json.loads((tmp_path / "out.json.fluency.json").read_text())
    assert saved["aggregate"]["rep_2"] == pytest.approx(0.2)
    assert saved["aggregate"]["empty_share"] == 0.25
    assert [b["rate"] for b in saved["position_curve"]] == [0.0, 0.25, 0.5]
    assert saved["settings"]["fluency"]["tokens"] == "whitespace" and saved["manifest"] is None
    assert [it["id"] for it in saved["items"]] == ["r0", "r1", "r2", "r3"]


def test_eval_fluency_cli_with_tokenizer_and_bad_tokenizer(tmp_path, tiny_llada_dir):
    out = _outputs(tmp_path)
    res = runner.invoke(app, ["eval", "fluency", "--outputs", str(out), "--tokenizer", str(tiny_llada_dir), "-q",
                              "--results", str(tmp_path / "f.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "f.json").read_text())["settings"]["fluency"]["tokens"] == "tokenizer"
    res = runner.invoke(app, ["eval", "fluency", "--outputs", str(out), "--tokenizer", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "tokenizer" in res.stderr
