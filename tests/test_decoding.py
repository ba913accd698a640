"""Decoders against independent float64 computations, hand-worked cases and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflm.decoding import DecodeConfig, generate, item_seed
from difflm.decoding import steps as S
from difflm.errors import ConfigError

V, MASK, EOS = 6, 5, 4  # tokens 0..3 are words, 4 = EOS, 5 = MASK


class FixedLogits(torch.nn.Module):
    """A test double whose logits at absolute position i are table[i] whatever the input."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x, attention_mask=None):
        return self.table[None, : x.shape[1]].expand(x.shape[0], -1, -1).clone()


def first_step(method, table, prompt, gen_length, steps, n_rows, **kw):
    """Run one denoising step of `generate` for n_rows copies of a prompt; return the generated region."""
    cfg = DecodeConfig(method=method, gen_length=gen_length, steps=steps, **kw)
    captured = {}

    def cb(ev):
        if ev["step"] == 1:
            captured["x"] = ev["x"][:, len(prompt) :].clone()

    ids = torch.tensor(prompt)[None].repeat(n_rows, 1)
    generate(FixedLogits(table), ids, cfg, mask_id=MASK, eos_id=EOS, callback=cb)
    return captured["x"].numpy()


def softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def reference_step(probs, masked, t, s, method, k=None, u=None, conv_mult=1.0):
    """Independent float64 joint step distribution: [L, V+1], last column = MASK. A masked position stays
    MASK with weight s and becomes token v with weight (t - s) * p_v * scale (p cut to its top k): scale 1
    (categorical), the masked count over the kept mass (topk), tanh(conv_mult * u) renormalised (conv)."""
    L = probs.shape[0]
    keep = np.zeros_like(probs, dtype=bool)
    for i in range(L):
        order = np.argsort(-probs[i], kind="stable")
        keep[i, order[: (k or probs.shape[1])]] = True
    kept = np.where(keep, probs, 0.0)
    if method == "categorical":
        scale = np.ones(L)
    elif method == "topk":
        g = masked.sum() / kept[masked].sum()
        scale = np.full(L, g)
    elif method == "conv":
        sc = np.tanh(conv_mult * u)
        c = masked.sum() / (sc[masked] * kept[masked].sum(1)).sum()
        scale = sc * c
    out = np.zeros((L, probs.shape[1] + 1))
    for i in range(L):
        if not masked[i]:
            continue
        w = np.append((t - s) * kept[i] * scale[i], s)
        out[i] = w / w.sum()
    return out


def empirical(x, n_tokens):
    """[L, V+1] frequencies of each outcome per position, MASK in the last column."""
    rows, L = x.shape
    out = np.zeros((L, n_tokens + 1))
    for i in range(L):
        for v in range(n_tokens):
            out[i, v] = (x[:, i] == v).mean()
        out[i, -1] = (x[:, i] == MASK).mean()
    return out


def assert_close_stat(emp, ref, n):
    """Every cell within 5 binomial standard errors (plus a tiny floor)."""
    se = np.sqrt(ref * (1 - ref) / n) + 1e-3
    bad = np.abs(emp - ref) > 5 * se
    assert not bad.any(), f"\nempirical\n{emp[bad.any(1)]}\nreference\n{ref[bad.any(1)]}"


