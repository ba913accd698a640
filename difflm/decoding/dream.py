"""Dream's samplers (`--decode dream`): the algorithms of Dream's own `diffusion_generate`, batched and seeded per row.

Written from the semantics of Dream's `generation_utils.py` (Dream-org/Dream-v0-*), on any diffusion family.
With S steps on Dream's time grid `t = linspace(1, eps, S + 1)` (float32, as Dream makes it), step i goes from
t = t_i to s = t_{i+1} and, for the masked positions of a row:

- `origin`: each masked position unmasks with probability 1 - s/t (1 at the last step), its token drawn from the
  (temperature, top-p, top-k filtered) distribution;
- `maskgit_plus` | `topk_margin` | `entropy`: every masked position proposes a token (argmax at temperature 0,
  else a draw) with a confidence: its probability, top-1 minus top-2 probability, or the negative entropy
  sum p log(p + 1e-10); then the row commits `int(n_masked * (1 - s/t))` of them (every one left at the last
  step): the most confident (alg_temp 0) or a draw without replacement from softmax(confidence / alg_temp).

The count is computed in float32 as Dream does (`int()` truncates: float64 would move counts sitting on an integer).
Top-p/top-k filter the distribution whose confidence is taken, also at temperature 0, as in Dream's code.

Differences from Dream's code:
- **SUBS** (the one difference in what is computed; `mask_in_softmax: true` removes it): MASK is out of the softmax
  (difflm's rule for every decoder). Dream keeps MASK in it, so its argmax can be MASK (the position then stays
  masked and the step commits less) and every probability is the SUBS one times (1 - p(MASK)) at that position.
  Since p(MASK) differs from position to position, confidences that are near-ties between two positions can swap
  order, and from there the two sequences part. Measured on the fixture (a random tiny model, p(MASK) ~ 1/320):
  17 of Dream's 18 greedy sequences come out identical under SUBS; topk_margin, 8 steps, prompt 0 differs from
  step 2 on: the second pick there is between two positions whose top-1 minus top-2 margins are 0.2218 vs 0.2229
  in Dream's softmax and 0.2241 vs 0.2239 under SUBS (p(MASK) 1.0% vs 0.4% at the two positions). With `mask_in_softmax: true` all 18
  are identical. A trained Dream puts almost no mass on MASK at its outputs, so the swap needs a near-tie.
- Rows: Dream uses one batch-averaged count per step (`mask.sum() / B`); difflm counts per row, which is the same
  whenever rows hold equally many masks (always, without EOS fill) and keeps a row's output independent of its batch.
- Noise comes from each row's own generator (Dream draws from torch's global RNG), so sampled outputs depend on the
  row's seed and not on its batch; greedy outputs (temperature 0, alg_temp 0) need none.
"""

from __future__ import annotations

import torch

from difflm.decoding import steps as S
from difflm.errors import ConfigError

