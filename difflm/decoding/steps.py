"""The per-step mathematics of every decoder, as pure tensor functions (tested one step at a time).

Conventions: `logits` are the model's logits over the generated region only, [B, L, V], with the MASK
logit already at -inf (SUBS parameterisation); `x` is the generated region [B, L]; `masked` is
`x == mask_id`. Every random draw takes a list of per-row `torch.Generator`s, so each row's noise depends
only on its own seed and state (batch == single, rank-independent outputs).

Masked-diffusion ("mass") methods. At a masked position i the step from time t to s draws among
{MASK, candidate tokens j} with weights  MASK: b,  token j: a * m_i * p_ij,  where (a, b) = (t - s, s) for
the linear schedule (ReMDM phases give other pairs), p_ij are the model's probabilities of the kept
candidates (top-k, or all tokens), and m_i is the method's position scale:
  categorical: 1;  topk: G = |M| / sum_{i in M} q_i  (q_i = sum of kept p_ij; per sequence);
  conv: s_i * C,  s_i = tanh(conv_mult * u_i),  C = |M| / sum_{i in M} s_i q_i  (per sequence).
The draw is done in two exactly equivalent stages, both in float64: unmask with probability
a m_i q_i / (a m_i q_i + b), then pick the token among the candidates with probability p_ij / q_i
(Gumbel-max). Only positions that unmask need the second stage, which keeps float64 cheap at a 126k
vocabulary.
"""

from __future__ import annotations

import torch


# ------------------------------------------------------------------------------------------------
# noise
def _rand(
    gens: list[torch.Generator], shape: tuple[int, ...], device, dtype=torch.float64, active: list[bool] | None = None
) -> torch.Tensor:
    """Uniform(0, 1) noise [B, *shape], row b drawn from gens[b]. Rows with active[b] False draw nothing
    (their generator is left as it is, as if the row were decoded alone and had stopped) and get 1.0."""
    return torch.stack([
        torch.rand(shape, generator=g, device=device, dtype=dtype) if active is None or on
        else torch.ones(shape, device=device, dtype=dtype)
        for g, on in zip(gens, active if active is not None else [True] * len(gens))
    ])


def active_rows(region: torch.Tensor) -> list[bool]:
    """Rows with at least one position in `region` (one host-device sync)."""
    return region.any(1).tolist()


def gumbel_argmax(scores: torch.Tensor, gen: torch.Generator, temperature: float, chunk: int = 64) -> torch.Tensor:
    """argmax(scores / T + Gumbel) over the last dim in float64, rows drawn from one generator.

    scores: [N, C] log-weights (float32/64; -inf allowed). T == 0 is a plain argmax. Chunked over rows so
    a 126k-vocabulary float64 draw stays small in memory.
    """
    if temperature == 0 or scores.shape[0] == 0:
        return scores.argmax(-1)
    out = []
    for start in range(0, scores.shape[0], chunk):
        z = scores[start : start + chunk].double() / temperature
        u = torch.rand(z.shape, generator=gen, device=z.device, dtype=torch.float64)
        g = -torch.log(-torch.log(u.clamp_min(1e-300)))
        out.append((z + g).argmax(-1))
    return torch.cat(out)


def gumbel_argmax_rows(
    scores: torch.Tensor, counts: list[int], gens: list[torch.Generator], temperature: float, max_rows: int = 256
) -> torch.Tensor:
    """`gumbel_argmax` for the positions of a whole batch at once: `scores` [N, C] holds counts[0] rows of
    batch row 0, then counts[1] of row 1, ...; each batch row's noise comes from its own generator (one draw
    per row, the same as drawing it alone), the arithmetic runs batched over groups of at most `max_rows`
    positions, so the kernel count does not grow with the batch (the sampler was launch-bound on a GPU)."""
    if temperature == 0 or scores.shape[0] == 0:
        return scores.argmax(-1)
    out, start, group, noise = [], 0, 0, []

    def flush(end: int) -> None:
        z = scores[start:end].double() / temperature
        u = torch.cat(noise).clamp_min(1e-300)
        out.append((z - torch.log(-torch.log(u))).argmax(-1))

    for g, n in zip(gens, counts):
        if n == 0:
            continue
        noise.append(torch.rand((n, scores.shape[1]), generator=g, device=scores.device, dtype=torch.float64))
        group += n
        if group >= max_rows:
            flush(start + group)
            start, group, noise = start + group, 0, []
    if group:
        flush(start + group)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# the convolution window