def make_table(plen, L, seed=0, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(plen + L, V, generator=g) * sharp
    return table


# ------------------------------------------------------------------------------------------------
# hand-worked cases
def test_conv_counts_hand_worked():
    known = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    # K = 3: window i-1..i+1
    assert S.conv_counts(known, 3).tolist() == [[2, 2, 1, 0, 0, 0, 1, 1]]
    # K = 5: window i-2..i+2, zero padding at the edges
    assert S.conv_counts(known, 5).tolist() == [[2, 2, 2, 1, 0, 1, 1, 1]]
    # K = 1: the position itself
    assert S.conv_counts(known, 1).tolist() == [known.long().tolist()[0]]


@pytest.mark.numerics
def test_conv_scale_values():
    s = S.conv_scale(torch.tensor([0, 1, 2, 3]), 1.0)
    assert torch.allclose(s, torch.tensor([0.0, 0.7615941559557649, 0.9640275800758169, 0.9950547536867305], dtype=torch.float64))


def test_conv_constant_hand_worked_and_mass_conservation():
    # two masked positions with s = tanh(1), tanh(2); top-k mass q = 0.5 and 1.0; one decoded position
    q = torch.tensor([[0.5, 1.0, 0.7]], dtype=torch.float64)
    s = torch.tensor([[math.tanh(1), math.tanh(2), 1.0]], dtype=torch.float64)
    region = torch.tensor([[True, True, False]])
    m = S.position_scale(q, region, s)
    c = 2 / (math.tanh(1) * 0.5 + math.tanh(2) * 1.0)
    assert m[0, 0].item() == pytest.approx(math.tanh(1) * c, rel=1e-12)
    assert m[0, 1].item() == pytest.approx(math.tanh(2) * c, rel=1e-12)
    # the total unmasking mass equals that of plain categorical decoding: sum_M m_i q_i = |M|
    assert (m * q * region).sum().item() == pytest.approx(2.0, rel=1e-12)


def test_topk_global_normalisation_keeps_mass():
    g = torch.Generator().manual_seed(1)
    q = torch.rand(3, 7, generator=g, dtype=torch.float64)
    region = torch.rand(3, 7, generator=g) > 0.3
    m = S.position_scale(q, region)
    for r in range(3):
        assert (m[r] * q[r] * region[r]).sum().item() == pytest.approx(region[r].sum().item(), rel=1e-12)
        assert torch.allclose(m[r], m[r, 0].expand(7))  # one G per sequence


def test_transfer_schedule_matches_llada():
    def llada(n, steps):  # LLaDA's get_num_transfer_tokens, written from its description
        base, rem = divmod(n, steps)
        return [base + (1 if i < rem else 0) for i in range(steps)]

    for n, st in [(32, 8), (7, 3), (5, 5), (0, 4), (33, 4)]:
        assert S.transfer_schedule(torch.tensor([n]), st).tolist()[0] == llada(n, st)


def test_eos_fill_and_commit_top_ties():
    x = torch.tensor([[1, MASK, EOS, 2, MASK, 3], [1, 2, 3, 1, 2, 3]])
    out = S.eos_fill(x, MASK, [EOS], EOS)
    assert out.tolist() == [[1, MASK, EOS, EOS, EOS, EOS], [1, 2, 3, 1, 2, 3]]
    conf = torch.tensor([[0.5, 0.5, 0.9, float("-inf")]], dtype=torch.float64)
    assert S.commit_top(conf, torch.tensor([2])).tolist() == [[True, False, True, False]]
    # never commits a -inf (outside the region) position, even when asked for more
    assert S.commit_top(conf, torch.tensor([4])).tolist() == [[True, True, True, False]]


def test_repetition_penalty_formula():
    logits = torch.tensor([[[2.0, -2.0, 1.0, 0.5]]])
    seq = torch.tensor([[0, 1, 3]])
    valid = torch.tensor([[True, True, False]])  # token 3 is padding: not penalised
    S.apply_repetition_penalty(logits, seq, valid, 2.0)
    assert logits.tolist() == [[[1.0, -4.0, 1.0, 0.5]]]


# ------------------------------------------------------------------------------------------------
# step distributions against independent float64 computations (many rows, statistical tolerance)
N_ROWS = 6000


@pytest.mark.parametrize(
    "method,k",
    [("categorical", None), ("topk", 2), ("topk", 1), ("conv", 2), ("conv", None)],
)
@pytest.mark.numerics
def test_first_step_distribution(method, k):
    plen, L, steps = 2, 8, 4
    table = make_table(plen, L, seed=3)
    table[:, MASK] = 5.0  # the MASK logit must be ignored (SUBS: -inf)
    prompt = [0, 1]
    kw = dict(top_k=k)
    if method == "conv":
        kw["kernel_size"] = 5
    x = first_step(method, table, prompt, L, steps, N_ROWS, **kw)
    t, s = 1.0, 1.0 - (1.0 - 1e-5) / steps
    logits = table[plen:].double().numpy().copy()
    logits[:, MASK] = -np.inf
    probs = softmax64(logits)[:, :MASK]  # MASK has probability 0
    masked = np.ones(L, dtype=bool)
    u = None
    if method == "conv":
        known = np.r_[np.ones(plen), np.zeros(L)]
        u = np.array([known[max(0, i - 2) : i + 3].sum() for i in range(plen, plen + L)])
    ref = reference_step(probs, masked, t, s, method, k=k, u=u)
    ref = np.concatenate([ref[:, :MASK], ref[:, -1:]], 1)
    emp = empirical(x, MASK)
    assert_close_stat(emp, ref, N_ROWS)
    if method == "conv":  # positions with s_i = 0 cannot unmask
        assert (x[:, u == 0] == MASK).all()


@pytest.mark.numerics
def test_semi_ar_first_step_is_topk_inside_the_block():
    plen, L, steps = 1, 8, 8  # 2 blocks of 4, 4 steps per block
    table = make_table(plen, L, seed=5)
    x = first_step("semi_ar", table, [0], L, steps, N_ROWS, block_length=4, top_k=2)
    t, s = 1.0, 1.0 - (1.0 - 1e-5) / 4  # each block has its own t: 1 -> 0 in 4 steps
    logits = table[plen:].double().numpy().copy()
    logits[:, MASK] = -np.inf
    probs = softmax64(logits)[:, :MASK]
    ref_block = reference_step(probs[:4], np.ones(4, dtype=bool), t, s, "topk", k=2)
    ref_block = np.concatenate([ref_block[:, :MASK], ref_block[:, -1:]], 1)
    assert_close_stat(empirical(x[:, :4], MASK), ref_block, N_ROWS)
    assert (x[:, 4:] == MASK).all()  # the next block waits


def test_remdm_phases_and_loop_remasking():
    from difflm.decoding.loop import _remdm_alpha, _schedule_weights

    cfg = DecodeConfig(method="remdm", alpha_on=0.9, t_on=0.55, t_off=0.05, eta=0.02)
    assert _remdm_alpha(1.0, cfg) == 0.0
    assert _remdm_alpha(0.55, cfg) == pytest.approx(0.9)
    assert _remdm_alpha(0.3, cfg) == pytest.approx(0.9)
    assert _remdm_alpha(0.0, cfg) == pytest.approx(1.0)
    a, b, r = _schedule_weights(cfg, 1.0, 0.9)  # unmasking phase
    at, as_ = 0.0, 0.9 * 0.1 / 0.45
    assert a / (a + b) == pytest.approx((as_ - at) / (1 - at))
    a, b, r = _schedule_weights(cfg, 0.4, 0.3)  # loop phase
    assert r == 0.02 and a / (a + b) == pytest.approx(0.02 * 0.9 / 0.1)
    # expected number of unmasked tokens is unchanged by a loop step: remasked eta*n_u == unmasked p*n_m
    n_u, n_m = 0.9, 0.1
    assert r * n_u == pytest.approx(a / (a + b) * n_m)


def test_remdm_loop_remasks_decoded_tokens():
    # with eta = 1, every decoded token goes back to MASK in the loop phase
    table = make_table(1, 8, seed=2)
    cfg = DecodeConfig(method="remdm", gen_length=8, steps=10, alpha_on=0.5, t_on=0.8, t_off=0.1, eta=1.0)
    seen = []
    generate(FixedLogits(table), torch.tensor([[0]]), cfg, mask_id=MASK, eos_id=EOS,
             callback=lambda ev: seen.append(ev["x"][0, 1:].clone()))
    ts = np.linspace(1, 1e-5, 11)
    for i in range(1, 10):
        if 0.1 <= ts[i + 1] and ts[i] <= 0.8 and 0.1 <= ts[i] and ts[i + 1] <= 0.8:  # a full loop step
            prev, cur = seen[i - 1], seen[i]
            assert ((prev != MASK) <= (cur == MASK)).all()


def llada_first_commit_law(logits, temperature):
    """Independent float64 law of LLaDA's first step when it commits one token: x0_i ~ softmax(l_i / T)
    independently at every position, the committed position is the one whose x0 has the highest
    (untempered) softmax probability, and it keeps its x0. Exact, by enumerating every x0: [L, W]."""
    import itertools

    p_t, p_1 = softmax64(logits / temperature), softmax64(logits)
    L, W = p_t.shape
    law = np.zeros((L, W))
    for x0 in itertools.product(range(W), repeat=L):
        conf = [p_1[i, v] for i, v in enumerate(x0)]
        i = int(np.argmax(conf))
        law[i, x0[i]] += np.prod([p_t[k, v] for k, v in enumerate(x0)])
    return law


@pytest.mark.numerics
def test_llada_sampling_temperature_distribution():
    # one block, 1 token per step: the (position, token) committed at the first step against its exact law
    plen, L, T = 1, 4, 0.7
    table = make_table(plen, L, seed=7, sharp=1.0)
    x = first_step("llada", table, [0], L, 4, N_ROWS, temperature=T)
    committed = x != MASK
    assert (committed.sum(1) == 1).all()
    logits = table[plen:].double().numpy()[:, :MASK]  # MASK can never be drawn
    law = llada_first_commit_law(logits, T)
    emp = np.zeros_like(law)
    for i in range(L):
        emp[i] = np.bincount(x[committed[:, i], i], minlength=MASK)[:MASK] / N_ROWS
    assert_close_stat(emp, law, N_ROWS)
    # the test tells temperatures apart: greedy (T -> 0) and T = 1 are far outside these bounds
    for other in (0.05, 1.0):
        se = np.sqrt(law * (1 - law) / N_ROWS) + 1e-3
        assert (np.abs(llada_first_commit_law(logits, other) - law) > 5 * se).any(), other


def test_llada_random_remasking_is_uniform_over_the_block():
    table = make_table(1, 8, seed=1)
    x = first_step("llada", table, [0], 8, 8, N_ROWS, block_length=4, remasking="random")
    committed = x != MASK
    assert (committed.sum(1) == 1).all() and (committed[:, 4:] == 0).all()
    freq = committed[:, :4].mean(0)
    assert np.allclose(freq, 0.25, atol=5 * math.sqrt(0.25 * 0.75 / N_ROWS))


def test_llada_greedy_commits_most_confident_in_block():
    table = torch.full((1 + 8, V), -5.0)
    conf_logit = [1.0, 3.0, 2.0, 0.5, 9.0, 9.0, 9.0, 9.0]  # the second block is more confident but must wait
    for i, c in enumerate(conf_logit):
        table[1 + i, i % 4] = c
    x = first_step("llada", table, [0], 8, 4, 1, block_length=4)  # 2 tokens per step
    assert (x[0] != MASK).tolist() == [False, True, True, False, False, False, False, False]
    assert x[0, 1] == 1 and x[0, 2] == 2


def test_llada_conv_scales_confidence_by_window():
    # equal confidence everywhere: the position with the most decoded neighbours (next to the prompt) wins
    table = torch.zeros(3 + 8, V)
    table[:, 0] = 4.0
    x = first_step("llada_conv", table, [1, 2, 3], 8, 8, 1, kernel_size=5)
    assert (x[0] != MASK).tolist() == [True] + [False] * 7


def test_threshold_commits_at_least_one_and_equals_llada_at_one():
    torch.manual_seed(0)
    table = torch.randn(2 + 16, V)
    prompt = torch.tensor([[0, 1]])
    counts = []
    # the model is never certain (top probability well below 1), so threshold 1.0 commits only the
    # forced best token per step: one per step, as llada with steps = gen_length
    assert table.double().softmax(-1).max() < 0.9
    cfg_t = DecodeConfig(method="threshold", gen_length=16, steps=16, block_length=8, threshold=1.0)
    out_t = generate(FixedLogits(table), prompt, cfg_t, mask_id=MASK, eos_id=EOS,
                     callback=lambda ev: counts.append(int((ev["x"] != MASK).sum())))
    assert all(b - a >= 1 for a, b in zip([2] + counts, counts))
    cfg_l = DecodeConfig(method="llada", gen_length=16, steps=16, block_length=8)
    out_l = generate(FixedLogits(table), prompt, cfg_l, mask_id=MASK, eos_id=EOS)
    assert torch.equal(out_t.sequences, out_l.sequences) and out_t.nfe == out_l.nfe == 16
    # a low threshold commits many tokens per step: fewer forward passes
    cfg_low = DecodeConfig(method="threshold", gen_length=16, block_length=8, threshold=1e-6)
    assert generate(FixedLogits(table), prompt, cfg_low, mask_id=MASK, eos_id=EOS).nfe == 2


def test_cfg_combines_conditional_and_unconditional():
    class Guided(torch.nn.Module):
        def forward(self, x, attention_mask=None):
            cond = (x[:, :1] != MASK).float()  # 1 when the prompt is visible, 0 for the unconditional copy
            base = torch.zeros(x.shape[0], x.shape[1], V)
            base[..., 0] = 1.0 * cond  # cond: [1.0, 1.1] (token 1 wins); uncond: [0.0, 1.2]
            base[..., 1] = 1.2 - 0.1 * cond
            return base

    cfg = DecodeConfig(method="llada", gen_length=4, steps=4, cfg_scale=0.0)
    out0 = generate(Guided(), torch.tensor([[2]]), cfg, mask_id=MASK, eos_id=EOS)
    assert (out0.sequences[0, 1:] == 1).all() and out0.nfe == 4
    # w = 1: logits = un + 2 (cond - un) = [2.0, 1.0]: guidance flips the winner; two passes per step
    cfg = DecodeConfig(method="llada", gen_length=4, steps=4, cfg_scale=1.0)
    out1 = generate(Guided(), torch.tensor([[2]]), cfg, mask_id=MASK, eos_id=EOS)
    assert (out1.sequences[0, 1:] == 0).all() and out1.nfe == 8


# ------------------------------------------------------------------------------------------------
# invariants on a real tiny bidirectional Llama
@pytest.fixture(scope="module")
def tiny_llama():
    """In float64: the invariants below compare different kernel paths (left padding vs none, batch vs single,
    KV cache vs full pass) token for token. Their logits differ by ~1e-16 (float32: ~1e-7), and the decoder
    rounds them to float32, so a token or position can only flip where two candidates are within ~1e-12
    and a float32 rounding boundary falls between the two results: never in practice, on any CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, is_causal=False, use_cache=False)
    model = LlamaForCausalLM(cfg).double().eval()
    return model


TMASK, TEOS, TPAD = 39, 38, 37
ALL_METHODS = ["categorical", "topk", "conv", "semi_ar", "remdm", "remdm_conv", "llada", "llada_conv", "threshold"]


def _cfg(method, **kw):
    base = dict(method=method, gen_length=16, steps=8, top_k=3)
    if method in ("llada", "semi_ar", "threshold"):
        base["block_length"] = 8
    base.update(kw)
    return DecodeConfig(**base)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_no_mask_left_and_seed_determinism(tiny_llama, method):
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    a = generate(tiny_llama, prompt, _cfg(method), mask_id=TMASK, eos_id=TEOS)
    b = generate(tiny_llama, prompt, _cfg(method), mask_id=TMASK, eos_id=TEOS)
    assert torch.equal(a.sequences, b.sequences)
    assert not (a.sequences == TMASK).any()
    assert torch.equal(a.sequences[:, :4], prompt)
    # one pass per step (LLaDA's schedule: exactly `steps`); threshold: at least one token per pass, >= 1 per block
    if method == "threshold":
        assert 2 <= a.nfe <= 16
    elif method in ("llada", "llada_conv"):
        assert a.nfe == 8
    else:
        assert 1 <= a.nfe <= 8


@pytest.mark.parametrize("method", ["categorical", "topk", "conv", "remdm"])
def test_identical_prompts_get_independent_noise(tiny_llama, method):
    prompt = torch.tensor([[1, 2, 3, 4]]).repeat(8, 1)
    out = generate(tiny_llama, prompt, _cfg(method, top_k=None, temperature=1.0), mask_id=TMASK, eos_id=TEOS)
    rows = {tuple(r.tolist()) for r in out.sequences}
    assert len(rows) > 1
    other = generate(tiny_llama, prompt, _cfg(method, top_k=None, seed=1), mask_id=TMASK, eos_id=TEOS)
    assert not torch.equal(out.sequences, other.sequences)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.numerics
def test_batch_equals_single_with_left_padding(tiny_llama, method):
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]]
    plen = max(map(len, prompts))
    ids = torch.tensor([[TPAD] * (plen - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (plen - len(p)) + [1] * len(p) for p in prompts])
    seeds = [item_seed(0, f"item{i}") for i in range(3)]
    kw = dict(temperature=0.0) if method in ("categorical",) else {}
    cfg = _cfg(method, kernel_size=5, **kw)
    batch = generate(tiny_llama, ids, cfg, mask_id=TMASK, eos_id=TEOS, attention_mask=am, row_seeds=seeds)
    for i, p in enumerate(prompts):
        single = generate(tiny_llama, torch.tensor([p]), cfg, mask_id=TMASK, eos_id=TEOS, row_seeds=[seeds[i]])
        assert batch.sequences[i, plen:].tolist() == single.sequences[0, len(p):].tolist(), method


@pytest.mark.parametrize("method", ["llada", "llada_conv", "threshold", "topk"])
def test_cancelled_row_stops_and_the_other_rows_decode_as_alone(tiny_llama, method):
    """`generate(cancelled=)`: a row flagged after the second step leaves the forward pass, its masked
    positions become EOS, and the other row decodes what it decodes alone (the greedy llada steps that skip
    the per-step row check when every row commits alike must still ask `cancelled`)."""
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    seeds = [item_seed(0, "a"), item_seed(0, "b")]
    cfg = _cfg(method, threshold=1.0) if method == "threshold" else _cfg(method)  # threshold 1.0: one per step
    asked = []

    def cancelled():
        asked.append(1)
        return [False, len(asked) > 2]

    out = generate(tiny_llama, prompt, cfg, mask_id=TMASK, eos_id=TEOS, row_seeds=seeds, cancelled=cancelled)
    alone = generate(tiny_llama, prompt[:1], cfg, mask_id=TMASK, eos_id=TEOS, row_seeds=seeds[:1])
    assert len(asked) == out.steps_run and out.steps_run > 3
    assert torch.equal(out.sequences[0], alone.sequences[0])
    gen = out.sequences[1, 4:]
    assert not (gen == TMASK).any() and (gen == TEOS).sum() >= 16 - 2 * 4  # at most 2 steps of tokens
    assert out.row_passes < 2 * out.nfe


def test_eos_fill_saves_forward_passes():
    table = torch.full((1 + 16, V), -3.0)
    table[1:, EOS] = 3.0  # EOS everywhere, most confident
    table[1, EOS] = -3.0
    table[1, 0] = 5.0
    cfg = DecodeConfig(method="llada", gen_length=16, steps=16, eos_fill=True)
    out = generate(FixedLogits(table), torch.tensor([[0]]), cfg, mask_id=MASK, eos_id=EOS)
    assert out.nfe < 16
    gen = out.sequences[0, 1:].tolist()
    first = gen.index(EOS)
    assert all(t == EOS for t in gen[first:])


class PromptSwitch(torch.nn.Module):
    """Rows whose prompt starts with 0 see confident EOS everywhere (they finish at the first step);
    other rows see a flat distribution over the words. Records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, attention_mask=None):
        self.calls.append(x.shape[0])
        out = torch.zeros(x.shape[0], x.shape[1], V)
        out[:, :, EOS] = torch.where(x[:, :1] == 0, 8.0, -30.0)
        return out


