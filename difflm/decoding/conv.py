"""The convolution window of conv decoding (the paper's method), in one place.

A masked position i may unmask in proportion to how many tokens around it are already known:
u_i = known (prompt or decoded, padding excluded) tokens j with |j - i| <= (K-1)/2, zero padding at the
edges; s_i = tanh(conv_mult * u_i). `conv`/`remdm_conv` scale the unmasking weights by s_i (normalised per
sequence in `steps.position_scale`), `llada_conv` multiplies the confidences by s_i. The methods that use the
window are the ones marked `conv=True` in `difflm.decoding.methods`.
"""

from __future__ import annotations

import torch


def effective_kernel_size(kernel_size: int | None, block_length: int | None, gen_length: int) -> int:
    """K of the conv window: kernel_size, else block_length (as the reference does), else gen_length/4
    (the paper's K/L ratio for L 512 and 1024 on the small model); an even K is raised by one."""
    k = kernel_size or block_length or max(1, gen_length // 4)
    return k + 1 if k % 2 == 0 else k


def conv_bounds(n: int, kernel_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) [N]: the window of position i is [lo_i, hi_i) of a length-N sequence (`conv_counts`)."""
    h = (kernel_size - 1) // 2
    idx = torch.arange(n, device=device)
    return (idx + h + 1).clamp(max=n), (idx - h).clamp(min=0)


def conv_counts(
    known: torch.Tensor, kernel_size: int, bounds: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """u_i = number of known tokens j with |j - i| <= (K-1)/2 (zero padding at the edges).

    known: [B, N] bool (decoded or prompt, padding excluded). Exact integer arithmetic via cumulative sums.
    bounds: `conv_bounds(N, kernel_size)` if the caller keeps it (a decoding loop: same N every step).
    """
    hi, lo = conv_bounds(known.shape[1], kernel_size, known.device) if bounds is None else bounds
    cs = torch.nn.functional.pad(known.long().cumsum(1), (1, 0))
    return cs[:, hi] - cs[:, lo]


def conv_scale(u: torch.Tensor, conv_mult: float) -> torch.Tensor:
    """s_i = tanh(conv_mult * u_i) in float64."""
    return torch.tanh(conv_mult * u.double())


def window_scales(
    x: torch.Tensor, valid: torch.Tensor, mask_id: int, prompt_length: int, kernel_size: int, conv_mult: float,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """s_i [B, L] float64 over the generated positions of the full sequences x [B, P + L] (the window sees
    the prompt too); `valid` is False at left padding."""
    known = valid & (x != mask_id)
    return conv_scale(conv_counts(known, kernel_size, bounds)[:, prompt_length:], conv_mult)
