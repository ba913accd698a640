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


# ------------------------------------------------------------------------------------------------
# plain loops of every other method (bench.py's sampler regime): written from the formulas of the
# methods (README, "Decoders"), one row at a time where the method is per row, everything in float64.
# Greedy confidence loops (temperature 0, low_confidence): ties in the confidence are broken by the lower
# position (a stable sort); the mass loops draw every outcome of a masked position, {tokens, MASK}, with
# one float64 Gumbel-max over [V + 1].


def _gen_logits(model, x: torch.Tensor, gen_length: int, attention_mask=None) -> torch.Tensor:
    """Logits of the generated positions [B, L, V]; the model is asked for those alone when it can."""
    if getattr(model, "accepts_logits_to_keep", False):
        return _logits(model(x, attention_mask=attention_mask, logits_to_keep=gen_length))[:, -gen_length:]
    return _logits(model(x, attention_mask=attention_mask))[:, -gen_length:]


def _schedule(n: int, steps: int) -> list[int]:
    """n tokens over `steps` steps: n // steps each, the remainder to the earliest steps."""
    return [n // steps + (1 if i < n % steps else 0) for i in range(steps)]


def _row_confidence(logits_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, p(x0)) of one row's positions [N, V]: argmax, float64 softmax, gather."""
    x0 = logits_row.argmax(-1)
    p = F.softmax(logits_row.to(torch.float64), dim=-1)
    return x0, p.gather(-1, x0[:, None]).squeeze(-1)


def _top(conf: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest confidences (ties: the lower position first)."""
    return torch.sort(conf, descending=True, stable=True).indices[:k]


def _window_scale(x: torch.Tensor, prompt_length: int, kernel_size: int, mask_id: int, conv_mult: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """s_i = tanh(conv_mult * u_i) [B, L] float64, u_i = known tokens within (K - 1) / 2 of i (conv1d)."""
    k = kernel_size + 1 if kernel_size % 2 == 0 else kernel_size
    known = x != mask_id
    if valid is not None:
        known = known & valid
    kernel = torch.ones(1, 1, k, dtype=torch.float64, device=x.device)
    u = F.conv1d(known.to(torch.float64)[:, None, :], kernel, padding=(k - 1) // 2)[:, 0, prompt_length:]
    return torch.tanh(conv_mult * u)


def _start(prompt, gen_length, mask_id, attention_mask):
    b, plen = prompt.shape
    x = torch.full((b, plen + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :plen] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones((b, gen_length), dtype=attention_mask.dtype,
                                                               device=prompt.device)], dim=-1)
    return x, attention_mask


@torch.no_grad()
def plain_confidence_generate(
    model, prompt: torch.Tensor, *, method: str, steps: int, gen_length: int, mask_id: int,
    block_length: int | None = None, threshold: float = 0.9, kernel_size: int | None = None,
    conv_mult: float = 1.0, attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Greedy llada / threshold / llada_conv, decoding one row at a time in float64.

    llada: blocks of `block_length`, steps / blocks steps each; every step, for each row, argmax x0, float64
    softmax and the confidence p(x0) of the block's masked positions, and the row's scheduled number of the
    most confident commit. threshold: the same blocks, every position with p(x0) >= threshold (at least
    the most confident) commits, until the block is decoded. llada_conv: no blocks, `steps` steps over the
    whole answer; the confidence is p(x0) * tanh(conv_mult * u_i) (u_i: known tokens in the window K)."""
    x, am = _start(prompt, gen_length, mask_id, attention_mask)
    b, plen = prompt.shape
    valid = None if am is None else am.bool()
    if method == "llada_conv":
        blocks, per_block = [(0, gen_length)], steps
    else:
        block = block_length or gen_length
        blocks = [(s, s + block) for s in range(0, gen_length, block)]
        per_block = steps // len(blocks) if method == "llada" else block
    nfe = 0
    for lo, hi in blocks:
        n_masked = [int((x[r, plen + lo : plen + hi] == mask_id).sum()) for r in range(b)]
        sched = [_schedule(n, per_block) for n in n_masked] if method != "threshold" else None
        for i in range(per_block):
            gen = x[:, plen:]
            if not (gen[:, lo:hi] == mask_id).any():
                break
            logits = _gen_logits(model, x, gen_length, am)
            nfe += 1
            scale = _window_scale(x, plen, kernel_size, mask_id, conv_mult, valid) if method == "llada_conv" else None
            for r in range(b):
                pos = (gen[r, lo:hi] == mask_id).nonzero().squeeze(1) + lo
                if pos.numel() == 0:
                    continue
                x0, conf = _row_confidence(logits[r, pos])
                if scale is not None:
                    conf = conf * scale[r, pos]
                if method == "threshold":
                    pick = (conf >= threshold).nonzero().squeeze(1)
                    if pick.numel() == 0:
                        pick = _top(conf, 1)
                else:
                    pick = _top(conf, min(sched[r][i], pos.numel()))
                x[r, plen + pos[pick]] = x0[pick]
    return x, nfe


def _remdm_alpha(t: float, alpha_on: float, t_on: float, t_off: float) -> float:
    """ReMDM loop schedule: alpha rises linearly 0 -> alpha_on on [1, t_on], stays alpha_on on [t_off, t_on],
    rises alpha_on -> 1 on [t_off, 0]."""
    if t >= t_on:
        return alpha_on * (1.0 - t) / (1.0 - t_on)
    if t >= t_off:
        return alpha_on
    return 1.0 - (1.0 - alpha_on) * t / t_off


@torch.no_grad()
def plain_mass_generate(
    model, prompt: torch.Tensor, *, method: str, steps: int, gen_length: int, mask_id: int,
    top_k: int | None = None, temperature: float = 1.0, block_length: int | None = None,
    kernel_size: int | None = None, conv_mult: float = 1.0, alpha_on: float = 0.9, t_on: float = 0.55,
    t_off: float = 0.05, eta: float = 0.02, attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None, eps: float = 1e-5,
) -> tuple[torch.Tensor, int]:
    """categorical / topk / conv / semi_ar / remdm, the whole batch at once in float64.

    Every step t -> s: p = softmax(logits / T) (top-k: the k largest kept, the rest 0), q_i = sum_j p_ij;
    a masked position draws MASK with weight b and token j with weight a * m_i * p_ij, where (a, b) =
    (t - s, s) (remdm: (alpha_s - alpha_t, 1 - alpha_s) while alpha rises, (p, 1 - p) with
    p = eta * alpha_on / (1 - alpha_on) in its loop, where decoded tokens also go back to MASK with
    probability eta) and m_i = 1 (categorical, semi_ar without top-k), |M| / sum_M q (topk, semi_ar),
    s_i |M| / sum_M s_i q_i (conv). semi_ar runs steps / blocks steps per block, each on its own time grid,
    and a block's positions still masked at its end take the argmax. Positions still masked at the end take
    the argmax of the last logits."""
    x, am = _start(prompt, gen_length, mask_id, attention_mask)
    plen = prompt.shape[1]
    valid = None if am is None else am.bool()
    if method == "semi_ar":
        block = block_length or gen_length
        blocks = [(s, s + block) for s in range(0, gen_length, block)]
        per_block = steps // len(blocks)
    else:
        blocks, per_block = [(0, gen_length)], steps
    keep_k = None if method == "categorical" else top_k
    nfe = 0
    logits = None
    for lo, hi in blocks:
        ts = np.linspace(1.0, eps, per_block + 1)
        for i in range(per_block):
            gen = x[:, plen:]
            region = gen == mask_id
            region[:, :lo] = False
            region[:, hi:] = False
            if not region.any():
                break
            t, s = float(ts[i]), float(ts[i + 1])
            a, bw, remask = t - s, s, 0.0
            if method == "remdm":
                at, as_ = (_remdm_alpha(v, alpha_on, t_on, t_off) for v in (t, s))
                if as_ > at + 1e-12:
                    a, bw = as_ - at, 1.0 - as_
                else:
                    a = min(1.0, eta * alpha_on / (1.0 - alpha_on))
                    bw, remask = 1.0 - a, eta
            logits = _gen_logits(model, x, gen_length, am)
            nfe += 1
            p = F.softmax(logits.to(torch.float64) / temperature, dim=-1)
            if keep_k is not None and keep_k < p.shape[-1]:
                vals, idx = p.topk(keep_k, dim=-1)
                p = torch.zeros_like(p).scatter_(-1, idx, vals)
            q = p.sum(-1)
            reg = region.to(torch.float64)
            n = reg.sum(1, keepdim=True)
            if method == "conv":
                s_i = _window_scale(x, plen, kernel_size, mask_id, conv_mult, valid)
                denom = (reg * s_i * q).sum(1, keepdim=True)
                m = s_i * torch.where(denom > 0, n / denom, torch.zeros_like(denom))
            elif method == "categorical" or keep_k is None:
                m = torch.ones_like(q)
            else:
                denom = (reg * q).sum(1, keepdim=True)
                m = torch.where(denom > 0, n / denom, torch.zeros_like(denom)).expand_as(q)
            w = torch.empty(p.shape[:-1] + (p.shape[-1] + 1,), dtype=torch.float64, device=p.device)
            torch.mul(p, (a * m)[..., None], out=w[..., :-1])
            w[..., -1] = bw
            choice = gumbel_max(w, generator)
            del w, p
            new = torch.where(choice == logits.shape[-1], torch.full_like(choice, mask_id), choice)
            out = torch.where(region, new, gen)
            if remask > 0:
                u = torch.rand(gen.shape, dtype=torch.float64, device=gen.device, generator=generator)
                back = (gen != mask_id) & (u < remask)
                back[:, :lo] = False
                back[:, hi:] = False
                out = torch.where(back, torch.full_like(out, mask_id), out)
            x[:, plen:] = out
        if method == "semi_ar" and logits is not None:
            gen = x[:, plen:]
            left = gen == mask_id
            left[:, :lo] = False
            left[:, hi:] = False
            x[:, plen:] = torch.where(left, logits.argmax(-1), gen)
    if logits is not None:
        gen = x[:, plen:]
        x[:, plen:] = torch.where(gen == mask_id, logits.argmax(-1), gen)
    return x, nfe