@pytest.mark.parametrize("method", ["llada", "conv", "threshold", "semi_ar", "remdm"])
def test_finished_rows_leave_the_forward_pass(method):
    model = PromptSwitch()
    kw = dict(block_length=8) if method in ("llada", "threshold", "semi_ar") else {}
    cfg = DecodeConfig(method=method, gen_length=16, steps=16, eos_fill=True, top_k=2, **kw)
    prompts = torch.tensor([[0, 1], [1, 1], [2, 1]])
    seeds = [item_seed(3, i) for i in range(3)]
    out = generate(model, prompts, cfg, mask_id=MASK, eos_id=EOS, row_seeds=seeds)
    assert out.sequences[0, 2:].tolist() == [EOS] * 16
    assert not (out.sequences[1:, 2:] == EOS).any()  # EOS has probability ~0 in the other rows
    # the finished row leaves the batch (llada/threshold: after the first step) while the others go on
    assert model.calls[0] == 3 and max(model.calls[-2:]) <= 2
    if method in ("llada", "threshold"):
        assert model.calls.count(3) == 1
    assert out.row_passes == sum(model.calls) < 3 * out.nfe
    for i in range(3):
        single = generate(PromptSwitch(), prompts[i : i + 1], cfg, mask_id=MASK, eos_id=EOS, row_seeds=[seeds[i]])
        assert single.sequences[0].tolist() == out.sequences[i].tolist()


