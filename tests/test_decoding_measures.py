"""The paper's decoding measures and settings: r* (unmask events, Table 10), exact forward reuse (S*, Table 5),
`total_length` (the canvas includes the prompt, x_T = [EOS] + prompt + masks) on a tiny float64 bidirectional Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from difflm.decoding import DecodeConfig, generate
from difflm.decoding.loop import item_seed
from difflm.errors import ConfigError

MASK, EOS, PAD = 39, 38, 37
from difflm.decoding.methods import REGISTRY  # noqa: E402

ALL = [name for name, m in REGISTRY.items() if m.kind != "ar"]  #: every diffusion decoder, a new one by construction


@pytest.fixture(scope="module")
def llama():
    """float64, as tests/test_decoding.py's tiny_llama: token comparisons across batch layouts stay exact in
    practice (the logits of the two paths differ by ~1e-16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, is_causal=False, use_cache=False)
    return LlamaForCausalLM(cfg).double().eval()


class Counting(torch.nn.Module):
    """Wraps a model; records every call's input (to count real forward passes and check what they saw)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x, attention_mask=None):
        self.inputs.append(x.clone())
        return self.inner(x, attention_mask=attention_mask)


def _cfg(method, **kw):
    base = dict(method=method, gen_length=16, steps=8, top_k=3, kernel_size=5)
    if method in ("llada", "semi_ar", "threshold"):
        base["block_length"] = 8
    base.update(kw)
    return DecodeConfig(**base)


PROMPTS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


# ------------------------------------------------------------------------------------------------ r*
@pytest.mark.parametrize("method", [m for m in ALL if not m.startswith("remdm")])
def test_unmask_events_without_remasking_are_the_answer_positions(llama, method):
    """No remasking: every answer position is unmasked exactly once (by a step or the final fill), so L* is the
    answer length and r* = L / S exactly."""
    from difflm.generation import sample_rate

    cfg = _cfg(method)
    out = generate(llama, PROMPTS, cfg, mask_id=MASK, eos_id=EOS)
    assert out.unmask_events.tolist() == [16, 16]
    rate = sample_rate(int(out.unmask_events[0]), cfg, out.nfe)
    assert rate["effective_sample_rate"] == 16 / 8 and rate["effective_sample_rate_nfe"] == 16 / out.nfe


def _recount(llama, cfg, prompts):
    """The unmask events counted independently from the step events: MASK -> token changes between consecutive
    canvases (a remask, token -> MASK, is not one; a later re-unmask is), plus the final fill."""
    snaps = []
    out = generate(llama, prompts, cfg, mask_id=MASK, eos_id=EOS, callback=lambda ev: snaps.append(ev["x"].clone()))
    p = prompts.shape[1]
    prev = torch.full_like(out.sequences[:, p:], MASK)
    count = torch.zeros(prompts.shape[0], dtype=torch.long)
    for x in snaps + [out.sequences]:
        cur = x[:, p:]
        count += ((prev == MASK) & (cur != MASK)).sum(1)
        prev = cur
    return out, count, snaps


@pytest.mark.parametrize("method", ["remdm", "remdm_conv"])
def test_remdm_unmask_events_count_the_re_unmasks(llama, method):
    cfg = _cfg(method, steps=32, eta=0.5, alpha_on=0.5, t_on=0.9, t_off=0.1, top_k=None, kernel_size=9)
    out, count, snaps = _recount(llama, cfg, PROMPTS)
    assert out.unmask_events.tolist() == count.tolist()
    # remasking happened (some position went back to MASK) and the rows unmasked more than their 16 positions
    remasked = sum(int(((a[:, 4:] != MASK) & (b[:, 4:] == MASK)).sum()) for a, b in zip(snaps, snaps[1:]))
    assert remasked > 0 and (out.unmask_events > 16).all()


def test_nucleus_unmask_events_are_the_drawn_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    ar = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4)).eval()
    out = generate(ar, PROMPTS, DecodeConfig(method="nucleus", gen_length=6), mask_id=None, eos_id=EOS)
    gen = out.sequences[:, 4:].tolist()
    drawn = [row.index(EOS) + 1 if EOS in row else 6 for row in gen]
    assert out.unmask_events.tolist() == drawn and out.forward_steps == out.nfe


# ------------------------------------------------------------------------------------------------ forward reuse
REUSE_CASES = [  # settings where some steps unmask nothing: many steps for few positions, or 0-count LLaDA steps
    ("categorical", dict(gen_length=8, steps=48, top_k=None)),
    ("topk", dict(gen_length=8, steps=48)),
    ("conv", dict(gen_length=8, steps=48)),
    ("semi_ar", dict(gen_length=8, steps=48, block_length=4)),
    ("remdm", dict(gen_length=8, steps=48, eta=0.1, top_k=None)),
    ("remdm_conv", dict(gen_length=8, steps=48, eta=0.1)),
    ("conv", dict(gen_length=8, steps=48, temperature=0.0, cfg_scale=1.0)),
    ("topk", dict(gen_length=8, steps=48, repetition_penalty=1.3, eos_fill=True)),
    ("llada", dict(gen_length=16, steps=8)),
    ("llada", dict(gen_length=16, steps=8, temperature=1.0, eos_fill=True)),
    ("llada_conv", dict(gen_length=16, steps=16, temperature=0.5)),
    ("threshold", dict(gen_length=16, steps=8, threshold=0.3)),
    ("dream", dict(gen_length=8, steps=48)),  # Dream's int() count is 0 on most of these steps
    ("dream", dict(gen_length=8, steps=48, temperature=1.0, alg="origin")),
    # LLaDA's 0-count steps come last in a block (the remainder goes to the first steps): they end it, no reuse
    ("llada", dict(total_length=12, steps=12, block_length=4)),
    ("llada", dict(total_length=12, steps=12, block_length=4, temperature=1.0, remasking="random")),
]


@pytest.mark.parametrize("method,kw", REUSE_CASES)
def test_forward_reuse_changes_no_token_and_counts_real_passes(llama, method, kw):
    """Reusing the last logits where the canvas did not change is exact: the same tokens and unmask events with
    and without it (the random draws are the same: reuse skips the model call only), nfe = the model calls made,
    and every reused step is one call fewer."""
    seeds = [item_seed(0, "a"), item_seed(0, "b")]
    runs = {}
    for on in (True, False):
        model = Counting(llama)
        out = generate(model, PROMPTS, _cfg(method, forward_reuse=on, **kw), mask_id=MASK, eos_id=EOS, row_seeds=seeds)
        per_step = 2 if kw.get("cfg_scale") else 1
        assert out.nfe == per_step * len(model.inputs) == per_step * out.forward_steps
        runs[on] = (out, model)
    (a, ma), (b, mb) = runs[True], runs[False]
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.unmask_events, b.unmask_events)
    assert b.reused_steps == 0 and a.forward_steps + a.reused_steps == b.forward_steps
    if method not in ("llada", "llada_conv", "threshold"):  # the mass methods: steps that unmask nothing
        assert a.reused_steps > 0, "these settings have steps that unmask nothing"
    # a reused step's input would have been exactly the last call's: no two consecutive real calls see the same
    # canvas with reuse on (it would have been reused), while without reuse they do
    assert not any(torch.equal(x, y) for x, y in zip(ma.inputs, ma.inputs[1:]) if x.shape == y.shape)


def test_mass_reuse_matches_mdlm_cache_rate(llama):
    """MDLM's cache: with many more steps than positions most steps unmask nothing; S* (forward steps) is then
    about the number of steps that changed the canvas, as MDLM's sampler reports it."""
    snaps = []
    cfg = _cfg("topk", gen_length=8, steps=64)
    out = generate(llama, PROMPTS[:1], cfg, mask_id=MASK, eos_id=EOS, callback=lambda ev: snaps.append(ev["x"].clone()))
    start = torch.cat([PROMPTS[:1], torch.full((1, 8), MASK)], 1)
    canvases = [start] + snaps
    changed = [not torch.equal(x, y) for x, y in zip(canvases, canvases[1:])]
    # the first step runs the model; afterwards a step runs it iff the step before changed the canvas; the last step
    # run is the one that unmasked the last position (the loop then ends)
    assert changed[-1] and out.forward_steps == 1 + sum(changed[:-1]) < out.steps_run <= 64


