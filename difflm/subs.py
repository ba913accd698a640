"""The SUBS parameterisation (MDLM, Sahoo et al. 2024) every likelihood in difflm uses: MASK is never a
prediction, so its logit is -inf before the softmax, which is taken in float32.

One place for the rule, used by the training losses (`difflm.training.losses` / `.r2ft`), the likelihood
bound (`difflm.eval.likelihood`) and the embedded models' held-out loss (`difflm.embedded.heldout_loss`).
(The samplers in `difflm.decoding.loop` apply the same rule in place on their own logits buffer.)
"""

from __future__ import annotations

import torch

__all__ = ["log_probs", "without_mask"]


def without_mask(logits: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    """A float32 copy of `logits` [..., V] with the MASK logit at -inf (the input is never changed).

    `mask_id` None (an AR model) or outside the vocabulary leaves the logits as they are."""
    out = logits.float()
    if mask_id is not None and 0 <= mask_id < out.shape[-1]:
        if out is logits:  # .float() of a float32 tensor is the tensor itself
            out = out.clone()
        out[..., mask_id] = float("-inf")
    return out


def log_probs(logits: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    """float32 log-softmax over the last dimension with the MASK logit at -inf."""
    return torch.log_softmax(without_mask(logits, mask_id), dim=-1)
