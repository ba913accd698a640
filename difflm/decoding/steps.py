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

from difflm.decoding.conv import conv_counts, conv_scale  # noqa: F401  (the conv window: conv.py)


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
    logp = vals - _logsumexp_rows(scaled)
    return logp, idx, logp.double().exp().sum(-1)


#: logsumexp over the vocabulary in chunks of about this many logits (4 MiB of float32) once the logits are
#: at least LSE_CHUNK_FROM: eager logsumexp writes an exp temporary as large as its input (131 MB at batch 16,
#: V 32000, fresh pages every step); chunked it stays cache-sized: 1.4-1.5x for conv and top-k at batch 16,
#: V 32000 on the CPU (bench/compile_effect.py --variants chunked; what torch.compile gained, without it)
LSE_CHUNK = 1 << 20
LSE_CHUNK_FROM = 1 << 22


def _logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(x, -1, keepdim=True), taken a few rows at a time on large inputs (each row's
    reduction is the same, so the values are too)."""
    if x.numel() < LSE_CHUNK_FROM:
        return torch.logsumexp(x, dim=-1, keepdim=True)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], dtype=x.dtype, device=x.device)
    rows = max(1, LSE_CHUNK // x.shape[-1])
    for r0 in range(0, flat.shape[0], rows):
        out[r0 : r0 + rows] = torch.logsumexp(flat[r0 : r0 + rows], dim=-1)
    return out.view(*x.shape[:-1], 1)


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


def softmax32_rtol(v: int) -> float:
    """A bound on the relative error of a float32 softmax probability over `v` logits: v float32 rounding
    errors of a sequential sum (the worst order; a vectorised sum is far better), the subtraction of the
    max and a few ulp of exp. Measured errors are ~1e-7; the bound is for certifying decisions."""
    return (v + 64) * 2.0**-24 + 16 * 2.0**-23


def _region_max(
    logits: torch.Tensor, region: torch.Tensor, with_confidence: bool = False, exact: bool = True,
    tokens: bool = True,
):
    """(argmax token [B, L] long or None, softmax probability of it [B, L] float64 or None) at the
    `region` positions (0 elsewhere), in cache-sized chunks: a row whose region is a dense span (a block's
    masks) is read in place, the others' positions are gathered through work buffers allocated once (a
    fresh large allocation per chunk costs page faults). exact: the probability from a float64 softmax, as
    LLaDA computes it; else from a float32 softmax, within a relative `softmax32_rtol(V)` of it. The
    probability of the argmax is the largest probability of the row (exp(0) times 1 / sum), so it is read
    with a max, without the argmax; tokens=False skips the argmax (an index-tracking reduction, the
    slowest pass) for callers that need the tokens of a few positions only (`argmax_at`)."""
    b, n, v = logits.shape
    x0 = torch.zeros((b, n), dtype=torch.long, device=logits.device) if tokens else None
    conf = torch.zeros((b, n), dtype=torch.float64, device=logits.device) if with_confidence else None
    if region.shape[0] == 0:
        return x0, conf

    def work(z, put):
        if tokens:
            put(x0, z.argmax(-1))
        if with_confidence:
            zz = z.to(torch.float64) if exact else z
            put(conf, torch.softmax(zz, -1).amax(-1).double())

    # one host sync for the spans of all rows
    count, first = region.sum(1), region.int().argmax(1)
    last = n - 1 - region.flip(1).int().argmax(1)
    spans = torch.stack([count, first, last], 1).tolist()
    step = _chunk_rows(v, 1 << 20 if not exact else 1 << 18)
    scattered = torch.zeros_like(region)
    for r, (cnt, lo, hi) in enumerate(spans):
        if cnt == 0:
            continue
        if hi + 1 - lo > 2 * cnt:
            scattered[r] = region[r]
            continue
        for s0 in range(lo, hi + 1, step):
            s1 = min(hi + 1, s0 + step)

            def put(dst, val, r=r, s0=s0, s1=s1):
                dst[r, s0:s1] = val

            work(logits[r, s0:s1], put)
    if tokens:  # a span's positions outside the region read 0
        x0 = torch.where(region, x0, torch.zeros_like(x0))
    if with_confidence:
        conf = torch.where(region, conf, torch.zeros_like(conf))
    flat = scattered.reshape(-1).nonzero().squeeze(1)
    if flat.numel() == 0:
        return x0, conf
    table = logits.reshape(b * n, v)
    chunk = min(step, flat.numel())
    z_buf = torch.empty((chunk, v), dtype=logits.dtype, device=logits.device)
    for start in range(0, flat.numel(), chunk):
        idx = flat[start : start + chunk]

        def put(dst, val, idx=idx):
            dst.view(-1)[idx] = val

        work(torch.index_select(table, 0, idx, out=z_buf[: idx.numel()]), put)
    return x0, conf


def argmax_at(logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """argmax tokens [B, L] long at the `where` positions (0 elsewhere)."""
    x0 = torch.zeros(where.shape, dtype=torch.long, device=logits.device)
    flat = where.reshape(-1).nonzero().squeeze(1)
    if flat.numel():
        x0.view(-1)[flat] = torch.index_select(logits.reshape(-1, logits.shape[-1]), 0, flat).argmax(-1)
    return x0


#: greedy_commit decides in float64 directly below this many logits read per step (the float32-first path
#: saves memory traffic but costs more kernel launches: at a 2k vocabulary and batch 1 those dominate)
GREEDY_EXACT_BELOW = 1 << 17
#: a step whose rows all commit the same count of the same number of masked positions (llada without EOS
#: fill) gathers their logits and ranks them by a certified float32 softmax (`greedy_commit_at`) below this
#: many logits (a 16 MB float32 gather); above, `greedy_commit` reads the block in place, in cache-sized chunks
#: (measured on the 2-core CPU: the gather is faster at V 2048 batch 4-16 and V 32000 batch 1-4, slower at
#: V 32000 batch 16's first steps, 16 M logits)
GREEDY_GATHER_BELOW = 1 << 22


def greedy_commit(
    logits: torch.Tensor, region: torch.Tensor, *, counts: torch.Tensor | None = None, tau: float | None = None,
    scale: torch.Tensor | None = None, exact: bool = False, kmax: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy low-confidence commit (temperature 0): (x0 [B, L], bool [B, L] positions to commit).

    x0 = argmax, at the committed positions only (0 elsewhere); confidence = float64 softmax probability
    of x0 (times `scale`, llada_conv's window), -inf outside `region`; commit the counts[b] most
    confident of a row (`commit_top`) or, with `tau`, `commit_threshold`. The decision is the float64 one:
    confidences are first computed by a float32 softmax (about half the cost), and only the positions
    whose float32 value lies within the error bound (`softmax32_rtol`) of the decision boundary are
    recomputed in float64 before deciding again. A position certified by the bound is on the same side of
    the boundary in float64, so the commit equals the all-float64 one (ties included: those are always
    recomputed). exact=True: float64 throughout. Below `GREEDY_EXACT_BELOW` logits (region positions x V)
    the float64 softmax is taken directly, x0 then given at every region position. kmax: max(counts) if the
    caller knows it (saves a host sync)."""
    def pick(c):
        return commit_top(c, counts, kmax) if tau is None else commit_threshold(c, tau)

    v = logits.shape[-1]
    flat = region.reshape(-1).nonzero().squeeze(1)
    if flat.numel() * v < GREEDY_EXACT_BELOW:  # little work: float64 in a few kernels, like a plain loop
        c, a = torch.softmax(torch.index_select(logits.reshape(-1, v), 0, flat).double(), -1).max(-1)
        conf = torch.full(region.shape, float("-inf"), dtype=torch.float64, device=logits.device)
        conf.view(-1)[flat] = c if scale is None else c * scale.reshape(-1)[flat]
        x0 = torch.zeros(region.shape, dtype=torch.long, device=logits.device)
        x0.view(-1)[flat] = a  # the max of float64 probabilities of float32 logits is their argmax
        return x0, pick(conf)

    def finish(c):
        c = c if scale is None else c * scale
        return torch.where(region, c, torch.full_like(c, float("-inf")))

    conf = finish(_region_max(logits, region, with_confidence=True, exact=exact, tokens=False)[1])
    sel = pick(conf)
    if not exact:
        redo = uncertain_positions(conf, sel, softmax32_rtol(logits.shape[-1]), tau)
        if bool(redo.any()):
            exact_conf = _region_max(logits, redo, with_confidence=True, exact=True, tokens=False)[1]
            conf = torch.where(redo, finish(exact_conf), conf)
            sel = pick(conf)
    return argmax_at(logits, sel), sel