def test_cached_block_decoding_does_not_reuse(llama):
    """Fast-dLLM's approximate cache refreshes on a schedule of steps: skipping a step would move it, so reuse
    stays off there (exactness)."""
    cfg = _cfg("semi_ar", gen_length=8, steps=48, block_length=4, cache="prefix")
    out = generate(llama, PROMPTS, cfg, mask_id=MASK, eos_id=EOS)
    assert out.reused_steps == 0 and out.forward_steps == out.nfe == out.steps_run


# ------------------------------------------------------------------------------------------------ total length
def test_total_length_canvas_includes_the_prompt(llama):
    cfg = DecodeConfig(method="conv", total_length=12, steps=4, top_k=2, kernel_size=5, gen_length=999)
    out = generate(llama, PROMPTS, cfg, mask_id=MASK, eos_id=EOS, max_length=12)
    assert out.sequences.shape == (2, 12) and out.prompt_length == 4
    assert not (out.sequences == MASK).any() and out.unmask_events.tolist() == [8, 8]
    # the same as gen_length = L - prompt, which the model's context check refuses to exceed
    same = generate(llama, PROMPTS, DecodeConfig(method="conv", gen_length=8, steps=4, top_k=2, kernel_size=5),
                    mask_id=MASK, eos_id=EOS, max_length=12)
    assert torch.equal(out.sequences, same.sequences)
    with pytest.raises(ConfigError) as err:
        generate(llama, PROMPTS, DecodeConfig(method="conv", gen_length=12, steps=4), mask_id=MASK, eos_id=EOS,
                 max_length=12)
    assert err.value.key == "gen_length"
    with pytest.raises(ConfigError) as err:
        generate(llama, PROMPTS, DecodeConfig(total_length=13), mask_id=MASK, eos_id=EOS, max_length=12)
    assert err.value.key == "total_length"


