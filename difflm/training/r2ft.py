"""R2FT (Rejecting Rule-based Fine-Tuning): teach a diffusion LM to prefer the real continuation
over a synthetic repetition of its own recent text (Seo et al. 2025; the rule and the loss below).

The rule, for one sequence x0 = [prompt | answer | EOS padding] (`corrupt`):

- cut point c ~ U{prompt_len .. min(answer_end, first EOS at or after the prompt, L - 1)}
  (c never passes the first EOS, so the repeated phrase never contains one; c >= 1);
- phrase length g ~ U{1..14} (at most c), span length z ~ U{30..49} clipped to the sequence;
- x_t   = x0 with every position >= c masked (the model sees the prompt and the answer before c);
- y_l   = x0 with positions [c, c+z) filled cyclically with the phrase x0[c-g:c] at a random phase,
          then one of them (uniform, never the span's last, as in the paper's code) replaced by EOS.
          A span of one token (c = L-1, e.g. a truncated answer with no EOS in the row, or
          span_range (1, ..)) has no position but its last, so it holds the phrase only and no EOS
          (so y_l differs from x0 there even when x0's last token is its first EOS); c keeps its range.

The loss, from one forward pass on x_t (`r2ft_loss`), with log-probabilities in the SUBS
parameterisation (MASK logit -inf; an unmasked position copies its token, log p = 0):

    LW = sum over answer positions [prompt_len, answer_end) of log p(x0_i | x_t) / answer length
       (only the masked ones, i >= c, contribute)
    LL = sum over [c, c+z) of log p(y_l_i | x_t) / z
    loss = -log sigmoid(b_w LW - b_l LL - gamma) - b_a LW,   averaged over the batch

A fresh corruption is drawn every step (each sequence's generator is seeded by its position in the
data stream). For AR models the same pair is scored by teacher forcing (two forward passes), with
the sign the formula says (the paper's code flips it for its AR variant).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .losses import example_generator, log_probs

__all__ = ["corrupt", "r2ft_loss", "r2ft_ar_loss", "r2ft_batch_loss"]


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] (both inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def corrupt(
    x0: torch.Tensor,
    prompt_len: int,
    answer_end: int,
    mask_id: int,
    eos_id: int,
    generator: torch.Generator | None = None,
    phrase_range: tuple[int, int] = (1, 14),
    span_range: tuple[int, int] = (30, 49),
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Build one R2FT pair from a single sequence `x0` [L] (see the module docstring).

    Returns (x_t, y_l, start, end): x_t is x0 with every position >= start (= c) masked, y_l is x0
    with [start, end) replaced by the repeated phrase and one EOS, at a position in [start, end - 1)
    (so none when the span is one token: end - start == 1); end = min(c + z, L).
    """
    if x0.dim() != 1:
        raise ValueError(f"corrupt takes one sequence [L], got shape {tuple(x0.shape)}")
    length = x0.shape[0]
    prompt_len, answer_end = int(prompt_len), int(answer_end)
    eos_after = (x0[prompt_len:] == eos_id).nonzero()
    first_eos = prompt_len + int(eos_after[0, 0]) if eos_after.numel() else length
    low = max(prompt_len, 1)
    high = min(answer_end, first_eos, length - 1)
    if high < low:
        raise ValueError(
            f"no room for a cut point: prompt_len {prompt_len}, answer_end {answer_end}, length {length}"
        )
    c = _randint(low, high, generator)
    g = min(_randint(*phrase_range, generator), c)
    z = _randint(*span_range, generator)
    end = min(c + z, length)
    phase = _randint(0, g - 1, generator)
    span = end - c

    phrase = x0[c - g : c]
    y_l = x0.clone()
    y_l[c:end] = phrase[(torch.arange(span, device=x0.device) + phase) % g]
    if span >= 2:  # the EOS goes anywhere but the span's last position; a one-token span has no such place
        y_l[c + _randint(0, span - 2, generator)] = eos_id
    x_t = x0.clone()
    x_t[c:] = mask_id
    return x_t, y_l, c, end