def greedy_commit_at(
    logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mask_id: int, *, counts: torch.Tensor | None = None,
    kmax: int | None = None, per_row: int | None = None, tau: float | None = None, scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`greedy_commit`'s small-work path in few kernels, for the region positions (rows, cols)
    (`region.nonzero(as_tuple=True)`, row-major): the new value of each of them, [N] long: its argmax token
    where it commits, `mask_id` (it stays masked) elsewhere. The same decision as `greedy_commit` (the
    float64 one). per_row: every row of logits has exactly per_row region positions and commits `kmax` of
    them (llada without EOS fill: the caller knows it from the schedule), so the top-k is one sort of
    [B, per_row], ranked by a float32 softmax (less than half the cost of float64 at a 2k vocabulary, where the
    step's softmax is most of its time) and certified in one host sync: every row's k-th confidence lies above
    its (k + 1)-th by more than both error bounds (`softmax32_rtol`), so float64 would pick the same set; else
    (a near-tie, ties included) the positions whose interval reaches the boundary (`uncertain_positions`) are
    recomputed in float64 and the step ranked again, as `greedy_commit` does. A step that commits all or none of its
    positions ranks nothing. With `tau` and one row, the threshold is decided on the host
    (`_threshold_host`: float32 confidences where the bound certifies every decision, else float64); otherwise
    float64 directly, `commit_top` / `commit_threshold` over a [B, L] confidence tensor."""
    b, n, v = logits.shape
    flat = cols if b == 1 else rows * n + cols
    z = torch.index_select(logits.reshape(-1, v), 0, flat)
    vals = torch.full_like(flat, mask_id)
    if tau is None and per_row is not None and rows.numel() == b * per_row:
        if kmax <= 0:
            return vals
        if kmax >= per_row:  # every position commits: no ranking needed
            vals.copy_(z.argmax(-1))
            return vals

        def ranked(c):  # stable: equal confidences keep positional order, as `commit_top`
            return torch.sort(c.view(b, per_row), dim=1, descending=True, stable=True)

        approx = z.dtype != torch.float64
        c = _max_prob(z, scale, flat, exact=not approx)
        srt = ranked(c)
        if approx and not _separated(srt.values, kmax, softmax32_rtol(v)):
            # float64 for the positions whose interval reaches the boundary, then rank again (`greedy_commit`)
            sel = torch.zeros((b, per_row), dtype=torch.bool, device=z.device).scatter_(1, srt.indices[:, :kmax], True)
            redo = uncertain_positions(c.view(b, per_row), sel, softmax32_rtol(v)).view(-1).nonzero().squeeze(1)
            c[redo] = _max_prob(torch.index_select(z, 0, redo), scale, flat[redo], exact=True)
            srt = ranked(c)
        order = srt.indices[:, :kmax]
        pick = order[0] if b == 1 else (order + torch.arange(0, b * per_row, per_row, device=z.device)[:, None]).view(-1)
    elif tau is not None and b == 1:  # decided on the host: float32 where certain, else float64
        approx = z.dtype != torch.float64
        picked = _threshold_host(_max_prob(z, scale, flat, exact=not approx).tolist(), tau, softmax32_rtol(v) * approx)
        if picked is None:
            picked = _threshold_host(_max_prob(z, scale, flat, exact=True).tolist(), tau, 0.0)
        pick = torch.tensor(picked, dtype=torch.long, device=z.device)
    else:
        c = _max_prob(z, scale, flat, exact=True)
        conf = torch.full((b, n), float("-inf"), dtype=torch.float64, device=c.device)
        conf.view(-1)[flat] = c
        keep = (commit_top(conf, counts, kmax) if tau is None else commit_threshold(conf, tau)).view(-1)[flat]
        pick = keep.nonzero().squeeze(1)
    # the argmax (an index-tracking reduction, several times an amax over [N, V]) at the committed positions only
    vals[pick] = torch.index_select(z, 0, pick).argmax(-1)
    return vals


def _max_prob(z: torch.Tensor, scale: torch.Tensor | None, flat: torch.Tensor, exact: bool) -> torch.Tensor:
    """The softmax probability of each row's argmax [N] float64 (times the positions' `scale`): from a
    float64 softmax when exact (as LLaDA computes it), else from z's own (float32: within a relative
    `softmax32_rtol(V)` of it). The probability of the argmax is the largest one (see `_region_max`): an
    amax, no index tracking."""
    c = torch.softmax(z.double() if exact else z, -1).amax(-1).double()
    return c if scale is None else c * scale.reshape(-1)[flat]


def _threshold_host(conf: list[float], tau: float, rtol: float) -> list[int] | None:
    """`commit_threshold` of one row's confidences, known to a relative `rtol`, on the host: the indices with
    confidence >= tau, or if there are none the first most confident one; None where `rtol` leaves a
    decision uncertain (a confidence within the bound of tau; the top two within the bound of each other)."""
    keep = []
    for j, c in enumerate(conf):
        if c * (1 - rtol) >= tau:
            keep.append(j)
        elif c * (1 + rtol) >= tau:
            return None
    if keep or not conf:
        return keep
    best = max(range(len(conf)), key=conf.__getitem__)  # the first maximum, as argmax
    if rtol and any(j != best and c * (1 + rtol) >= conf[best] * (1 - rtol) for j, c in enumerate(conf)):
        return None
    return [best]


def _separated(ranked: torch.Tensor, k: int, rtol: float) -> bool:
    """Whether every row's top-k set of `ranked` [B, n] (sorted descending; values known to a relative
    `rtol`) is certain: its k-th value's lower bound lies above its (k + 1)-th's upper bound, compared in
    float64 on the host (one sync; B pairs). Equal values (ties) are never certain."""
    return all(a * (1 - rtol) > b * (1 + rtol) for a, b in ranked[:, k - 1 : k + 1].tolist())


def uncertain_positions(conf: torch.Tensor, sel: torch.Tensor, rtol: float, tau: float | None = None) -> torch.Tensor:
    """bool [B, L]: positions whose confidence, known to a relative `rtol`, could lie on the other side of
    the decision: for a top-k commit `sel`, selected positions whose lower bound does not exceed the
    largest upper bound of an unselected one, and unselected ones whose upper bound reaches the smallest
    selected lower bound; with `tau`, also those whose interval contains tau, and the top-1 boundary (the
    commit of a row where nothing reaches tau). Recomputing exactly these in float64 and deciding again
    gives the float64 decision (the others' order against every other position is certain)."""
    finite = torch.isfinite(conf)
    lo, hi = conf * (1 - rtol), conf * (1 + rtol)

    def boundary(chosen):
        weakest = torch.where(chosen, lo, torch.full_like(lo, float("inf"))).amin(1, keepdim=True)
        strongest = torch.where(finite & ~chosen, hi, torch.full_like(hi, float("-inf"))).amax(1, keepdim=True)
        return finite & ((chosen & (lo <= strongest)) | (~chosen & (hi >= weakest)))

    if tau is None:
        return boundary(sel)
    return boundary(_best(conf)) | (finite & (lo < tau) & (hi >= tau))


def softmax_at(
    logits: torch.Tensor, tokens: torch.Tensor, region: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
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


def commit_top(conf: torch.Tensor, counts: torch.Tensor, kmax: int | None = None) -> torch.Tensor:
    """bool [B, L]: the counts[b] most confident positions of each row (ties: lowest index first).
    kmax: an upper bound of max(counts) known on the host (else read from counts: a host sync)."""
    if kmax is None:
        kmax = int(counts.max().item()) if counts.numel() else 0
    kmax = min(kmax, conf.shape[1])
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
    return (conf >= tau) | _best(conf)


def _best(conf: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: the most confident position of each row that has a finite one (ties: lowest index,
    as `commit_top` with a count of 1; argmax returns the first maximum), without a sort or a host sync."""
    has = torch.isfinite(conf).any(1, keepdim=True)
    return torch.zeros_like(conf, dtype=torch.bool).scatter_(1, conf.argmax(1, keepdim=True), has)


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
