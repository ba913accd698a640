"""Training losses: masked-diffusion SFT (with the 1/t weight), the pretraining variant, AR next-token loss.

The formulas: for each sequence b draw t_b ~ U(eps, 1) and mask every position
of its noise region independently with probability t_b (the prompt never); then

    loss_b = sum over masked positions i of the loss region of -log p_theta(x0_i | x_t) / t_b
             / (length of the loss region)
    loss   = mean over the batch of loss_b

The loss region is the answer: the response plus the EOS tokens the EOS policy trains (`all`: the
whole EOS padding, `first`: one EOS, `none`: no EOS); the tokenized data stores its length as
`answer_len`. The noise region is everything after the prompt, so with `first`/`none` the EOS padding
is corrupted like the answer (as in the paper's code) but not trained. The pretraining objective
uses the whole sequence as both regions.

Log-probabilities follow the SUBS parameterisation of the samplers: the MASK logit is -inf and the
log-softmax is taken in float32, only at the positions that enter the loss (the [B, L, V] logits are
never copied to float32 as a whole).

Randomness: every sequence draws its noise from its own `torch.Generator`, seeded from (run seed,
position of the sequence in the data stream) by `seed_for`. The noise therefore does not depend on
how a global batch is split into micro-batches or ranks: gradient accumulation, multi-GPU and
resumed runs see exactly the same corruption as one process with one big batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from difflm.seeding import seed_for, seeded_generator
from difflm.subs import log_probs as subs_log_probs

__all__ = [
    "answer_length",
    "apply_mask",
    "ar_loss",
    "diffusion_loss",
    "example_generator",
    "log_probs",
    "sample_diffusion_noise",
    "seed_for",
    "sft_batch_loss",
]


def example_generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded by `seed_for(*parts)` (noise is drawn on the CPU, then moved).
    (`seed_for` lives in `difflm.seeding`; it is re-exported here.)"""
    return seeded_generator(seed_for(*parts))


def answer_length(prompt_len: int, response_len: int, max_length: int, eos_policy: str, has_eos: bool) -> int:
    """Tokens of the answer under an EOS policy; the sequence is [prompt | response | EOS padding].

    all:   everything after the prompt (the EOS padding is part of the answer, as in LLaDA's SFT)
    first: the response and the first EOS (if the response was not cut off)
    none:  the response only
    """
    if eos_policy == "all":
        return max_length - prompt_len
    if eos_policy == "first":
        return response_len + (1 if has_eos else 0)
    if eos_policy == "none":
        return response_len
    raise ValueError(f"unknown EOS policy {eos_policy!r}")


def log_probs(logits: torch.Tensor, mask_id: int | None = None) -> torch.Tensor:
    """float32 log-softmax over the last dimension with the MASK logit at -inf (SUBS; `difflm.subs`)."""
    return subs_log_probs(logits, mask_id)


