r"""Log-likelihood of an answer under a masked diffusion LM: LLaDA's Monte-Carlo bound.

A masked diffusion LM gives no exact log p(answer | prompt); LLaDA (Nie et al. 2025, its
``eval_llada.py``) scores multiple-choice answers with a Monte-Carlo estimate of the ELBO, which is a
lower bound on log p. For a prompt p and an answer a = (a_1, ..., a_A) of A tokens, with M = mc_num
samples:

1. Numbers of masked tokens, stratified over 1..A: draw k ~ Uniform{1, ..., A} once, then for
   j = 0, ..., M - 1

       l_j = ((round(k + j * A / M) - 1) mod A) + 1

   (round half to even, as torch.round; M = A gives every l in 1..A exactly once, in a rotated order).
2. Masks: S_j = a uniformly random subset of l_j answer positions; x_j = [p | a with the positions in
   S_j replaced by MASK]. **The prompt is never masked.**
3. Per sample:  L_j = (A / l_j) * sum_{i in S_j} -log p_theta(a_i | x_j)   (the cross-entropy of the
   masked tokens divided by the masked fraction l_j / A, as LLaDA's loss / p_mask).
4. Estimate:    log p(a | p) >= ELBO ~= -(1 / M) * sum_j L_j.

p_theta is the model's softmax over the vocabulary without MASK (SUBS parameterisation, as in the
samplers: the MASK logit is set to -inf before the log-softmax, in float32).

Greedy flag (lm-eval's ``is_greedy``): with every answer token masked, x = [p | MASK^A],
greedy = for all i, argmax_v p_theta(v | x)_i == a_i (one forward pass).

Differences from LLaDA's script, both immaterial for a trained model: the stratification runs over all M
samples at once (LLaDA restarts it in every batch of `batch_size` samples), and MASK is excluded from the
softmax (LLaDA keeps its logit, which a trained model pushes to ~-inf anyway).

Noise comes from a `torch.Generator` the caller seeds (lm-eval: from the request text), so a score does
not depend on the order or batch of the requests.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from difflm.models.base import logits_of
from difflm.subs import without_mask as _without_mask  # float32 copy, MASK logit at -inf

__all__ = ["greedy_matches", "masked_bound_losses", "mc_loglikelihood", "sample_masks", "stratified_mask_counts"]


def _logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    return logits_of(model(x, attention_mask=None))


def stratified_mask_counts(answer_len: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """l_j = ((round(k + j * A / n) - 1) mod A) + 1 for j = 0..n-1, k ~ U{1..A}: LongTensor [n] in 1..A."""
    if answer_len < 1 or n < 1:
        raise ValueError(f"answer_len and n must be >= 1, got {answer_len}, {n}")
    k = int(torch.randint(1, answer_len + 1, (1,), generator=generator).item())
    steps = torch.arange(n, dtype=torch.float64) * (answer_len / n)
    counts = torch.round(k + steps).long()
    return (counts - 1) % answer_len + 1


def sample_masks(answer_len: int, counts: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """BoolTensor [n, A]: row j masks a uniformly random subset of counts[j] answer positions."""
    rows = []
    for c in counts.tolist():
        perm = torch.randperm(answer_len, generator=generator)
        row = torch.zeros(answer_len, dtype=torch.bool)
        row[perm[: int(c)]] = True
        rows.append(row)
    return torch.stack(rows)


@torch.no_grad()
def masked_bound_losses(
    model: Any,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    masks: torch.Tensor,
    mask_id: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """L_j = (A / l_j) * sum_{i in S_j} -log p(a_i | x_j) for each mask row S_j (masks: Bool [n, A]).

    Returns a float64 tensor [n]. `model(x, attention_mask=None)` must return logits [B, L, V] (or an
    object with `.logits`); the MASK logit is dropped and log-softmax is taken in float32.
    """
    device = getattr(model, "device", None) or torch.device("cpu")
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    answer = torch.as_tensor(list(answer_ids), dtype=torch.long)
    A, P = answer.numel(), prompt.numel()
    if masks.shape[1] != A:
        raise ValueError(f"masks have {masks.shape[1]} columns for an answer of {A} tokens")
    losses = []
    for start in range(0, masks.shape[0], batch_size):
        m = masks[start : start + batch_size]
        b = m.shape[0]
        ans = answer.expand(b, A).clone()
        ans[m] = mask_id
        x = torch.cat([prompt.expand(b, P), ans], dim=1).to(device)
        logits = _without_mask(_logits(model, x)[:, P:], mask_id)
        logp = torch.log_softmax(logits, dim=-1).cpu()
        nll = -logp.gather(-1, answer.expand(b, A).unsqueeze(-1)).squeeze(-1).double()  # [b, A]
        counts = m.sum(1).double()
        losses.append((nll * m).sum(1) * (A / counts))
    return torch.cat(losses)


@torch.no_grad()
def greedy_matches(model: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int], mask_id: int) -> bool:
    """Whether argmax p(. | [prompt | MASK * A]) equals the answer at every answer position."""
    device = getattr(model, "device", None) or torch.device("cpu")
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    answer = torch.as_tensor(list(answer_ids), dtype=torch.long)
    x = torch.cat([prompt, torch.full_like(answer, mask_id)])[None].to(device)
    logits = _without_mask(_logits(model, x)[0, prompt.numel() :], mask_id)
    return bool((logits.argmax(-1).cpu() == answer).all())


def mc_loglikelihood(
    model: Any,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    *,
    mask_id: int | None = None,
    mc_num: int = 128,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    check_greedy: bool = True,
) -> tuple[float, bool]:
    """(ELBO estimate of log p(answer | prompt), greedy flag): see the module doc for the formula.

    `mask_id` defaults to `model.ids.mask_id`. With `check_greedy=False` the flag is always False (saves
    one forward pass).
    """
    if mask_id is None:
        mask_id = getattr(getattr(model, "ids", None), "mask_id", None)
    if mask_id is None:
        raise ValueError("mask_id is required (not given, and the model has no ids)")
    A = len(answer_ids)
    if A == 0:
        return 0.0, True
    counts = stratified_mask_counts(A, mc_num, generator)
    masks = sample_masks(A, counts, generator)
    losses = masked_bound_losses(model, prompt_ids, answer_ids, masks, mask_id, batch_size)
    ll = -float(losses.mean())
    greedy = greedy_matches(model, prompt_ids, answer_ids, mask_id) if check_greedy else False
    if not math.isfinite(ll):
        ll = float("-inf")
    return ll, greedy
