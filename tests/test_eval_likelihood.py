"""LLaDA's Monte-Carlo likelihood bound against hand computations on a fake model with fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from difflm.eval.likelihood import (
    greedy_matches,
    masked_bound_losses,
    mc_loglikelihood,
    sample_masks,
    stratified_mask_counts,
)

MASK = 3  # vocabulary: 0, 1, 2 and MASK = 3


class FixedLogits:
    """logits[b, i] = table[i] whatever the input (position-dependent only); records its inputs."""

    def __init__(self, table):
        self.table = torch.tensor(table, dtype=torch.float32)
        self.seen: list[torch.Tensor] = []

    def __call__(self, x, attention_mask=None):
        self.seen.append(x.clone())
        return self.table[: x.shape[1]].expand(x.shape[0], -1, -1)


def _row(p0, p1, p2, mask_logit=5.0):
    """Logits whose softmax over tokens 0..2 is (p0, p1, p2); MASK gets a big logit that must be ignored."""
    return [math.log(p0), math.log(p1), math.log(p2), mask_logit]


# prompt [2, 2] at positions 0-1; answer [0, 1] at positions 2-3
TABLE = [_row(1 / 3, 1 / 3, 1 / 3), _row(1 / 3, 1 / 3, 1 / 3), _row(0.5, 0.25, 0.25), _row(0.25, 0.25, 0.5)]
PROMPT, ANSWER = [2, 2], [0, 1]


@pytest.mark.numerics
def test_bound_matches_the_hand_computation():
    # -log p(a_1 = 0) = ln 2 at position 2, -log p(a_2 = 1) = ln 4 at position 3; A = 2
    masks = torch.tensor([[True, False], [False, True], [True, True]])
    losses = masked_bound_losses(FixedLogits(TABLE), PROMPT, ANSWER, masks, MASK)
    ln2 = math.log(2)
    # L_j = (A / l_j) * sum of masked NLLs: {0}: 2 ln2; {1}: 2 ln4 = 4 ln2; {0,1}: 1 * (ln2 + ln4) = 3 ln2
    assert losses.tolist() == pytest.approx([2 * ln2, 4 * ln2, 3 * ln2], abs=1e-6)
    # their mean, -3 ln2, is exactly log p(answer) of this factorised model (the estimator is unbiased)
    assert -float(losses.mean()) == pytest.approx(-3 * ln2, abs=1e-6)


def test_batching_does_not_change_the_losses():
    masks = torch.tensor([[True, False], [False, True], [True, True], [True, False]])
    one = masked_bound_losses(FixedLogits(TABLE), PROMPT, ANSWER, masks, MASK, batch_size=1)
    all_ = masked_bound_losses(FixedLogits(TABLE), PROMPT, ANSWER, masks, MASK, batch_size=4)
    assert torch.allclose(one, all_)


def test_prompt_is_never_masked_and_answer_masks_follow_the_rows():
    model = FixedLogits(TABLE)
    masks = torch.tensor([[True, False], [False, True]])
    masked_bound_losses(model, PROMPT, ANSWER, masks, MASK)
    x = model.seen[0]
    assert x[:, :2].tolist() == [PROMPT, PROMPT]
    assert x[:, 2:].tolist() == [[MASK, 1], [0, MASK]]


def test_stratified_counts():
    g = torch.Generator().manual_seed(0)
    for A in (1, 3, 7):
        c = stratified_mask_counts(A, A, g)
        assert sorted(c.tolist()) == list(range(1, A + 1))  # M = A: every l once
        for M in (2, 5, 4 * A):  # the documented formula, k = l_0 (torch.round and round: half to even)
            c2 = stratified_mask_counts(A, M, g).tolist()
            k = c2[0]
            assert c2 == [(round(k + j * A / M) - 1) % A + 1 for j in range(M)]
    c = stratified_mask_counts(10, 3, g)
    assert c.min() >= 1 and c.max() <= 10
    masks = sample_masks(10, c, g)
    assert masks.sum(1).tolist() == c.tolist()


@pytest.mark.numerics
def test_mc_estimate_with_uniform_answer_nll_is_exact():
    # every answer position has the same NLL c: each sample gives (A/l) * l * c = A c, so the estimate is exact
    table = [_row(1 / 3, 1 / 3, 1 / 3)] * 6
    ll, greedy = mc_loglikelihood(FixedLogits(table), [1], [0, 1, 2, 0, 1], mask_id=MASK, mc_num=7,
                                  batch_size=3, generator=torch.Generator().manual_seed(1))
    assert ll == pytest.approx(-5 * math.log(3), abs=1e-5)


@pytest.mark.numerics
def test_mc_estimate_converges_to_the_exact_value_and_is_seeded():
    model = FixedLogits(TABLE)
    ll, _ = mc_loglikelihood(model, PROMPT, ANSWER, mask_id=MASK, mc_num=4000, batch_size=1000,
                             generator=torch.Generator().manual_seed(0), check_greedy=False)
    assert ll == pytest.approx(-3 * math.log(2), abs=0.05)
    a = mc_loglikelihood(model, PROMPT, ANSWER, mask_id=MASK, mc_num=8, generator=torch.Generator().manual_seed(5))
    b = mc_loglikelihood(model, PROMPT, ANSWER, mask_id=MASK, mc_num=8, generator=torch.Generator().manual_seed(5))
    assert a == b


def test_greedy_flag():
    model = FixedLogits(TABLE)
    # argmax at position 2 is token 0, at position 3 token 2 (the MASK logit 5.0 is ignored)
    assert greedy_matches(model, PROMPT, [0, 2], MASK) is True
    assert greedy_matches(model, PROMPT, [0, 1], MASK) is False
    assert model.seen[-1][0, 2:].tolist() == [MASK, MASK]  # all answer tokens masked
    _, greedy = mc_loglikelihood(model, PROMPT, [0, 2], mask_id=MASK, mc_num=2)
    assert greedy is True
    assert mc_loglikelihood(model, PROMPT, [0, 2], mask_id=MASK, mc_num=2, check_greedy=False)[1] is False


def test_mask_id_comes_from_the_model():
    class WithIds(FixedLogits):
        class ids:
            mask_id = MASK

    ll, _ = mc_loglikelihood(WithIds(TABLE), PROMPT, ANSWER, mc_num=2, generator=torch.Generator().manual_seed(0))
    # the same estimate as with the MASK id given (same masks from the same seed, same arithmetic: equal);
    # another id (0, a real token) would leave the MASK logit in and score other positions
    want, _ = mc_loglikelihood(FixedLogits(TABLE), PROMPT, ANSWER, mask_id=MASK, mc_num=2,
                               generator=torch.Generator().manual_seed(0))
    other, _ = mc_loglikelihood(FixedLogits(TABLE), PROMPT, ANSWER, mask_id=0, mc_num=2,
                                generator=torch.Generator().manual_seed(0))
    assert ll == want and ll != other
    with pytest.raises(ValueError, match="mask_id"):
        mc_loglikelihood(FixedLogits(TABLE), PROMPT, ANSWER, mc_num=2)