def test_conv_fill_pass_reports_unreached_positions():
    # K = 1: only positions whose own token is known could unmask: nothing can, all are filled by argmax
    table = make_table(1, 6, seed=0)
    cfg = DecodeConfig(method="conv", gen_length=6, steps=3, kernel_size=1)
    out = generate(FixedLogits(table), torch.tensor([[0]]), cfg, mask_id=MASK, eos_id=EOS)
    assert out.filled.tolist() == [6]
    logits = table[1:].clone()
    logits[:, MASK] = float("-inf")
    assert out.sequences[0, 1:].tolist() == logits.argmax(-1).tolist()


# ------------------------------------------------------------------------------------------------
# validation before any forward pass
class Exploding(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("forward must not run for an invalid config")


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(method="llada", gen_length=10, block_length=4), "block_length"),
        (dict(method="llada", gen_length=16, block_length=4, steps=6), "steps"),
        (dict(method="llada", gen_length=8, steps=16), "steps"),
        (dict(method="remdm", t_on=0.3, t_off=0.5), "t_off"),
        (dict(method="topk", top_k=0), "top_k"),
        (dict(method="beam"), "method"),
        (dict(method="conv", gen_length=200), "gen_length"),
        (dict(method="llada", remasking="lowest"), "remasking"),
        (dict(method="conv", threshold=0.9), "threshold"),
        (dict(method="llada_conv", gen_length=8, steps=16), "steps"),
        (dict(method="nucleus", repetition_penalty=1.2), "repetition_penalty"),
        (dict(method="nucleus", cfg_scale=1.0), "cfg_scale"),
    ],
)
def test_invalid_settings_fail_before_forward(kw, key):
    cfg = DecodeConfig(**kw)
    with pytest.raises(ConfigError) as e:
        generate(Exploding(), torch.tensor([[0, 1]]), cfg, mask_id=MASK, eos_id=EOS, max_length=128)
    assert e.value.key == key
    assert "\n" not in str(e.value)
    if cfg.method == "nucleus":  # names what is allowed
        assert "nucleus" in str(e.value) and "off" in str(e.value)


def test_item_seed_is_stable():
    assert item_seed(0, "a") == item_seed(0, "a")
    assert item_seed(0, "a") != item_seed(1, "a") != item_seed(0, "b")
    assert 0 <= item_seed(0, "a") < 2**63


