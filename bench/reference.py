"""Straightforward reference decoders, written from the formulas (no import of `difflm.decoding`).

They are the baselines `bench.py` times difflm against, and the independent implementations the tests
compare difflm with:

- `llada_generate`: LLaDA's published `generate` loop (GSAI-ML/LLaDA, generate.py) as it is written there:
  blocks of `block_length`, steps split evenly per block (remainder to the earliest steps); every step
  Gumbel noise in float64 over the FULL vocabulary and sequence (temperature 0 skips it), x0 = argmax,
  p = softmax(logits.to(float64)) over the full vocabulary, confidence gather, -inf right of the block,
  then a per-row `torch.topk` of the step's number of tokens, one row at a time.
- `conv_generate`: the paper's convolutional decoding (Seo et al. 2025) written plainly: every step a
  float64 softmax over the full vocabulary, top-k, the window count u with `torch.nn.functional.conv1d`,
  s = tanh(conv_mult * u), C = |M| / sum_{i in M} s_i q_i per sequence, token weights (t - s) * p * s_i * C
  and MASK weight s, then one Gumbel-max over the [V + 1] outcomes in float64.

Both take `model(input_ids, attention_mask=None)` returning logits (or an object with `.logits`) whose
MASK logit is -inf (a trained model never predicts MASK; the benchmark's model wrapper enforces it for
random weights). `max_steps` stops a loop after that many forward passes (for timing the first steps of a
long run and extrapolating); the returned `nfe` is then the number of passes actually made.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


# ------------------------------------------------------------------------------------------------
# LLaDA (low-confidence remasking), as in LLaDA's generate.py
def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None):
    """LLaDA's Gumbel-max in float64: exp(logits) / (-log u)^T (temperature 0 returns the logits)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps]: the masks of a block split evenly over its steps, the remainder to the earliest steps."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def llada_generate(
    model,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    mask_id: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_steps: int | None = None,
) -> tuple[torch.Tensor, int]:
    """LLaDA's reference loop. Returns (x [B, P + gen_length], number of forward passes)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, : prompt.shape[1]] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones((prompt.shape[0], gen_length), dtype=attention_mask.dtype, device=prompt.device)],
            dim=-1,
        )
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    nfe = 0
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, start : start + block_length] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            if max_steps is not None and nfe >= max_steps:
                return x, nfe
            mask_index = x == mask_id
            logits = _logits(model(x, attention_mask=attention_mask))
            nfe += 1
            logits_with_noise = add_gumbel_noise(logits, temperature, generator)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device, generator=generator)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, start + block_length :] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x, nfe


# ------------------------------------------------------------------------------------------------
# convolutional decoding (the paper), plain
def conv_weights(
    logits: torch.Tensor,
    x: torch.Tensor,
    prompt_length: int,
    t: float,
    s: float,
    *,
    kernel_size: int,
    mask_id: int,
    top_k: int | None = None,
    temperature: float = 1.0,
    conv_mult: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalised float64 weights [B, L, V + 1] of the step t -> s (last column: MASK).

    logits: [B, L, V] over the generated region (MASK logit -inf); x: the full sequence [B, P + L];
    valid: [B, P + L] bool, False at padding (padding does not count in the window). Only rows of masked
    positions are meaningful (decoded positions are copied by the caller).
    """
    k = kernel_size + 1 if kernel_size % 2 == 0 else kernel_size
    p = F.softmax(logits.to(torch.float64) / temperature, dim=-1)
    if top_k is not None and top_k < p.shape[-1]:
        vals, idx = p.topk(top_k, dim=-1)
        p = torch.zeros_like(p).scatter_(-1, idx, vals)
    q = p.sum(-1)  # kept probability mass per position
    known = x != mask_id
    if valid is not None:
        known = known & valid
    kernel = torch.ones(1, 1, k, dtype=torch.float64, device=x.device)
    u = F.conv1d(known.to(torch.float64)[:, None, :], kernel, padding=(k - 1) // 2)[:, 0, prompt_length:]
    s_i = torch.tanh(conv_mult * u)
    masked = (x[:, prompt_length:] == mask_id).to(torch.float64)
    denom = (masked * s_i * q).sum(1, keepdim=True)
    c = torch.where(denom > 0, masked.sum(1, keepdim=True) / denom, torch.zeros_like(denom))
    w = torch.empty(p.shape[:-1] + (p.shape[-1] + 1,), dtype=torch.float64, device=p.device)
    torch.mul(p, ((t - s) * s_i * c)[..., None], out=w[..., :-1])
    w[..., -1] = s
    return w


def gumbel_max(w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """argmax(log w + Gumbel) over the last dim, float64: a draw proportional to w (destroys w)."""
    g = torch.rand(w.shape, dtype=torch.float64, device=w.device, generator=generator)
    g.clamp_(min=1e-300).log_().neg_().log_().neg_()
    return w.log_().add_(g).argmax(-1)


@torch.no_grad()
def conv_generate(
    model,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    kernel_size: int,
    mask_id: int,
    top_k: int | None = None,
    temperature: float = 1.0,
    conv_mult: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_steps: int | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, int]:
    """The paper's conv sampler, one Gumbel-max over [V + 1] per masked position and step.

    Positions still masked after the last step take the argmax of the last logits (no extra pass).
    Returns (x [B, P + gen_length], number of forward passes)."""
    if temperature <= 0:
        raise ValueError("the reference conv loop samples: temperature must be > 0")
    b, plen = prompt.shape
    x = torch.full((b, plen + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :plen] = prompt
    valid = None
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones((b, gen_length), dtype=attention_mask.dtype, device=prompt.device)], dim=-1
        )
        valid = attention_mask.bool()
    ts = np.linspace(1.0, eps, steps + 1)
    nfe = 0
    logits = None
    capped = False
    for i in range(steps):
        masked = x[:, plen:] == mask_id
        if not masked.any():
            break
        if max_steps is not None and nfe >= max_steps:
            capped = True
            break
        logits = _logits(model(x, attention_mask=attention_mask))[:, plen:]
        nfe += 1
        w = conv_weights(
            logits, x, plen, float(ts[i]), float(ts[i + 1]), kernel_size=kernel_size, mask_id=mask_id,
            top_k=top_k, temperature=temperature, conv_mult=conv_mult, valid=valid,
        )
        choice = gumbel_max(w, generator)
        del w
        new = torch.where(choice == logits.shape[-1], torch.full_like(choice, mask_id), choice)
        x[:, plen:] = torch.where(masked, new, x[:, plen:])
    if logits is not None and not capped:
        left = x[:, plen:] == mask_id
        x[:, plen:] = torch.where(left, logits.argmax(-1), x[:, plen:])
    return x, nfe