def r2ft_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    y_l: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    prompt_len: torch.Tensor,
    answer_end: torch.Tensor,
    mask_id: int | None,
    beta_w: float = 1.0,
    beta_l: float = 1.0,
    beta_a: float = 0.1,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence (loss, LW, LL), each [B], from `logits` [B, L, V] of the model on x_t."""
    device = logits.device
    batch, length = x0.shape
    x0, y_l = x0.to(device), y_l.to(device)
    start, end = torch.as_tensor(start, device=device), torch.as_tensor(end, device=device)
    prompt_len, answer_end = torch.as_tensor(prompt_len, device=device), torch.as_tensor(answer_end, device=device)
    pos = torch.arange(length, device=device)[None, :]
    win = (pos >= torch.maximum(prompt_len, start)[:, None]) & (pos < answer_end[:, None])
    lose = (pos >= start[:, None]) & (pos < end[:, None])
    need = win | lose
    rows, cols = need.nonzero(as_tuple=True)
    lp = log_probs(logits[rows, cols], mask_id)
    lp_w = lp.gather(-1, x0[rows, cols][:, None]).squeeze(-1) * win[rows, cols]
    lp_l = lp.gather(-1, y_l[rows, cols][:, None]).squeeze(-1) * lose[rows, cols]
    zeros = torch.zeros(batch, device=device, dtype=torch.float32)
    lw = zeros.index_add(0, rows, lp_w) / (answer_end - prompt_len).clamp(min=1).float()
    ll = zeros.index_add(0, rows, lp_l) / (end - start).clamp(min=1).float()
    return _preference_loss(lw, ll, beta_w, beta_l, beta_a, gamma), lw, ll


def _preference_loss(
    lw: torch.Tensor, ll: torch.Tensor, beta_w: float, beta_l: float, beta_a: float, gamma: float
) -> torch.Tensor:
    """R2FT's loss from the answer's (LW) and the repetition's (LL) mean log-likelihoods, per sequence:
    -log sigmoid(b_w LW - b_l LL - gamma) - b_a LW (the diffusion and the AR variant share it)."""
    return -F.logsigmoid(beta_w * lw - beta_l * ll - gamma) - beta_a * lw


def r2ft_ar_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    y_l: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    prompt_len: torch.Tensor,
    answer_end: torch.Tensor,
    beta_w: float = 1.0,
    beta_l: float = 1.0,
    beta_a: float = 0.1,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The AR variant: LW = mean log p(answer | prompt) on x0 and LL = mean log p(span | y_l before
    it) on y_l, both teacher-forced; same loss (LW is a log-likelihood, so -b_a LW rewards the
    answer: the paper's AR code uses negative log-likelihoods here, which flips the preference)."""
    from .losses import ar_loss

    keep_w = int(torch.as_tensor(answer_end).max())
    keep_l = int(torch.as_tensor(end).max())
    lw = -ar_loss(forward(x0[:, :keep_w]), x0[:, :keep_w], prompt_len, answer_end)
    ll = -ar_loss(forward(y_l[:, :keep_l]), y_l[:, :keep_l], start, end)
    return _preference_loss(lw, ll, beta_w, beta_l, beta_a, gamma), lw, ll


def r2ft_batch_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: dict,
    positions: Sequence[int],
    *,
    seed: int,
    mask_id: int | None,
    eos_id: int,
    cfg=None,
    causal: bool = False,
    tag: str = "train",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean R2FT loss of a micro-batch, with a fresh corruption per sequence (seeded by its stream
    position). `cfg` is an `R2FTConfig` (defaults when None). Returns (loss, per-sequence stats:
    loss, lw, ll, margin = LW - LL, tokens)."""
    from .recipes import R2FTConfig

    cfg = cfg or R2FTConfig()
    x0 = torch.as_tensor(batch["input_ids"]).long()
    prompt = torch.as_tensor(batch["prompt_len"]).long()
    answer_end = prompt + torch.as_tensor(batch["answer_len"]).long()
    xts, yls, starts, ends = [], [], [], []
    for b, k in enumerate(positions):
        g = example_generator(seed, tag, "r2ft", int(k))
        x_t, y_l, s, e = corrupt(
            x0[b], int(prompt[b]), int(answer_end[b]), mask_id if mask_id is not None else eos_id, eos_id, g,
            (cfg.phrase_min, cfg.phrase_max), (cfg.span_min, cfg.span_max),
        )
        xts.append(x_t)
        yls.append(y_l)
        starts.append(s)
        ends.append(e)
    x_t, y_l = torch.stack(xts), torch.stack(yls)
    start, end = torch.tensor(starts), torch.tensor(ends)
    betas = dict(beta_w=cfg.beta_w, beta_l=cfg.beta_l, beta_a=cfg.beta_a, gamma=cfg.gamma)
    if causal:
        loss, lw, ll = r2ft_ar_loss(forward, x0, y_l, start, end, prompt, answer_end, **betas)
    else:
        logits = forward(x_t)
        loss, lw, ll = r2ft_loss(logits, x0, y_l, start, end, prompt, answer_end, mask_id, **betas)
    stats = {
        "loss": loss.detach(),
        "lw": lw.detach(),
        "ll": ll.detach(),
        "margin": (lw - ll).detach(),
        "tokens": (answer_end - prompt).float(),
    }
    return loss.mean(), stats