# ------------------------------------------------------------------------------------------------
# approximate KV cache (prefix / dual) on the native Llama path
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.numerics
def test_cached_window_logits_equal_full_forward_right_after_refresh(tiny_llama, mode):
    from difflm.decoding.cache import BlockCache

    torch.manual_seed(0)
    x = torch.randint(0, 30, (2, 20))
    am = torch.tensor([[0, 0] + [1] * 18, [1] * 20])
    kv = BlockCache(tiny_llama, mode)
    lo, hi = 8, (12 if mode == "dual" else 20)
    full = kv.full(x, am, lo, hi)
    part = kv.step(x)
    # float64 (tiny_llama): measured difference 0.0; 1e-12 leaves room for another summation order only
    assert torch.allclose(part, full[:, lo:hi], atol=1e-12, rtol=0)
    part2 = kv.step(x)  # the cache was cropped back: the same again
    assert torch.allclose(part2, part, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["llada", "threshold", "semi_ar"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.numerics
def test_cache_refreshed_every_step_gives_uncached_tokens(tiny_llama, method, mode):
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    ids = torch.tensor([[TPAD] * (6 - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (6 - len(p)) + [1] * len(p) for p in prompts])
    base = _cfg(method, threshold=0.3 if method == "threshold" else None)
    plain = generate(tiny_llama, ids, base, mask_id=TMASK, eos_id=TEOS, attention_mask=am)
    import dataclasses

    every = dataclasses.replace(base, cache=mode, cache_refresh=1)
    cached = generate(tiny_llama, ids, every, mask_id=TMASK, eos_id=TEOS, attention_mask=am)
    assert torch.equal(plain.sequences, cached.sequences) and plain.nfe == cached.nfe
    # per-block refresh (the fast setting) still decodes every position and counts its passes
    fast = generate(tiny_llama, ids, dataclasses.replace(base, cache=mode), mask_id=TMASK, eos_id=TEOS, attention_mask=am)
    assert not (fast.sequences == TMASK).any() and fast.nfe == plain.nfe


def test_cache_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError) as e:
        DecodeConfig(method="conv", cache="prefix").validate()
    assert e.value.key == "cache"
    with pytest.raises(ConfigError):
        DecodeConfig(method="llada", cache="dual", cfg_scale=1.0).validate()


def test_llada_conv_with_threshold_commits_at_least_one_per_step():
    torch.manual_seed(1)
    table = torch.randn(2 + 16, V) * 3
    prompt = torch.tensor([[0, 1]])
    seen = []
    cfg = DecodeConfig(method="llada_conv", gen_length=16, steps=16, kernel_size=5, threshold=0.5)
    out = generate(FixedLogits(table), prompt, cfg, mask_id=MASK, eos_id=EOS,
                   callback=lambda ev: seen.append(int((ev["x"] != MASK).sum())))
    assert all(b - a >= 1 for a, b in zip([2] + seen, seen)) and not (out.sequences == MASK).any()
    # threshold 1.0 on a model that is never certain commits exactly one token per step: the conv-scaled
    # most confident one
    assert table.double().softmax(-1).max() < 0.999
    one = generate(FixedLogits(table), prompt, DecodeConfig(method="llada_conv", gen_length=16, steps=16,
                   kernel_size=5, threshold=1.0), mask_id=MASK, eos_id=EOS)
    plain = generate(FixedLogits(table), prompt, DecodeConfig(method="llada_conv", gen_length=16, steps=16,
                     kernel_size=5), mask_id=MASK, eos_id=EOS)
    assert torch.equal(one.sequences, plain.sequences) and one.nfe == 16


@pytest.mark.numerics
def test_diffusionlm_asks_for_the_generated_positions_only(tiny_native_llada_dir):
    """logits_to_keep on the native LLaDA path: the same tokens as slicing the full logits."""
    from difflm.models import load_model

    m = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu")
    assert m._head_keeps_logits()
    x = torch.randint(0, 150, (2, 12))
    # the output head over 5 rows or all 12 is another GEMM: float32 differs by ~1e-7 (logits ~1)
    assert torch.allclose(m(x, logits_to_keep=5), m(x)[:, -5:], atol=1e-5)
    m.module.double()  # tokens compared across the two paths: float64, as in tiny_llama
    prompt = torch.randint(0, 150, (2, 6))
    for method in ("conv", "llada"):
        cfg = DecodeConfig(method=method, gen_length=16, steps=8, top_k=1, kernel_size=5)
        a = generate(m, prompt, cfg)  # DiffusionLM: logits_to_keep
        b = generate(m.module, prompt, cfg, mask_id=m.ids.mask_id, eos_id=m.ids.eos_id)  # bare module: sliced
        assert torch.equal(a.sequences, b.sequences), method


# -- nucleus (AR reference decoding) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ar64(tmp_path_factory):
    """The tiny causal Llama in float64: batch-vs-single (padded) kernel paths differ only in the last bits
    (~1e-15), so a sampled token could flip only if a row's uniform draw lands within ~1e-12 of a CDF
    boundary, and a greedy token only if its top-1/top-2 margin is that small (astronomically unlikely)."""
    from difflm.models import load_model
    from difflm.testing import build_tiny_ar

    return load_model(str(build_tiny_ar(tmp_path_factory.mktemp("ar"))), dtype=torch.float64, device="cpu")


def _left_pad(prompts, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _nucleus_rows(model, prompts, seeds, **kw):
    """The generated tokens of each row of one batched nucleus run (left padding), as lists."""
    cfg = DecodeConfig(method="nucleus", gen_length=12, **kw)
    ids, mask = _left_pad(prompts, model.ids.pad_id)
    out = generate(model, ids, cfg, attention_mask=mask, row_seeds=seeds)
    assert out.prompt_length == ids.shape[1] and out.sequences.shape == (len(prompts), ids.shape[1] + 12)
    assert 1 <= out.nfe <= 12 and out.row_passes == out.nfe * len(prompts)
    return [r.tolist() for r in out.sequences[:, ids.shape[1]:]], out


def test_nucleus_row_depends_only_on_its_own_seed_and_prompt(tiny_ar64):
    """The same prompt and seed give the same sample alone, at every position of a batch of 3, and next to
    prompts of other lengths (left padding); transformers' generate seeded one global RNG per batch."""
    m = tiny_ar64
    p, s = [10, 11, 12, 13], 1234
    others = [[20, 21], [30, 31, 32, 33, 34, 35, 36]]  # shorter and longer: p is left-padded or pads others
    kw = dict(temperature=1.0, top_p=0.9)
    (alone,), _ = _nucleus_rows(m, [p], [s], **kw)
    for pos in range(3):
        prompts, seeds = list(others), [7, 8]
        prompts.insert(pos, p)
        seeds.insert(pos, s)
        rows, _ = _nucleus_rows(m, prompts, seeds, **kw)
        assert rows[pos] == alone, pos
    same, _ = _nucleus_rows(m, [p, p, p], [s, s + 1, s + 2], **kw)  # identical prompts in one batch
    assert same[0] == alone and len({tuple(r) for r in same}) == 3  # different seeds -> different samples
    again, _ = _nucleus_rows(m, [p], [s], **kw)
    assert again[0] == alone  # reproducible


def test_nucleus_samples_from_the_nucleus_and_temperature_zero_is_greedy(tiny_ar64):
    """Greedy (temperature 0, or top_p 0) equals an independent uncached argmax loop; a sampled token always
    lies in the top-p nucleus of its step's temperature-scaled distribution (full, uncached forward)."""
    m = tiny_ar64
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44, 45]]

    def reference_step(prefix):
        with torch.no_grad():
            return m.module(input_ids=torch.tensor([prefix])).logits[0, -1]

    greedy, _ = _nucleus_rows(m, prompts, [1, 2], temperature=0.0)
    top_p0, _ = _nucleus_rows(m, prompts, [3, 4], temperature=1.0, top_p=0.0)  # the nucleus is one token
    for p, g, t in zip(prompts, greedy, top_p0):
        prefix, expected = list(p), []
        for _ in range(12):
            tok = int(reference_step(prefix).argmax())
            expected.append(tok)
            prefix.append(tok)
            if tok in (m.ids.eos_id, m.ids.eot_id):
                break
        expected += [m.ids.eos_id] * (12 - len(expected))
        assert g == expected and t == expected
    temperature, top_p = 0.7, 0.5
    rows, _ = _nucleus_rows(m, prompts, [5, 6], temperature=temperature, top_p=top_p)
    for p, r in zip(prompts, rows):
        prefix = list(p)
        for tok in r:
            probs = (reference_step(prefix) / temperature).softmax(-1)
            order = probs.argsort(descending=True)
            mass_before = probs[order].cumsum(0) - probs[order]
            nucleus = set(order[mass_before < top_p].tolist())
            assert tok in nucleus
            prefix.append(tok)
            if tok in (m.ids.eos_id, m.ids.eot_id):
                break


@pytest.mark.parametrize("method", ["threshold", "llada_conv"])
@pytest.mark.parametrize("tau", [1.5, 1.0000001, 0.0, -0.2, float("nan"), float("inf")])
def test_threshold_outside_zero_one_fails_before_forward(method, tau):
    cfg = DecodeConfig(method=method, gen_length=16, steps=16, block_length=8 if method == "threshold" else None,
                       threshold=tau)
    with pytest.raises(ConfigError) as e:
        generate(Exploding(), torch.tensor([[0, 1]]), cfg, mask_id=MASK, eos_id=EOS, max_length=128)
    assert e.value.key == "threshold" and "(0, 1]" in str(e.value) and str(tau) in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tau", [1.0, 0.5, 1e-9])
def test_threshold_inside_zero_one_is_allowed(tau):
    DecodeConfig(method="threshold", threshold=tau).validate()
    DecodeConfig(method="llada_conv", gen_length=16, steps=16, threshold=tau).validate()


# ------------------------------------------------------------------------------------------------
# README promises: decoded positions stay, the conv window, penalties and guidance, validation
@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m not in ("remdm", "remdm_conv")])
def test_decoded_positions_never_change(tiny_llama, method):
    """Without ReMDM's remasking (and eos_fill off), a position once decoded keeps its token to the end."""
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    seen = [torch.cat([prompt, torch.full((2, 16), TMASK)], 1)]
    cfg = _cfg(method, temperature=1.0, eos_fill=False, kernel_size=5)
    out = generate(tiny_llama, prompt, cfg, mask_id=TMASK, eos_id=TEOS, callback=lambda ev: seen.append(ev["x"].clone()))
    seen.append(out.sequences)
    assert len(seen) > 3
    for prev, cur in zip(seen, seen[1:]):
        known = prev != TMASK
        assert torch.equal(cur[known], prev[known]), method
    assert not (out.sequences == TMASK).any()