def _positions(length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(length, device=device)[None, :]


def sample_diffusion_noise(
    shape: tuple[int, int],
    noise_start: Sequence[int] | torch.Tensor,
    generators: Sequence[torch.Generator],
    eps: float = 1e-3,
    noise_end: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [B] float32, masked [B, L] bool) on the CPU: t_b ~ U(eps, 1), then each position in
    [noise_start_b, noise_end_b) (default: to the end) is masked with probability t_b.

    Each row uses only its own generator: one scalar for t, then L uniforms for the mask."""
    batch, length = shape
    ts = torch.empty(batch, dtype=torch.float32)
    masked = torch.zeros(batch, length, dtype=torch.bool)
    pos = torch.arange(length)
    for b in range(batch):
        g = generators[b]
        u = torch.rand((), generator=g, dtype=torch.float64)
        t = eps + (1.0 - eps) * float(u)
        ts[b] = t
        r = torch.rand(length, generator=g, dtype=torch.float64)
        start = int(noise_start[b])
        end = length if noise_end is None else int(noise_end[b])
        masked[b] = (r < t) & (pos >= start) & (pos < end)
    return ts, masked


def apply_mask(x0: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """x_t: x0 with the masked positions replaced by the mask id."""
    return torch.where(masked.to(x0.device), torch.full_like(x0, mask_id), x0)


def diffusion_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    loss_start: torch.Tensor,
    loss_end: torch.Tensor,
    mask_id: int | None,
) -> torch.Tensor:
    """Per-sequence masked-diffusion loss [B]:
    sum over masked i in [loss_start, loss_end) of -log p(x0_i | x_t) / (t * (loss_end - loss_start)).

    `logits` [B, L, V] come from the model on x_t; `masked` [B, L] says which positions x_t masks;
    `t` [B]; `loss_start`/`loss_end` [B] the loss region (the answer). Rows with an empty region
    give 0.
    """
    device = logits.device
    batch, length = x0.shape
    x0 = x0.to(device)
    masked = masked.to(device)
    t = t.to(device=device, dtype=torch.float32)
    loss_start = torch.as_tensor(loss_start, device=device)
    loss_end = torch.as_tensor(loss_end, device=device)
    pos = _positions(length, device)
    region = masked & (pos >= loss_start[:, None]) & (pos < loss_end[:, None])
    rows, cols = region.nonzero(as_tuple=True)
    out = torch.zeros(batch, device=device, dtype=torch.float32)
    if rows.numel() == 0:
        return out + 0.0 * logits.sum()  # keep the graph (DDP needs every rank to produce gradients)
    lp = log_probs(logits[rows, cols], mask_id)
    nll = -lp.gather(-1, x0[rows, cols][:, None]).squeeze(-1)
    denom = (t * (loss_end - loss_start).clamp(min=1).float())[rows]
    return out.index_add(0, rows, nll / denom)


def ar_loss(logits: torch.Tensor, x0: torch.Tensor, loss_start: torch.Tensor, loss_end: torch.Tensor) -> torch.Tensor:
    """Per-sequence next-token loss [B] of a causal model: the mean over targets i in
    [max(loss_start, 1), loss_end) of -log p(x0_i | x0_<i), read from logits[:, i - 1]."""
    device = logits.device
    batch, length = x0.shape
    x0 = x0.to(device)
    start = torch.as_tensor(loss_start, device=device).clamp(min=1)
    end = torch.as_tensor(loss_end, device=device).clamp(max=length)
    pos = _positions(length, device)
    region = (pos >= start[:, None]) & (pos < end[:, None])
    rows, cols = region.nonzero(as_tuple=True)
    out = torch.zeros(batch, device=device, dtype=torch.float32)
    if rows.numel() == 0:
        return out + 0.0 * logits.sum()
    lp = torch.log_softmax(logits[rows, cols - 1].float(), dim=-1)
    nll = -lp.gather(-1, x0[rows, cols][:, None]).squeeze(-1)
    denom = (end - start).clamp(min=1).float()[rows]
    return out.index_add(0, rows, nll / denom)


def _regions(batch: dict, objective: str, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise_start, loss_start, loss_end) [B] for an objective, from prompt_len and answer_len."""
    prompt = torch.as_tensor(batch["prompt_len"]).long()
    answer_end = prompt + torch.as_tensor(batch["answer_len"]).long()
    if objective == "pretrain":
        zeros = torch.zeros_like(prompt)
        return zeros, zeros, answer_end.clamp(max=length)
    return prompt, prompt, answer_end


def sft_batch_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: dict,
    positions: Sequence[int],
    *,
    seed: int,
    objective: str = "diffusion",
    mask_id: int | None = None,
    eps: float = 1e-3,
    tag: str = "train",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean SFT loss of one micro-batch and per-sequence stats.

    `forward(input_ids [B, L]) -> logits [B, L, V]`; `batch` has input_ids [B, L], prompt_len [B],
    answer_len [B]; `positions` are the sequences' places in the data stream (they seed the noise).
    Returns (loss, {"loss": per-sequence [B], "tokens": loss-region tokens [B]}).
    """
    x0 = torch.as_tensor(batch["input_ids"]).long()
    bsz, length = x0.shape
    noise_start, loss_start, loss_end = _regions(batch, objective, length)
    if objective == "ar":
        keep = int(loss_end.max())  # causal: the columns after the last answer token change nothing
        logits = forward(x0[:, :keep])
        per = ar_loss(logits, x0[:, :keep], loss_start, loss_end)
    else:
        if mask_id is None:
            raise ValueError("the diffusion objectives need the mask id")
        gens = [example_generator(seed, tag, int(k)) for k in positions]
        t, masked = sample_diffusion_noise((bsz, length), noise_start, gens, eps)
        logits = forward(apply_mask(x0, masked, mask_id))
        per = diffusion_loss(logits, x0, masked, t, loss_start, loss_end, mask_id)
    return per.mean(), {"loss": per.detach(), "tokens": (loss_end - loss_start).float()}


def weight_decay_groups(named_params, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for matrices, none for vectors (norms, biases) -- the usual split."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups

