"""Generative perplexity and the inlier share (`difflm eval fluency --scorer`), against hand computations in
float64 on a tiny random causal Llama: every token's probability is recomputed from a forward pass over its own
prefix alone (no batching, no padding, no shift to get wrong)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from difflm.errors import ConfigError
from difflm.eval.genppl import aggregate, inlier_share, read_reference_texts, score_texts, window_count
from difflm.models import load_model

runner = CliRunner()
TEXTS = ["the cat sat on the mat", "a b", "", "The quick brown fox jumps over the lazy dog again and again.", "x"]


@pytest.fixture(scope="module")
def ar_dir(tmp_path_factory) -> Path:
    from difflm.testing import build_tiny_ar

    return build_tiny_ar(tmp_path_factory.mktemp("scorer"), hidden=32, n_layers=2)


@pytest.fixture(scope="module")
def scorer64(ar_dir):
    m = load_model(str(ar_dir), device="cpu", dtype="float32")
    m.module.to(torch.float64)
    return m


def _hand_logp(module, prefix: list[int], token: int) -> float:
    """log p(token | prefix): a forward pass over the prefix alone, the last position's distribution."""
    with torch.no_grad():
        logits = module(input_ids=torch.tensor([prefix])).logits[0, -1].double()
    return float(logits[token] - torch.logsumexp(logits, dim=0))


def _hand_nll(module, windows: list[tuple[list[int], int]]) -> tuple[float, int]:
    nll, n = 0.0, 0
    for ids, start in windows:
        for j in range(start, len(ids)):
            nll -= _hand_logp(module, ids[:j], ids[j])
            n += 1
    return nll, n


def _ids(m, text):
    return list(m.tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []


def test_gen_ppl_equals_a_hand_computation_in_float64_in_any_batch(scorer64):
    m = scorer64
    bos = m.ids.bos_id
    for bs in (1, 3, 8):  # padded batches of mixed lengths and single rows give the same numbers
        res = score_texts(m, TEXTS, batch_size=bs)
        for text, r in zip(TEXTS, res):
            ids = _ids(m, text)
            if not ids:
                assert r["gen_ppl"] is None and r["scored_tokens"] == 0
                continue
            nll, n = _hand_nll(m.module, [([bos] + ids, 1)])
            assert r["scored_tokens"] == n == len(ids)
            assert r["nll_sum"] == pytest.approx(nll, rel=1e-10)
            assert r["gen_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-10)


def test_long_texts_are_scored_in_windows_each_token_once(scorer64):
    m = scorer64
    bos = m.ids.bos_id
    text = TEXTS[3]
    ids = _ids(m, text)
    W = 8
    assert len(ids) > 2 * W  # at least three windows
    res = score_texts(m, [text, TEXTS[0]], max_length=W, batch_size=2)[0]
    # first window: BOS + W - 1 tokens; then BOS + the next W - 1 each
    wins = [([bos] + ids[s : s + W - 1], 1) for s in range(0, len(ids), W - 1)]
    nll, n = _hand_nll(m.module, wins)
    assert res["windows"] == len(wins) == window_count(len(ids), 1, W)
    assert res["scored_tokens"] == n == len(ids)
    assert res["nll_sum"] == pytest.approx(nll, rel=1e-10)
    # a window as long as the text changes nothing against the default
    assert score_texts(m, [text], max_length=len(ids) + 1)[0]["nll_sum"] == pytest.approx(
        score_texts(m, [text])[0]["nll_sum"], rel=1e-10)


def test_prompt_context_conditions_on_the_prompt_and_scores_only_the_output(scorer64):
    m = scorer64
    bos = m.ids.bos_id
    out, instr = "the cat sat", "Tell me about cats."
    res = score_texts(m, [out], prompts=[(instr, None)], context="prompt")[0]
    ctx = [bos] + _ids(m, instr + "\n\n")
    nll, n = _hand_nll(m.module, [(ctx + _ids(m, out), len(ctx))])
    assert res["scored_tokens"] == n == len(_ids(m, out))
    assert res["nll_sum"] == pytest.approx(nll, rel=1e-10)
    assert res["nll_sum"] != pytest.approx(score_texts(m, [out])[0]["nll_sum"], rel=1e-6)  # the context matters
    with pytest.raises(ConfigError, match="instruction"):
        score_texts(m, [out], context="prompt")
    with pytest.raises(ConfigError, match="bos, prompt, chat"):
        score_texts(m, [out], context="nope")


def test_float32_batches_match_single_rows_within_tolerance(ar_dir):
    m = load_model(str(ar_dir), device="cpu", dtype="float32")
    batched = score_texts(m, TEXTS, batch_size=8)
    for text, b in zip(TEXTS, batched):
        s = score_texts(m, [text], batch_size=1)[0]
        if s["gen_ppl"] is None:
            assert b["gen_ppl"] is None
        else:  # float32 with and without padding: different kernels, same maths
            assert b["gen_ppl"] == pytest.approx(s["gen_ppl"], rel=1e-4)


def test_aggregate_and_inlier_share_by_hand():
    def s(ppl):
        return {"gen_ppl": ppl, "nll_mean": math.log(ppl) if ppl else None, "nll_sum": math.log(ppl) * 2 if ppl else 0.0,
                "scored_tokens": 2 if ppl else 0}

    outs = [s(10.0), s(30.0), s(None), s(12.0), s(200.0)]
    agg = aggregate(outs)
    assert agg["gen_ppl_mean"] == pytest.approx((10 + 30 + 12 + 200) / 4)
    assert agg["gen_ppl_median"] == pytest.approx((12 + 30) / 2)
    assert agg["gen_ppl_pooled"] == pytest.approx(math.exp(sum(2 * math.log(v) for v in (10, 30, 12, 200)) / 8))
    assert agg["gen_ppl_unscored"] == 1
    ref_vals = [8.0, 10.0, 12.0, 14.0, 40.0]
    ref = [s(v) for v in ref_vals]
    mu, sd = statistics.fmean(ref_vals), statistics.pstdev(ref_vals)
    res = inlier_share(outs, ref, scale="ppl")
    want = [v is not None and mu - 2 * sd <= v <= mu + 2 * sd for v in (10.0, 30.0, None, 12.0, 200.0)]
    assert res["inlier"] == want == [True, True, False, True, False]
    assert res["inlier_share"] == pytest.approx(3 / 5)  # the empty output counts, as an outlier
    assert (res["reference_mean"], res["reference_std"]) == (pytest.approx(mu), pytest.approx(sd))
    logs = [math.log(v) for v in ref_vals]
    lmu, lsd = statistics.fmean(logs), statistics.pstdev(logs)
    res_log = inlier_share(outs, ref, scale="log")
    assert res_log["inlier"] == [v is not None and lmu - 2 * lsd <= math.log(v) <= lmu + 2 * lsd
                                 for v in (10.0, 30.0, None, 12.0, 200.0)]
    with pytest.raises(ConfigError, match="at least 2"):
        inlier_share(outs, ref[:1])


def test_reference_files_in_the_formats_users_have(tmp_path):
    (tmp_path / "strings.json").write_text(json.dumps(["one answer", "two answers"]))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Q1", "input": "", "output": "A1"},
                                                      {"instruction": "Q2", "input": "ctx", "output": "A2"}]))
    (tmp_path / "texts.jsonl").write_text('{"text": "t1"}\n\n{"response": "t2", "instruction": "q"}\n')
    assert read_reference_texts(tmp_path / "strings.json")[0] == ["one answer", "two answers"]
    texts, prompts = read_reference_texts(tmp_path / "alpaca.json")
    assert texts == ["A1", "A2"] and prompts == [("Q1", ""), ("Q2", "ctx")]
    assert read_reference_texts(tmp_path / "texts.jsonl") == (["t1", "t2"], [(None, None), ("q", None)])
    assert read_reference_texts(tmp_path / "alpaca.json", limit=1)[0] == ["A1"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2.*no text field"):
        read_reference_texts(tmp_path / "bad.jsonl")
    (tmp_path / "nums.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is a int"):
        read_reference_texts(tmp_path / "nums.json")


@pytest.fixture
def outputs_file(tmp_path) -> Path:
    recs = [{"id": str(i), "instruction": f"q{i}", "output": t, "generator": "g"} for i, t in enumerate(TEXTS)]
    p = tmp_path / "out.json"
    p.write_text(json.dumps(recs))
    return p


def test_cli_writes_gen_ppl_and_inlier_share(ar_dir, outputs_file, tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(["the cat sat on the mat", "the dog sat", "a cat on a mat", "the fox jumps"]))
    res = runner.invoke(app, ["eval", "fluency", "--outputs", str(outputs_file), "--scorer", str(ar_dir),
                              "--inlier-reference", str(ref), "--batch-size", "2", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    data = json.loads(Path(str(outputs_file) + ".fluency.json").read_text())
    agg, items = data["aggregate"], data["items"]
    m = load_model(str(ar_dir), device="cpu", dtype="float32")
    want = score_texts(m, TEXTS)
    for it, w in zip(items, want):
        assert (it["gen_ppl"] is None) == (w["gen_ppl"] is None)
        if w["gen_ppl"] is not None:
            assert it["gen_ppl"] == pytest.approx(w["gen_ppl"], rel=1e-4)
    vals = [w["gen_ppl"] for w in want if w["gen_ppl"] is not None]
    assert agg["gen_ppl_mean"] == pytest.approx(statistics.fmean(vals), rel=1e-4)
    assert agg["gen_ppl_median"] == pytest.approx(statistics.median(vals), rel=1e-4)
    assert agg["inlier_share"] == pytest.approx(sum(it["inlier"] for it in items) / len(items))
    assert data["inlier"]["reference_texts"] == 4 and data["settings"]["fluency"]["gen_ppl"]["context"] == "bos"
    assert "gen_ppl_mean" in res.output and "inlier_share" in res.output
    # the reference's scores are cached beside it and read back (not rescored) by the next outputs file
    cache = Path(data["settings"]["fluency"]["gen_ppl"]["reference_cache"])
    assert cache.parent == ref.parent and len(json.loads(cache.read_text())) == 4
    fake = [{**r, "gen_ppl": 1.0, "nll_mean": 0.0} for r in json.loads(cache.read_text())]
    fake[0]["gen_ppl"] = 3.0
    cache.write_text(json.dumps(fake))
    again = runner.invoke(app, ["eval", "fluency", "--outputs", str(outputs_file), "--scorer", str(ar_dir),
                                "--inlier-reference", str(ref), "--dtype", "float32", "-q"])
    assert again.exit_code == 0, again.output
    inl = json.loads(Path(str(outputs_file) + ".fluency.json").read_text())["inlier"]
    assert inl["reference_mean"] == pytest.approx(1.5)  # the cached values were used


@pytest.mark.parametrize("args, needle", [
    (["--context", "nope"], "--context must be one of bos, prompt, chat, got 'nope'"),
    (["--inlier-scale", "z"], "--inlier-scale must be one of ppl, log"),
    (["--inlier-reference", "missing.json"], "missing.json: no such file"),
])
def test_bad_fluency_options_exit_2_with_one_line(ar_dir, outputs_file, args, needle):
    res = runner.invoke(app, ["eval", "fluency", "--outputs", str(outputs_file), "--scorer", str(ar_dir), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1


def test_a_diffusion_model_is_refused_as_scorer(tiny_llada_dir, outputs_file):
    res = runner.invoke(app, ["eval", "fluency", "--outputs", str(outputs_file), "--scorer", str(tiny_llada_dir)])
    assert res.exit_code == 2 and "autoregressive" in res.output, res.output