def conv_counts(known: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """u_i = number of known tokens j with |j - i| <= (K-1)/2 (zero padding at the edges).

    known: [B, N] bool (decoded or prompt, padding excluded). Exact integer arithmetic via cumulative sums.
    """
    h = (kernel_size - 1) // 2
    b, n = known.shape
    cs = torch.zeros(b, n + 1, dtype=torch.long, device=known.device)
    cs[:, 1:] = known.long().cumsum(1)
    idx = torch.arange(n, device=known.device)
    hi = (idx + h + 1).clamp(max=n)
    lo = (idx - h).clamp(min=0)
    return cs[:, hi] - cs[:, lo]


def conv_scale(u: torch.Tensor, conv_mult: float) -> torch.Tensor:
    """s_i = tanh(conv_mult * u_i) in float64."""
    return torch.tanh(conv_mult * u.double())


# ------------------------------------------------------------------------------------------------
# mass methods
def candidates(logits: torch.Tensor, top_k: int | None, temperature: float):
    """Kept candidates per position: (scores, token ids [B, L, k] or None for all, q [B, L] float64).

    Probabilities are p = softmax(logits / T) (T = 1 when T == 0: the token draw is then an argmax).
    With top-k, scores are the kept log-probabilities log p_ij [B, L, k] and q_i = sum_j p_ij; without,
    scores are the logits themselves and q_i = 1. Nothing of size [B, L, V] is written: top-k and
    logsumexp only read the logits (at a 126k vocabulary a full log-softmax costs more than the rest
    of the step).
    """
    if top_k is None or top_k >= logits.shape[-1]:
        return logits, None, torch.ones(logits.shape[:-1], dtype=torch.float64, device=logits.device)
    scaled = logits if temperature in (0.0, 1.0) else logits / temperature
    vals, idx = scaled.topk(top_k, dim=-1)
    logp = vals - torch.logsumexp(scaled, dim=-1, keepdim=True)
    return logp, idx, logp.double().exp().sum(-1)


def position_scale(q: torch.Tensor, region: torch.Tensor, s_conv: torch.Tensor | None = None) -> torch.Tensor:
    """m_i per position [B, L] float64 (see the module docstring).

    q: kept probability mass per position [B, L] float64; region: [B, L] bool, the masked positions that
    may unmask this step (the set M of the normalisation). Without conv scales this is the global
    normalisation G = |M| / sum_M q_i (exactly 1 when nothing is truncated: categorical); with conv
    scales s_i it is s_i * C, C = |M| / sum_M s_i q_i. Both per sequence.
    """
    n = region.sum(1, keepdim=True).double()
    w = q if s_conv is None else s_conv * q
    denom = (w * region).sum(1, keepdim=True)
    const = torch.where(denom > 0, n / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return const.expand_as(q) if s_conv is None else s_conv * const


def unmask_probability(a: float, b: float, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P(unmask) = a m q / (a m q + b), float64 [B, L]."""
    w = a * m * q
    tot = w + b
    return torch.where(tot > 0, w / tot.clamp_min(1e-300), torch.zeros_like(w))


def mass_step(
    logits: torch.Tensor,
    x: torch.Tensor,
    region: torch.Tensor,
    a: float,
    b: float,
    *,
    top_k: int | None,
    temperature: float,
    gens: list[torch.Generator],
    s_conv: torch.Tensor | None = None,
    active: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step of a mass method. Returns (new x, bool [B, L] of positions unmasked now).

    region: masked positions allowed to unmask (masked, inside the current block for semi-AR).
    active: `active_rows(region)` if the caller has it; rows with an empty region draw no noise.
    """
    scores, idx, q = candidates(logits, top_k, temperature)
    # top-k scores are already log p at temperature T: draw among them at T = 1 (or argmax for T = 0)
    draw_t = temperature if idx is None or temperature == 0 else 1.0
    m = position_scale(q, region, s_conv)
    p_unmask = unmask_probability(a, b, m, q) * region
    u = _rand(gens, (x.shape[1],), x.device, active=active_rows(region) if active is None else active)
    unmask = region & (u < p_unmask)
    new = x.clone()
    rows, cols = unmask.nonzero(as_tuple=True)  # token draws only where a position unmasks (few per step)
    if rows.numel():
        choice = gumbel_argmax_rows(scores[rows, cols], unmask.sum(1).tolist(), gens, draw_t)
        new[rows, cols] = choice if idx is None else idx[rows, cols].gather(-1, choice[:, None]).squeeze(1)
    return new, unmask


# ------------------------------------------------------------------------------------------------
# confidence methods (LLaDA low-confidence remasking, llada_conv, Fast-dLLM threshold)
def propose(
    logits: torch.Tensor, region: torch.Tensor, temperature: float, remasking: str, gens: list[torch.Generator],
    active: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens x0 [B, L] and confidences [B, L] (float64; -inf outside `region`).

    x0 = argmax(logits / T + Gumbel) (T = 0: argmax), drawn only inside `region` (x0 is 0 outside it:
    nothing may commit there); confidence is the softmax probability of x0 in float64 (low_confidence) or
    a uniform draw (random), as in LLaDA. Only the region's positions are read: the full [B, L, V] logits
    are never upcast, reduced or copied.
    """
    b, n = region.shape
    x0 = torch.zeros((b, n), dtype=torch.long, device=logits.device)
    if temperature > 0:
        for r, g in enumerate(gens):
            pos = region[r].nonzero().squeeze(1)
            if pos.numel():
                x0[r, pos] = gumbel_argmax(logits[r, pos], g, temperature)
    if remasking == "random":
        if temperature == 0:
            x0 = torch.where(region, _region_max(logits, region)[0], x0)
        conf = _rand(gens, (logits.shape[1],), logits.device, active=active_rows(region) if active is None else active)
    elif temperature == 0:
        x0, conf = _region_max(logits, region, with_confidence=True)
    else:
        conf = softmax_at(logits, x0, region)
    conf = torch.where(region, conf, torch.full_like(conf, float("-inf")))
    return x0, conf


def _chunk_rows(v: int, elements: int = 1 << 18) -> int:
    """Rows of a [rows, V] float64 temporary that stay within ~2 MB (cache-sized chunks)."""
    return max(1, elements // max(1, v))


def _sum_exp64(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum_j exp(z_j - m) in float64 for z [N, V], m [N, 1] (one float64 temporary, worked on in place)."""
    d = z.to(torch.float64, copy=True)
    return d.sub_(m.double()).exp_().sum(-1)


def _region_max(logits: torch.Tensor, region: torch.Tensor, with_confidence: bool = False):
    """(argmax token [B, L] long, float64 softmax probability of it [B, L] or None) at the `region`
    positions (0 elsewhere). The argmax and the max come from one float32 pass (exact: upcasting does not
    change the order); the probability 1 / sum_j exp(z_j - max) is summed in float64, as LLaDA's
    float64 softmax computes it, in cache-sized chunks."""
    b, n, v = logits.shape
    x0 = torch.zeros((b, n), dtype=torch.long, device=logits.device)
    conf = torch.zeros((b, n), dtype=torch.float64, device=logits.device) if with_confidence else None
    rows, cols = region.nonzero(as_tuple=True)
    chunk = _chunk_rows(v)
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        z = logits[r, c]
        m, a = z.max(-1, keepdim=True)
        x0[r, c] = a.squeeze(1)
        if with_confidence:
            conf[r, c] = _sum_exp64(z, m).reciprocal_()
    return x0, conf


def softmax_at(logits: torch.Tensor, tokens: torch.Tensor, region: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """float64 softmax probability of `tokens` [B, L] at the `region` positions (0 elsewhere), as LLaDA
    computes it: float32 cannot separate confidences that differ by ~1e-7, and in bf16 models such
    near-ties decide which token is committed. Only region rows are upcast, in cache-sized chunks."""
    conf = torch.zeros(tokens.shape, dtype=torch.float64, device=logits.device)
    rows, cols = region.nonzero(as_tuple=True)
    chunk = chunk or _chunk_rows(logits.shape[-1])
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        z = logits[r, c]
        m = z.amax(-1, keepdim=True)
        zt = z.gather(-1, tokens[r, c][:, None]).squeeze(-1)
        conf[r, c] = (zt.double() - m.squeeze(-1).double()).exp_() / _sum_exp64(z, m)
    return conf


def commit_top(conf: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: the counts[b] most confident positions of each row (ties: lowest index first)."""
    kmax = int(counts.max().item()) if counts.numel() else 0
    sel = torch.zeros(conf.shape, dtype=torch.bool, device=conf.device)
    if kmax == 0:
        return sel
    # stable descending sort: equal confidences keep positional order, on any device
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices[:, :kmax]
    keep = torch.arange(kmax, device=conf.device)[None, :] < counts[:, None]
    keep &= torch.isfinite(conf.gather(1, order))
    sel.scatter_(1, order, keep)
    return sel


def commit_threshold(conf: torch.Tensor, tau: float) -> torch.Tensor:
    """bool [B, L]: every position with confidence >= tau, and at least the best one of a row that has any."""
    sel = conf >= tau
    has = torch.isfinite(conf).any(1)
    best = commit_top(conf, has.long())
    return sel | best


def transfer_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's tokens-per-step split: [B, steps]; n // steps each, the remainder to the earliest steps."""
    base = n_masked[:, None] // steps
    rem = n_masked[:, None] % steps
    return base + (torch.arange(steps, device=n_masked.device)[None, :] < rem).long()


# ------------------------------------------------------------------------------------------------
# shared post-processing
def apply_repetition_penalty(logits: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor, penalty: float):
    """CTRL / HF-style penalty on every token id present in the row (prompt and decoded, padding and MASK
    excluded): positive logits are divided by the penalty, negative ones multiplied. In place; returns logits."""
    if penalty == 1.0:
        return logits
    b, _, v = logits.shape
    present = torch.zeros(b, v, dtype=torch.bool, device=logits.device)
    ids = seq.clamp(0, v - 1)
    present.scatter_(1, ids, valid)
    pres = present[:, None, :].expand_as(logits)
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits.copy_(torch.where(pres, pen, logits))
    return logits


def eos_fill(x: torch.Tensor, mask_id: int, stop_ids: list[int], eos_id: int) -> torch.Tensor:
    """Every position right of the first decoded stop token (EOS or EOT) becomes EOS. Returns new x."""
    is_stop = torch.zeros_like(x, dtype=torch.bool)
    for s in stop_ids:
        is_stop |= x == s
    after = (is_stop.long().cumsum(1) - is_stop.long()) > 0
    return torch.where(after, torch.full_like(x, eos_id), x)