class Exploding(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("no forward pass may run")


@pytest.mark.parametrize("kw", [dict(total_length=4), dict(total_length=5, leading_eos=True)])
def test_prompt_that_leaves_no_room_fails_before_any_forward(kw):
    with pytest.raises(ConfigError, match="leaves no room in total_length") as err:
        generate(Exploding(), PROMPTS, DecodeConfig(**kw), mask_id=MASK, eos_id=EOS)
    assert err.value.key == "total_length"


def test_leading_eos_goes_right_before_each_prompt(llama):
    cfg = DecodeConfig(method="topk", total_length=10, steps=4, top_k=2, leading_eos=True)
    ids = torch.tensor([[1, 2, 3, 4], [PAD, PAD, 5, 6]])
    am = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    seen, events = Counting(llama), []
    out = generate(seen, ids, cfg, mask_id=MASK, eos_id=EOS, attention_mask=am, callback=events.append)
    assert out.prompt_length == 5 and out.sequences.shape == (2, 5 + 10 - 3)
    # the step events show the merged canvas, its answers from prompt_length on (a live view reads them there)
    assert events and all(ev["prompt_length"] == 5 and ev["x"].shape == (2, 12) for ev in events)
    assert out.sequences[0, :5].tolist() == [EOS, 1, 2, 3, 4]
    assert out.sequences[1, :5].tolist()[2:] == [EOS, 5, 6]
    # the model saw x_T = [EOS] + prompt + masks: L positions, no padding (rows of one prompt length decode together)
    assert {tuple(x.shape) for x in seen.inputs} == {(1, 10)}
    firsts = [x[0].tolist() for x in seen.inputs]
    assert [EOS, 5, 6] + [MASK] * 7 in firsts and [EOS, 1, 2, 3, 4] + [MASK] * 5 in firsts


@pytest.mark.parametrize("method", ["conv", "remdm", "llada", "semi_ar", "threshold"])
def test_total_length_rows_of_different_prompt_lengths_decode_as_alone(llama, method):
    """Each row's answer is L - its prompt length; rows of different lengths are decoded apart (no padding), so a
    row's tokens are those it gets alone; the merged output keeps the left-padded layout, answers then EOS."""
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12], [13, 14]]
    plen = 6
    ids = torch.tensor([[PAD] * (plen - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (plen - len(p)) + [1] * len(p) for p in prompts])
    seeds = [item_seed(0, f"i{i}") for i in range(4)]
    L = 17  # answers of 11, 15, 13, 15 positions: not multiples of the block (4): the last block is shorter
    cfg = DecodeConfig(method=method, total_length=L, steps=16, top_k=2, kernel_size=5, block_length=4,
                       threshold=0.5 if method == "threshold" else None, eta=0.1)
    out = generate(llama, ids, cfg, mask_id=MASK, eos_id=EOS, attention_mask=am, row_seeds=seeds)
    assert out.prompt_length == plen and out.sequences.shape == (4, plen + L - 2)
    for i, p in enumerate(prompts):
        answer = L - len(p)
        alone = generate(llama, torch.tensor([p]), DecodeConfig(**{**cfg.__dict__, "total_length": L}), mask_id=MASK,
                         eos_id=EOS, row_seeds=[seeds[i]])
        assert alone.sequences.shape == (1, L)
        assert out.sequences[i, plen : plen + answer].tolist() == alone.sequences[0, len(p):].tolist(), (method, i)
        assert (out.sequences[i, plen + answer :] == EOS).all()
        assert not (out.sequences[i, plen : plen + answer] == MASK).any()
        assert int(out.unmask_events[i]) >= answer


def test_total_length_block_steps_checked_for_every_prompt_before_decoding():
    ids = torch.tensor([[PAD, PAD, 1, 2], [3, 4, 5, 6]])
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    # the 2-token prompt leaves 14 positions: 4 blocks of 4 need 4 steps; the 4-token one leaves 12 (3 blocks)
    cfg = DecodeConfig(method="llada", total_length=16, block_length=4, steps=3)
    with pytest.raises(ConfigError, match="steps 3 < the 4 blocks") as err:
        generate(Exploding(), ids, cfg, mask_id=MASK, eos_id=EOS, attention_mask=am)
    assert err.value.key == "steps"


# ---------------------------------------------------------------------------------------- records, manifest, CLI
def test_records_manifest_and_report_carry_r_star_and_s_star(tiny_llada_dir, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    from difflm.eval.report import build_report, render_markdown

    out = tmp_path / "o.json"
    fix = Path(__file__).parent / "fixtures" / "gsm8k.jsonl"
    args = ["generate", "-m", str(tiny_llada_dir), "--eval-set", "gsm8k", "--data-path", str(fix), "--limit", "3",
            "--gen-length", "8", "--steps", "32", "--decode", "topk", "--top-k", "2", "-o", str(out), "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    recs = json.loads(out.read_text())
    for r in recs:
        assert r["unmask_events"] == 8 and r["effective_sample_rate"] == 8 / 32
        assert r["effective_sample_rate_nfe"] == pytest.approx(8 / r["nfe"])
        assert r["forward_steps"] == r["nfe"] and r["forward_steps"] + r["reused_steps"] <= 32
    man = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert man["effective_sample_rate"] == 8 / 32 and man["unmask_events_mean"] == 8
    assert man["effective_sample_rate_nfe"] == pytest.approx(24 / sum(r["nfe"] for r in recs))
    assert man["s_star"] == pytest.approx(sum(r["forward_steps"] for r in recs) / 3) and man["s_star"] < 32
    rep = build_report([str(out)], out_dir=tmp_path / "rep")
    assert rep["rows"][0]["effective_sample_rate"] == 0.25 and "| r* |" in render_markdown(rep["rows"])


def test_cli_total_length_leaving_no_room_exits_2_with_one_line(tiny_llada_dir):
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["generate", "-m", str(tiny_llada_dir), "-p", "hello there", "--prompt-format",
                                   "alpaca", "--total-length", "8", "--steps", "4", "-q"])
    assert res.exit_code == 2, res.output
    assert "total_length" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_cli_total_length_with_leading_eos_and_the_live_view(tiny_llada_dir):
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["generate", "-m", str(tiny_llada_dir), "-p", "the cat", "--prompt-format", "raw",
                                   "--total-length", "12", "--leading-eos", "--steps", "4", "--decode", "topk",
                                   "--live", "-q"])
    assert res.exit_code == 0, res.output
    assert "prompt-0" in res.output