#: Dream's negative-entropy epsilon: sum p log(p + 1e-10)
_ENTROPY_EPS = 1e-10
#: positions per float64 chunk of [positions, V] (bounded memory at a 152k vocabulary)
_CHUNK_ELEMENTS = 1 << 22


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """ConfigError (key suppress_tokens) for an id outside the model's vocabulary."""
    bad = [i for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise ConfigError(f"token id {bad[0]} is outside the model's vocabulary (size {vocab_size})",
                          key="suppress_tokens")


def suppressed_confidence(
    logits: torch.Tensor, x0: torch.Tensor, region: torch.Tensor, suppress: list[int]
) -> torch.Tensor:
    """LLaDA-1.5's `confidence_eos_eot_inf` for the confidence decoders: the proposed tokens x0 stay as they were
    (chosen over every token), their confidence is the float64 softmax probability with the suppressed ids at -inf,
    so a position proposing one of them has confidence 0 and commits only when nothing else is left to commit."""
    check_token_ids(suppress, logits.shape[-1])
    z = logits.clone()
    z[..., suppress] = float("-inf")
    return S.softmax_at(z, x0, region)


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's time grid: float32 linspace(1, eps, steps + 1), made on the host (the same on every device)."""
    return torch.linspace(1.0, eps, steps + 1, dtype=torch.float32)


def transfer_count(n_masked: int, t: torch.Tensor, s: torch.Tensor, last: bool) -> int:
    """Tokens to commit at this step: int(n_masked * (1 - s/t)) in float32 as Dream computes it; all at the last."""
    if last:
        return int(n_masked)
    return int(torch.tensor(float(n_masked), dtype=torch.float32) * (1 - s / t))


def filter_logits(z: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's top-p then top-k filters on [N, V] logits (removed entries -> -inf): top-p keeps the smallest prefix
    of the sorted tokens whose mass exceeds p (the first token always); top-k keeps the logits >= the k-th largest."""
    if top_p is not None and top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)
        drop = torch.zeros_like(cum, dtype=torch.bool)
        drop[..., 1:] = cum[..., :-1] > top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    return z


def propose(
    logits: torch.Tensor, alg: str, temperature: float, top_p: float | None, top_k: int | None,
    gen: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N], confidences [N] float64) for the [N, V] logits of one row's masked positions (MASK at -inf).

    Probabilities in float64 (chunked over positions); tokens by argmax (temperature 0) or a draw from
    softmax(filtered logits / temperature) by Gumbel-max with the row's generator."""
    n, v = logits.shape
    tokens = torch.empty(n, dtype=torch.long, device=logits.device)
    conf = torch.empty(n, dtype=torch.float64, device=logits.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(v, 1))
    for lo in range(0, n, chunk):
        z = logits[lo : lo + chunk].double()
        if temperature > 0:
            z = z / temperature
        z = filter_logits(z, top_p, top_k)
        p = torch.softmax(z, dim=-1)
        if temperature > 0:
            x0 = S.gumbel_argmax(z, gen, 1.0)
            top1 = p.gather(-1, x0[:, None]).squeeze(-1)
        else:
            top1, x0 = p.max(-1)
        if alg == "topk_margin":
            two = p.topk(2, dim=-1).values
            c = two[:, 0] - two[:, 1]
        elif alg == "entropy":
            c = (p * torch.log(p + _ENTROPY_EPS)).sum(-1)
        else:  # maskgit_plus (origin reads the tokens only)
            c = top1
        tokens[lo : lo + chunk], conf[lo : lo + chunk] = x0, c
    return tokens, conf


def select(conf: torch.Tensor, k: int, alg_temp: float, gen: torch.Generator | None) -> torch.Tensor:
    """Indices of the k positions to commit: the k most confident (stable: ties to the lower index), or a draw
    without replacement from softmax(conf / alg_temp) (Dream's alg_temp > 0)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=conf.device)
    if alg_temp and alg_temp > 0:
        w = torch.softmax(conf / alg_temp, dim=-1).clamp_min(1e-300)  # every position stays drawable
        return torch.multinomial(w, k, replacement=False, generator=gen)
    return torch.sort(conf, descending=True, stable=True).indices[:k]


def run_dream(d) -> None:
    """The `dream` method's runner (a `difflm.decoding.loop._Decoder`): Dream's loop over the whole answer."""
    cfg = d.cfg
    ts = dream_timesteps(cfg.steps, cfg.eps)
    top_p, top_k = cfg.effective_top_p(), cfg.top_k
    suppress = list(cfg.suppress_tokens or ())
    suppressed = None  #: the ids as a tensor on the logits' device, checked against the vocabulary once
    window = d.whole()
    d.keep_mask_logit = cfg.mask_in_softmax  # Dream's own softmax (MASK may then be proposed: it stays masked)
    for i in range(cfg.steps):
        region = (d.gen == d.mask_id) & window
        if not d.select_rows(region):
            break
        logits = d.forward()  # [B, L, V] float32, MASK at -inf (SUBS), penalties applied
        if suppress and suppressed is None:
            check_token_ids(suppress, logits.shape[-1])
            suppressed = torch.tensor(suppress, device=logits.device)
        t, s = ts[i], ts[i + 1]
        last = i == cfg.steps - 1
        new = d.gen.clone()
        # the rows decode independently (their own count and generator); greedy rows draw no noise
        u = None
        if cfg.alg == "origin":
            p_transfer = 1.0 if last else float(1 - s / t)
            u = S._rand(d.gens, (d.L,), logits.device, active=d.active)
        for r, on in enumerate(d.active):
            if not on:
                continue
            pos = region[r].nonzero().squeeze(1)
            gen = d.gens[r]
            if cfg.alg == "origin":
                pos = pos[u[r, pos] < p_transfer]
                if pos.numel():
                    new[r, pos], _ = propose(logits[r, pos], cfg.alg, d.temperature, top_p, top_k, gen)
                continue
            x0, conf = propose(logits[r, pos], cfg.alg, d.temperature, top_p, top_k, gen)
            if suppressed is not None:  # proposals of a suppressed id go after every other one (LLaDA-1.5's rule)
                conf = torch.where(torch.isin(x0, suppressed), conf.new_tensor(-1e300), conf)
            k = min(transfer_count(pos.numel(), t, s, last), pos.numel())
            pick = select(conf, k, cfg.alg_temp, gen)
            new[r, pos[pick]] = x0[pick]
        d.unmask_events += ((d.gen == d.mask_id) & (new != d.mask_id)).sum(1)  # r*: this step's commits
        d.set_gen(new)
        d.notify()
