"""Training losses by hand: diffusion SFT (1/t weight, answer-length normalisation, EOS policies),
AR, the R2FT corruption rule and loss, the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from difflm.training.losses import (
    answer_length,
    apply_mask,
    ar_loss,
    diffusion_loss,
    example_generator,
    log_probs,
    sample_diffusion_noise,
    seed_for,
    sft_batch_loss,
)
from difflm.training.loop import lr_factor
from difflm.training.r2ft import corrupt, r2ft_batch_loss, r2ft_loss

V, MASK, EOS = 12, 11, 10



def _hand_logp(row_logits: torch.Tensor, token: int, mask_id: int | None = MASK) -> float:
    """log p(token) with the MASK logit removed, computed with Python floats."""
    vals = [float(v) for i, v in enumerate(row_logits) if i != mask_id]
    m = max(vals)
    lse = m + math.log(sum(math.exp(v - m) for v in vals))
    return float(row_logits[token]) - lse


@pytest.mark.numerics
def test_diffusion_loss_equals_hand_computation_on_a_fixed_mask():
    g = torch.Generator().manual_seed(0)
    B, L = 2, 10
    logits = torch.randn(B, L, V, generator=g)
    x0 = torch.randint(0, 10, (B, L), generator=g)
    masked = torch.zeros(B, L, dtype=torch.bool)
    masked[0, [1, 3, 4, 8]] = True  # 1 is in the prompt region? no: loss region below starts at 3
    masked[1, [2, 5, 9]] = True
    t = torch.tensor([0.25, 0.8])
    start, end = torch.tensor([3, 2]), torch.tensor([9, 6])
    got = diffusion_loss(logits, x0, masked, t, start, end, MASK)
    want = []
    for b in range(B):
        total = 0.0
        for i in range(L):
            if masked[b, i] and start[b] <= i < end[b]:
                total += -_hand_logp(logits[b, i], int(x0[b, i]))
        want.append(total / (float(t[b]) * int(end[b] - start[b])))
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    # position 1 of row 0 is masked but outside the loss region; position 9 of row 1 too: no effect
    logits2 = logits.clone()
    logits2[0, 1] += 5.0
    logits2[1, 9] -= 3.0
    assert torch.allclose(diffusion_loss(logits2, x0, masked, t, start, end, MASK), got)


def test_log_probs_excludes_the_mask_token_and_is_float32():
    logits = torch.randn(3, V, dtype=torch.bfloat16)
    lp = log_probs(logits, MASK)
    assert lp.dtype == torch.float32
    assert torch.isneginf(lp[:, MASK]).all()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3))


@pytest.mark.numerics
@pytest.mark.parametrize("policy", ["all", "first", "none"])
def test_eos_policies_mask_and_weight_what_they_say(policy):
    L, p, r = 16, 4, 5  # [prompt 0..3 | response 4..8 | EOS 9..15]
    a = answer_length(p, r, L, policy, has_eos=True)
    assert a == {"all": L - p, "first": r + 1, "none": r}[policy]
    x0 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9] + [EOS] * 7])
    batch = {"input_ids": x0, "prompt_len": torch.tensor([p]), "answer_len": torch.tensor([a])}
    logits = torch.zeros(1, L, V, requires_grad=True)
    # noise: the prompt is never masked, everything after it may be (also EOS outside the answer)
    for k in range(50):
        t, masked = sample_diffusion_noise((1, L), [p], [example_generator(7, k)])
        assert not masked[0, :p].any()
    masked = torch.ones(1, L, dtype=torch.bool)
    masked[0, :p] = False
    t = torch.tensor([0.5])
    loss = diffusion_loss(logits, x0, masked, t, torch.tensor([p]), torch.tensor([p + a]), MASK)
    loss.sum().backward()
    trained = (logits.grad.abs().sum(-1) > 0)[0]
    assert trained.tolist() == [p <= i < p + a for i in range(L)]
    # the weight of each trained token is 1 / (t * answer length): d(-log softmax_y)/d logit_y = -(1 - 1/(V-1))
    expected = -(1 - 1 / (V - 1)) / (0.5 * a)
    for i in range(p, p + a):
        assert float(logits.grad[0, i, x0[0, i]]) == pytest.approx(expected, rel=1e-5)
    if policy == "first":
        assert x0[0, p + a - 1] == EOS and x0[0, p + a - 2] != EOS  # exactly the first EOS is in
    if policy == "none":
        assert (x0[0, p : p + a] != EOS).all()
    del batch


def test_answer_length_without_room_for_eos():
    assert answer_length(4, 12, 16, "first", has_eos=False) == 12
    assert answer_length(4, 12, 16, "all", has_eos=False) == 12


def test_sft_batch_loss_replays_its_noise_and_prompt_is_never_masked():
    g = torch.Generator().manual_seed(1)
    B, L = 3, 12
    x0 = torch.randint(0, 10, (B, L), generator=g)
    batch = {"input_ids": x0, "prompt_len": torch.tensor([2, 3, 4]), "answer_len": torch.tensor([5, 9, 8])}
    seen = {}
    weight = torch.randn(V, V, generator=g)

    def forward(ids):
        seen["x_t"] = ids.clone()
        return torch.nn.functional.one_hot(ids, V).float() @ weight

    loss, stats = sft_batch_loss(forward, batch, [10, 11, 12], seed=5, mask_id=MASK, eps=1e-3)
    gens = [example_generator(5, "train", k) for k in (10, 11, 12)]
    t, masked = sample_diffusion_noise((B, L), batch["prompt_len"], gens, 1e-3)
    assert torch.equal(seen["x_t"], apply_mask(x0, masked, MASK))
    for b in range(B):
        assert not masked[b, : int(batch["prompt_len"][b])].any()
    logits = forward(apply_mask(x0, masked, MASK))
    start = batch["prompt_len"]
    want = diffusion_loss(logits, x0, masked, t, start, start + batch["answer_len"], MASK)
    assert torch.allclose(stats["loss"], want) and float(loss) == pytest.approx(float(want.mean()))
    # the same stream positions give the same noise whatever the batch they sit in
    _, stats1 = sft_batch_loss(forward, {k: v[1:2] for k, v in batch.items()}, [11], seed=5, mask_id=MASK)
    assert float(stats1["loss"][0]) == pytest.approx(float(stats["loss"][1]))


@pytest.mark.numerics
def test_ar_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 8, V, generator=g)
    x0 = torch.randint(0, V, (2, 8), generator=g)
    got = ar_loss(logits, x0, torch.tensor([3, 0]), torch.tensor([6, 4]))
    want = []
    for b, (s, e) in enumerate([(3, 6), (1, 4)]):  # a target at 0 has no context: starts at 1
        want.append(sum(-_hand_logp(logits[b, i - 1], int(x0[b, i]), None) for i in range(s, e)) / (e - s))
    assert got.tolist() == pytest.approx(want, rel=1e-6)


# -- R2FT -----------------------------------------------------------------------------------------------
def _find_period(span: list[int], phrase_source: list[int], eos_at: int):
    """(g, phase) such that span (EOS position excepted) cycles through phrase_source[-g:]."""
    for g in range(1, 15):
        phrase = phrase_source[-g:]
        if len(phrase) < g:
            break
        for phase in range(g):
            if all(span[k] == phrase[(phase + k) % g] for k in range(len(span)) if k != eos_at):
                return g, phase
    return None


def test_corrupt_properties_over_many_seeds():
    L = 96
    hits_low = hits_high = clipped = 0
    for seed in range(400):
        g = torch.Generator().manual_seed(seed)
        p = int(torch.randint(1, 30, (1,), generator=g))
        r = int(torch.randint(1, 50, (1,), generator=g))
        r = min(r, L - p - 1)
        x0 = torch.cat([torch.randint(0, 10, (p + r,), generator=g), torch.full((L - p - r,), EOS)])
        answer_end = p + r + 1  # eos policy "first"
        x_t, y_l, c, end = corrupt(x0, p, answer_end, MASK, EOS, torch.Generator().manual_seed(seed_for("c", seed)))
        # cut point in range, never past the first EOS
        assert p <= c <= min(answer_end, p + r)
        hits_low += c == p
        hits_high += c == p + r
        # x_t: prefix kept, everything from c masked
        assert torch.equal(x_t[:c], x0[:c]) and (x_t[c:] == MASK).all()
        # y_l: x0 outside the span
        assert torch.equal(y_l[:c], x0[:c]) and torch.equal(y_l[end:], x0[end:])
        # span length 30..49, clipped only by the sequence end
        z = end - c
        assert 1 <= z <= 49
        if end < L:
            assert z >= 30
        else:
            clipped += 1
        # exactly one EOS in the span, never in its last slot (unless the span is one token)
        span = y_l[c:end].tolist()
        assert span.count(EOS) == 1
        eos_at = span.index(EOS)
        assert z == 1 or eos_at < z - 1
        # the rest cycles through the phrase x0[c-g:c] (g <= 14) at some phase
        assert _find_period(span, x0[:c].tolist(), eos_at) is not None, (seed, c, span)
    assert hits_low > 0 and hits_high > 0 and clipped > 0


def test_corrupt_is_seeded_and_fresh():
    x0 = torch.cat([torch.arange(40) % 10, torch.full((60,), EOS)])
    a = corrupt(x0, 10, 41, MASK, EOS, torch.Generator().manual_seed(3))
    b = corrupt(x0, 10, 41, MASK, EOS, torch.Generator().manual_seed(3))
    c = corrupt(x0, 10, 41, MASK, EOS, torch.Generator().manual_seed(4))
    assert torch.equal(a[1], b[1]) and a[2:] == b[2:]
    assert not (torch.equal(a[1], c[1]) and a[2:] == c[2:])
    with pytest.raises(ValueError):
        corrupt(x0[None], 10, 41, MASK, EOS)


@pytest.mark.numerics
def test_r2ft_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(4)
    B, L = 2, 20
    logits = torch.randn(B, L, V, generator=g)
    x0 = torch.randint(0, 10, (B, L), generator=g)
    y_l = torch.randint(0, 11, (B, L), generator=g)
    prompt, answer_end = torch.tensor([3, 5]), torch.tensor([12, 18])
    start, end = torch.tensor([6, 5]), torch.tensor([16, 20])
    bw, bl, ba, gamma = 1.3, 0.7, 0.1, 0.2
    loss, lw, ll = r2ft_loss(logits, x0, y_l, start, end, prompt, answer_end, MASK, bw, bl, ba, gamma)
    for b in range(B):
        # SUBS: answer positions before the cut are unmasked in x_t and contribute log 1 = 0
        w = sum(_hand_logp(logits[b, i], int(x0[b, i])) for i in range(int(start[b]), int(answer_end[b])))
        w /= int(answer_end[b] - prompt[b])
        lo = sum(_hand_logp(logits[b, i], int(y_l[b, i])) for i in range(int(start[b]), int(end[b])))
        lo /= int(end[b] - start[b])
        want = -math.log(1 / (1 + math.exp(-(bw * w - bl * lo - gamma)))) - ba * w
        assert float(lw[b]) == pytest.approx(w, rel=1e-5)
        assert float(ll[b]) == pytest.approx(lo, rel=1e-5)
        assert float(loss[b]) == pytest.approx(want, rel=1e-5)


@pytest.mark.numerics
def test_r2ft_batch_loss_stats_equal_hand_computation():
    """LW, LL, their margin and the loss of r2ft_batch_loss by hand (Python floats, i.e. float64), on a
    fake model whose logits depend on the position only, with the corruptions the stream positions seed."""
    from difflm.training.recipes import R2FTConfig

    g = torch.Generator().manual_seed(6)
    L = 40
    table = torch.randn(L, V, generator=g)
    x0 = torch.cat([torch.randint(0, 10, (2, 20), generator=g), torch.full((2, L - 20), EOS)], dim=1)
    batch = {"input_ids": x0, "prompt_len": torch.tensor([4, 7]), "answer_len": torch.tensor([17, 14])}
    cfg = R2FTConfig(beta_w=1.5, beta_l=0.5, beta_a=0.2, gamma=0.3, span_min=5, span_max=9)
    loss, st = r2ft_batch_loss(lambda ids: table.expand(ids.shape[0], -1, -1), batch, [3, 8], seed=2, mask_id=MASK,
                               eos_id=EOS, cfg=cfg)
    want = []
    for b, k in enumerate([3, 8]):
        p, end = int(batch["prompt_len"][b]), int(batch["prompt_len"][b] + batch["answer_len"][b])
        _, y_l, c, e = corrupt(x0[b], p, end, MASK, EOS, example_generator(2, "train", "r2ft", k), (1, 14), (5, 9))
        lw = sum(_hand_logp(table[i], int(x0[b, i])) for i in range(c, end)) / (end - p)
        ll = sum(_hand_logp(table[i], int(y_l[i])) for i in range(c, e)) / (e - c)
        z = 1.5 * lw - 0.5 * ll - 0.3
        want.append((lw, ll, lw - ll, math.log1p(math.exp(-z)) - 0.2 * lw))
    for j, key in enumerate(("lw", "ll", "margin", "loss")):
        assert st[key].tolist() == pytest.approx([w[j] for w in want], rel=1e-5, abs=1e-6), key
    assert float(loss) == pytest.approx(sum(w[3] for w in want) / 2, rel=1e-5)


@pytest.mark.numerics
def test_r2ft_gradient_lowers_ll(tiny_native_llada_dir):
    from difflm.models import load_model

    m = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu")
    m.module.train()
    ids = m.ids
    g = torch.Generator().manual_seed(0)
    L = 64
    x0 = torch.cat([torch.randint(0, 150, (4, 30), generator=g), torch.full((4, L - 30), ids.eos_id)], dim=1)
    batch = {"input_ids": x0, "prompt_len": torch.tensor([8, 10, 12, 9]), "answer_len": torch.tensor([23, 21, 19, 22])}
    positions = [0, 1, 2, 3]
    opt = torch.optim.Adam(m.module.parameters(), lr=1e-2)

    def stats():
        with torch.no_grad():
            return r2ft_batch_loss(m, batch, positions, seed=1, mask_id=ids.mask_id, eos_id=ids.eos_id)[1]

    before = stats()
    for _ in range(3):  # the same corruptions each time (seeded by the positions)
        loss, _ = r2ft_batch_loss(m, batch, positions, seed=1, mask_id=ids.mask_id, eos_id=ids.eos_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = stats()
    assert float(after["ll"].mean()) < float(before["ll"].mean()) - 0.1
    assert float(after["loss"].mean()) < float(before["loss"].mean())
    assert float(after["margin"].mean()) > float(before["margin"].mean())


def test_lr_schedule_warmup_constant_and_cosine():
    assert [lr_factor(s, 4, 20, "constant", 0.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 2, 12, "cosine", 0.1) for s in range(12)]
    assert cos[:2] == [0.5, 1.0]
    assert cos[2] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))
    assert lr_factor(0, 0, 10, "constant", 0.0) == 1.0


def _first_cut_at(x0, p, answer_end, c_want, **kw):
    """The first seed whose corruption cuts at `c_want`, and that corruption."""
    for seed in range(3000):
        out = corrupt(x0, p, answer_end, MASK, EOS, torch.Generator().manual_seed(seed), **kw)
        if out[2] == c_want:
            return seed, out
    raise AssertionError(f"no seed in 3000 cuts at {c_want}")


@pytest.mark.parametrize("kind", ["truncated", "eos_last"])
def test_corrupt_one_token_span_at_the_row_end_holds_the_phrase_and_no_eos(kind):
    # truncated: an answer cut by max_length, no EOS in the row (answer_end = L); eos_last: the row's only
    # EOS is its last token. A cut at L-1 leaves a one-token span: the EOS may not sit on its last (only)
    # position, so the span holds the repeated phrase alone
    L, p = 40, 10
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randint(0, 10, (L,), generator=gen)
    if kind == "eos_last":
        x0[-1] = EOS
    _, (x_t, y_l, c, end) = _first_cut_at(x0, p, L, L - 1)
    assert (c, end) == (L - 1, L)
    assert (x_t[: L - 1] == x0[: L - 1]).all() and x_t[L - 1] == MASK
    assert torch.equal(y_l[: L - 1], x0[: L - 1])
    assert y_l[L - 1] != EOS and int(y_l[L - 1]) in x0[L - 1 - 14 : L - 1].tolist()  # a phrase token
    assert (y_l == EOS).sum() == (x0[: L - 1] == EOS).sum() == 0


def test_corrupt_one_token_spans_from_a_short_span_range_hold_no_eos():
    x0 = torch.cat([torch.arange(30) % 10, torch.full((10,), EOS)])
    for seed in range(50):
        x_t, y_l, c, end = corrupt(x0, 5, 31, MASK, EOS, torch.Generator().manual_seed(seed), span_range=(1, 1))
        assert end == c + 1 and y_l[c] != EOS and int(y_l[c]) in x0[max(0, c - 14) : c].tolist()


def test_corrupt_properties_over_many_seeds_with_short_and_truncated_rows():
    seen = {"truncated_last_cut": 0, "eos_last_cut": 0, "one_token": 0, "two_token": 0, "clipped": 0}
    for seed in range(1500):
        g = torch.Generator().manual_seed(seed)
        L = int(torch.randint(4, 48, (1,), generator=g))
        p = int(torch.randint(1, L - 1, (1,), generator=g))  # tokenize keeps >= 2 answer positions: p <= L-2
        kind = ("truncated", "eos_last", "padded")[seed % 3]
        x0 = torch.randint(0, 10, (L,), generator=g)
        if kind == "truncated":
            answer_end = L
        elif kind == "eos_last":
            x0[-1] = EOS
            answer_end = L
        else:
            r = int(torch.randint(0, L - p, (1,), generator=g))  # response tokens; EOS padding after
            x0[p + r :] = EOS
            answer_end = p + r + 1
        span_range = (30, 49) if seed % 2 else (1, 4)
        x_t, y_l, c, end = corrupt(x0, p, answer_end, MASK, EOS, torch.Generator().manual_seed(seed_for("c", seed)),
                                   span_range=span_range)
        first_eos = int((x0[p:] == EOS).nonzero()[0, 0]) + p if (x0[p:] == EOS).any() else L
        # the paper's cut rule, unchanged: c in [prompt_len, answer_end], never past the first EOS nor at L
        assert max(p, 1) <= c <= min(answer_end, first_eos, L - 1)
        assert torch.equal(x_t[:c], x0[:c]) and (x_t[c:] == MASK).all()
        assert torch.equal(y_l[:c], x0[:c]) and torch.equal(y_l[end:], x0[end:])
        z = end - c
        assert 1 <= z <= span_range[1] and (end == L or z >= span_range[0])
        span = y_l[c:end].tolist()
        if z >= 2:  # exactly one EOS, never on the span's last position
            assert span.count(EOS) == 1 and span.index(EOS) < z - 1, (seed, c, span)
            eos_at = span.index(EOS)
        else:  # a one-token span: the phrase alone
            assert span.count(EOS) == 0, (seed, kind, c, span)
            eos_at = -1
        assert _find_period(span, x0[:c].tolist(), eos_at) is not None, (seed, c, span)
        seen["truncated_last_cut"] += kind == "truncated" and c == L - 1
        seen["eos_last_cut"] += kind == "eos_last" and c == L - 1
        seen["one_token"] += z == 1
        seen["two_token"] += z == 2
        seen["clipped"] += end == L and c + span_range[0] > L
    assert all(v > 0 for v in seen.values()), seen