def test_remdm_conv_keeps_positions_without_known_neighbours_masked():
    """remdm_conv scales unmasking by the conv window: at the first step (prompt [0], K = 3) only the position
    next to the prompt has a known token in its window (s_i > 0); every other position stays MASK, while plain
    remdm unmasks them too."""
    table = make_table(1, 16, seed=4)
    kw = dict(kernel_size=3, top_k=2)
    x_conv = first_step("remdm_conv", table, [0], 16, 10, 400, **kw)
    x_plain = first_step("remdm", table, [0], 16, 10, 400, **kw)
    assert (x_conv[:, 1:] == MASK).all()
    assert (x_conv[:, 0] != MASK).mean() > 0.5  # C = |M| / sum s_i q_i lifts the one open position (p ~ 0.8)
    # plain remdm: alpha 0 -> 0.2 at the first step, every position unmasks with p ~ 0.2 (~80 of 400 rows each)
    assert ((x_plain[:, 1:] != MASK).sum(0) > 20).all()




def test_nucleus_defaults_still_validate():
    DecodeConfig(method="nucleus", gen_length=16).validate()
    DecodeConfig(method="nucleus", repetition_penalty=1.0, cfg_scale=0.0).validate()


def test_conv_kernel_default_is_block_length_else_a_quarter_of_gen_length():
    assert DecodeConfig(method="conv", gen_length=64, block_length=16).effective_kernel_size() == 17
    assert DecodeConfig(method="conv", gen_length=64, block_length=8).effective_kernel_size() == 9  # not 64/4
    assert DecodeConfig(method="conv", gen_length=64).effective_kernel_size() == 17  # 64 / 4 = 16 -> 17
    assert DecodeConfig(method="conv", gen_length=64, kernel_size=9).effective_kernel_size() == 9
    assert DecodeConfig(method="conv", gen_length=60).effective_kernel_size() == 15  # odd: kept


def test_repetition_penalty_steers_away_from_present_tokens():
    """Token 0 wins everywhere and is in the prompt: with penalty 10 the greedy llada decoder avoids it, and
    every token it decodes is penalised in turn (0 -> 0.3 < 1.0, 0.9, 0.8); with penalty 1 it picks 0."""
    table = torch.full((1 + 3, V), -2.0)
    table[:, 0], table[:, 1], table[:, 2], table[:, 3] = 3.0, 1.0, 0.9, 0.8
    prompt = torch.tensor([[0]])
    cfg = DecodeConfig(method="llada", gen_length=3, steps=3, repetition_penalty=10.0)
    out = generate(FixedLogits(table), prompt, cfg, mask_id=MASK, eos_id=EOS)
    assert out.sequences[0, 1:].tolist() == [1, 2, 3]
    cfg = DecodeConfig(method="llada", gen_length=3, steps=3, repetition_penalty=1.0)
    out = generate(FixedLogits(table), prompt, cfg, mask_id=MASK, eos_id=EOS)
    assert out.sequences[0, 1:].tolist() == [0, 0, 0]


class GuidedCounting(torch.nn.Module):
    """cond (prompt visible): token 1 wins (1.0 vs 1.1); uncond (prompt masked): [0.0, 1.2]. With w = 1 the
    guided logits are un + 2 (cond - un) = [2.0, 1.0]: token 0 wins by a clear margin. Records batch sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, attention_mask=None):
        self.calls.append(x.shape[0])
        cond = (x[:, :1] != MASK).float()
        base = torch.full((x.shape[0], x.shape[1], V), -4.0)
        base[..., 0] = 1.0 * cond
        base[..., 1] = 1.2 - 0.1 * cond
        return base


DIFFUSION_METHODS = ALL_METHODS  # every diffusion decoder supports cfg_scale (only `cache` refuses it)


@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_cfg_runs_two_passes_per_step_and_changes_the_tokens(method):
    kw = dict(method=method, gen_length=4, steps=4, temperature=0.0, top_k=1, kernel_size=3)
    if method == "semi_ar":
        kw["block_length"] = 2
    outs = {}
    for w in (0.0, 1.0):
        model = GuidedCounting()
        out = generate(model, torch.tensor([[2]]), DecodeConfig(cfg_scale=w, **kw), mask_id=MASK, eos_id=EOS)
        # a step whose input did not change reuses the last logits (forward_reuse): nfe counts the real passes
        assert out.nfe == (2 if w else 1) * len(model.calls) == (2 if w else 1) * out.forward_steps
        assert out.forward_steps + out.reused_steps == out.steps_run
        assert all(c == (2 if w else 1) for c in model.calls)  # cond + uncond copies in one pass
        if method in ("llada", "llada_conv"):
            assert out.steps_run == 4
        outs[w] = out.sequences[0, 1:].tolist()
    assert outs[0.0] == [1] * 4 and outs[1.0] == [0] * 4, outs


def _near_tie_logits(b=3, n=16, v=512, seed=0):
    """[b, n, v] float32 logits whose positions' float64 confidences differ by ~1e-10 relative (far below
    float32 resolution): each position is one base row with one small logit bumped up by (n - j) ulps, so
    the float64 order is the position order reversed (position n - 1 the most confident)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, v, generator=g) * 2
    base[..., 0] = base.amax(-1) + 3  # one clear argmax, token 0
    logits = base.repeat(1, n, 1)
    k = 7  # not a special id of this module (MASK, EOS)
    for j in range(n):
        val = logits[:, j, k].clone()
        for _ in range(n - j):
            val = torch.nextafter(val, torch.full_like(val, float("inf")))
        logits[:, j, k] = val
    return logits


@pytest.mark.parametrize("path", ["float32-first", "small-float64"])
def test_greedy_commit_float32_path_makes_the_float64_decision(monkeypatch, path):
    """The float32-first commit equals the float64 one where float32 cannot see the difference (near-ties
    ~1e-10 apart): top-k, threshold (tau between two float64 confidences) and a conv scale. A float32-only
    decision picks other positions here (checked), so a missing float64 recomputation fails this test.
    The small-work path (float64 softmax directly) must make the same decision."""
    monkeypatch.setattr(S, "GREEDY_EXACT_BELOW", 0 if path == "float32-first" else 1 << 30)
    logits = _near_tie_logits()
    b, n, _ = logits.shape
    region = torch.ones(b, n, dtype=torch.bool)
    region[1, 10:] = False  # a row with a smaller region
    exact_conf = S._region_max(logits, region, with_confidence=True, exact=True)[1]
    assert (exact_conf[region] > 0).all()
    counts = torch.tensor([3, 2, 5])
    scale = torch.ones(b, n, dtype=torch.float64)
    scale[2, :4] = 0.0  # llada_conv: no known token in the window
    for kw in (dict(counts=counts), dict(counts=counts, scale=scale), dict(tau=float(exact_conf[0, 8])),
               dict(tau=2.0)):  # tau above 1: only the most confident of each row
        with monkeypatch.context() as mp:
            mp.setattr(S, "GREEDY_EXACT_BELOW", 0)
            x0_e, sel_e = S.greedy_commit(logits, region, exact=True, **kw)
        x0_f, sel_f = S.greedy_commit(logits, region, **kw)
        assert torch.equal(sel_f, sel_e), kw
        assert torch.equal(x0_f[sel_e], x0_e[sel_e]) and (x0_e[sel_e] == 0).all() and sel_e.any()
    # the float64 decision is the reversed position order; float32 alone cannot make it
    _, sel = S.greedy_commit(logits, region, counts=counts, exact=True)
    assert sel[0, -3:].all() and sel[0].sum() == 3 and sel[1, 8:10].all()
    approx = S._region_max(logits, region, with_confidence=True, exact=False)[1]
    naive = S.commit_top(torch.where(region, approx, torch.full_like(approx, float("-inf"))), counts)
    assert not torch.equal(naive, sel)


@pytest.mark.parametrize("b", [1, 3])
def test_greedy_commit_at_ranks_in_float32_only_where_that_is_certain(monkeypatch, b):
    """The uniform small path (every row: the same number of masked positions, the same count to commit)
    ranks by a float32 softmax and commits what float64 commits: on near-ties float32 cannot order (~1e-10
    apart) it ranks again in float64 (a float32-only ranking picks other positions here: checked), on clearly
    separated confidences (or near-ties a conv scale pulls apart) it stays in float32 (no float64 softmax);
    all / none committed need no ranking."""
    exact_calls = []
    real = S._max_prob
    monkeypatch.setattr(S, "_max_prob", lambda z, scale, flat, exact: exact_calls.append(exact) or real(z, scale, flat, exact))
    ties = _near_tie_logits(b=b, n=12, v=256, seed=4)
    clear = ties.clone()
    clear[:, :, 3] = torch.arange(12, dtype=torch.float32) * 0.5 + clear.amax(-1)[:, :1] - 2.0  # p(x0) apart
    region = torch.zeros(b, 12, dtype=torch.bool)
    region[:, 2:10] = True  # 8 masked positions per row
    rows, cols = region.nonzero(as_tuple=True)
    counts = torch.full((b,), 3)
    for logits, certain in ((ties, False), (clear, True)):
        for scale in (None, torch.linspace(0.5, 1.0, 12, dtype=torch.float64).expand(b, 12)):
            exact_calls.clear()
            vals = S.greedy_commit_at(logits, rows, cols, MASK, counts=counts, kmax=3, per_row=8, scale=scale)
            x0, sel = S.greedy_commit(logits, region, counts=counts, scale=scale, exact=True)
            got = torch.full((b, 12), MASK)
            got[rows, cols] = vals
            assert torch.equal(got, torch.where(sel, x0, torch.full_like(x0, MASK))), (certain, scale)
            assert (True in exact_calls) == (not certain and scale is None), exact_calls
    _, sel = S.greedy_commit(ties, region, counts=counts, exact=True)
    approx = S._max_prob(ties[rows, cols], None, cols, exact=False).view(b, 8)
    naive = torch.sort(approx, dim=1, descending=True, stable=True).indices[:, :3] + 2
    assert not torch.equal(naive, sel.nonzero(as_tuple=True)[1].view(b, 3))
    exact_calls.clear()
    assert (S.greedy_commit_at(ties, rows, cols, MASK, kmax=0, per_row=8) == MASK).all()
    everything = S.greedy_commit_at(ties, rows, cols, MASK, kmax=8, per_row=8)
    assert torch.equal(everything, ties[rows, cols].argmax(-1)) and exact_calls == []


def test_threshold_on_the_host_decides_only_what_the_bound_certifies():
    """One row's threshold commit on the host (`_threshold_host`): every confidence >= tau, else the first most
    confident; with an error bound, None (recompute in float64) where a confidence's interval holds tau or the
    top two overlap; the same decisions as `commit_threshold` where it answers."""
    cases = [([0.5, 0.95, 0.91], 0.9), ([0.3, 0.5, 0.2], 0.9), ([0.5, 0.5, 0.1], 0.9), ([0.9, 0.2], 0.9)]
    for conf, tau in cases:
        want = S.commit_threshold(torch.tensor([conf], dtype=torch.float64), tau)[0].nonzero().squeeze(1).tolist()
        assert S._threshold_host(conf, tau, 0.0) == want, conf
    assert S._threshold_host([0.5, 0.95, 0.91], 0.9, 1e-3) == [1, 2]
    assert S._threshold_host([0.3, 0.5, 0.2], 0.9, 1e-3) == [1]
    assert S._threshold_host([0.5, 0.9001, 0.2], 0.9, 1e-3) is None  # 0.9001 within the bound of tau
    assert S._threshold_host([0.5, 0.4999, 0.2], 0.9, 1e-3) is None  # the top two within the bound
    assert S._threshold_host([0.5, 0.5, 0.1], 0.9, 0.0) == [0]  # a tie: the first maximum, as argmax


@pytest.mark.parametrize("exact_below", [0, 1 << 30])
def test_greedy_llada_batch_equals_float64_commit_on_a_tie_heavy_model(monkeypatch, exact_below):
    """generate's llada / threshold / llada_conv (greedy) commit what the float64 confidences decide:
    rows that are one base row with ulp-sized bumps, through the whole loop (float32-first path and the
    small-work paths: float32-ranked for llada and llada_conv, float64 for threshold)."""
    monkeypatch.setattr(S, "GREEDY_EXACT_BELOW", exact_below)
    monkeypatch.setattr(S, "GREEDY_GATHER_BELOW", exact_below)
    table = _near_tie_logits(b=1, n=18, v=64, seed=2)[0]
    table[:, MASK] = float("-inf")
    assert table.double().softmax(-1).max() < 0.99  # no position is certain: threshold 1.0 commits one per step

    class Fixed(torch.nn.Module):
        def forward(self, x, attention_mask=None):
            return table[None, : x.shape[1]].expand(x.shape[0], -1, -1).clone()

    prompt = torch.tensor([[1, 2]])
    for cfg in (DecodeConfig(method="llada", gen_length=16, steps=8, block_length=8),
                DecodeConfig(method="threshold", gen_length=16, block_length=8, threshold=1.0),
                DecodeConfig(method="llada_conv", gen_length=16, steps=4, kernel_size=5)):
        order = []
        generate(Fixed(), prompt, cfg, mask_id=MASK, eos_id=EOS,
                 callback=lambda ev: order.append((ev["x"][0, 2:] != MASK).nonzero().squeeze(1).tolist()))
        first = order[0]
        if cfg.method == "llada":  # 2 per step, the float64 order inside the block: its last positions
            assert first == [6, 7], first
        elif cfg.method == "threshold":  # nothing reaches 1.0: one per step, the most confident of block 1
            assert first == [7], first


def test_every_method_is_one_registry_line_with_a_runner():
    from difflm.decoding import config as C
    from difflm.decoding.methods import REGISTRY

    assert C.METHODS == tuple(REGISTRY)
    assert C.DecodeConfig.__dataclass_fields__["method"].metadata["choices"] == list(REGISTRY)
    for name, m in REGISTRY.items():
        assert m.name == name and m.kind in ("mass", "confidence", "ar")
        assert (m.runner is None) == (m.kind == "ar"), name
    assert set(C.CONV_METHODS) == {"conv", "llada_conv", "remdm_conv"}
    assert set(C.BLOCK_METHODS) == {"llada", "semi_ar", "threshold"}


@pytest.mark.parametrize("narrow_from", [0, 1 << 40])
@pytest.mark.parametrize("exact_below", [0, 1 << 30])
def test_greedy_block_decoding_asks_for_the_logits_from_the_block_start(monkeypatch, exact_below, narrow_from):
    """Greedy llada / threshold read the logits from the first masked position of the current block on: a
    model that takes `logits_to_keep` is asked for at most L - block_start positions, and the tokens equal those of the same
    model asked for every position (the logits of a position do not depend on how many are kept, so the
    tokens must be identical; a misaligned window commits other tokens). Batch 3, so the per-row paths run;
    both commit paths (float32-first and small-work float64), with and without the per-step narrowing to the
    first masked position (llada_conv too: its window is the whole answer)."""
    from difflm.decoding import loop

    monkeypatch.setattr(S, "GREEDY_EXACT_BELOW", exact_below)
    monkeypatch.setattr(S, "GREEDY_GATHER_BELOW", exact_below)
    monkeypatch.setattr(loop, "_NARROW_EACH_STEP_FROM", narrow_from)
    v = 40
    table = torch.randn(7, v, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    class Lookup(torch.nn.Module):  # position i's logits: a table row chosen by its left neighbour, scaled by i
        def __init__(self, keeps):
            super().__init__()
            self.keeps, self.accepts_logits_to_keep = keeps, keeps is not None

        def forward(self, x, attention_mask=None, logits_to_keep=None):
            out = table[(x.roll(1, 1) % 7)] * (1 + torch.arange(x.shape[1], dtype=torch.float64)[:, None] / 10)
            out[..., MASK] = float("-inf")
            if logits_to_keep:
                self.keeps.append(logits_to_keep)
                out = out[:, -logits_to_keep:]
            return out

    prompt = torch.tensor([[1, 2, 3], [4, 5, 6], [2, 2, 2]])
    for cfg in (DecodeConfig(method="llada", gen_length=16, steps=8, block_length=8),
                DecodeConfig(method="threshold", gen_length=16, block_length=8, threshold=0.5),
                DecodeConfig(method="llada", gen_length=16, steps=8, block_length=8, eos_fill=True),
                DecodeConfig(method="llada_conv", gen_length=16, steps=8, kernel_size=5)):
        keeps: list[int] = []
        narrow = generate(Lookup(keeps), prompt, cfg, mask_id=MASK, eos_id=EOS).sequences
        full = generate(Lookup(None), prompt, cfg, mask_id=MASK, eos_id=EOS).sequences
        assert torch.equal(narrow, full), cfg
        if cfg.method == "llada_conv":  # one window: narrowed as its left positions are decoded, or not
            assert keeps[0] == 16 and (min(keeps) < 16) == (narrow_from == 0), keeps
        else:  # block 1 from position 0 on, block 2 from its start (8) or its first masked position on
            assert keeps[0] == 16 and 8 in keeps and all(k <= 8 for k in keeps[keeps.index(8):]), keeps
            assert (min(keeps) < 8) == (narrow_from == 0), keeps


def test_chunked_logsumexp_equals_the_whole_one():
    """`steps._logsumexp_rows` takes large inputs a few rows at a time: the same values as one logsumexp
    (each row's reduction is unchanged), chunks not aligned to the rows of a batch included."""
    from difflm.decoding import steps as S

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 77, 20_000, generator=g) * 4  # 4.6M logits >= LSE_CHUNK_FROM, 52 rows per chunk
    assert x.numel() >= S.LSE_CHUNK_FROM and (77 * 3) % (S.LSE_CHUNK // 20_000) != 0
    whole = torch.logsumexp(x, dim=-1, keepdim=True)
    got = S._logsumexp_rows(x)
    assert got.shape == whole.shape
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)  # the same reduction per row; 1e-5: any kernel
    ref = torch.logsumexp(x.double(), dim=-1, keepdim=True)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4)
