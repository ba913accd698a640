"""Approximate KV caching for block decoders (Fast-dLLM's prefix and dual caches), on Hugging Face
Llama-style modules that accept `cache=`, `use_cache=` and `position_ids=` (difflm's native LLaDA and Dream
paths; for Dream the recomputed window starts one position earlier, whose output scores the window's first slot).

In a bidirectional model every key changes when any token changes, so a cache is an approximation:
at the start of each block (and every `refresh` steps) one full forward pass computes the logits and
the keys/values of every position; the steps in between recompute only
- `prefix`: the current block and everything right of it, attending to the cached prompt and finished
  blocks;
- `dual`: the current block only, attending to the cached prefix *and* the cached (still masked)
  suffix.
RoPE is applied before caching, so cached keys keep their true positions and the order of keys in the
cache does not matter; the queries get their true `position_ids`.
"""

from __future__ import annotations

import torch

from difflm.errors import ConfigError
from difflm.models.base import logits_of


def _module(model):
    return getattr(model, "module", model)


def _cache_of(out):
    for name in ("cache", "past_key_values"):
        c = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if c is not None:
            return c
    raise ConfigError("the model returned no KV cache: decode.cache needs a Llama-style (native LLaDA) model", "cache")


class BlockCache:
    """KV cache of one decoding run; `mode` is "prefix" or "dual"."""

    def __init__(self, model, mode: str):
        if mode not in ("prefix", "dual"):
            raise ConfigError(f"unknown cache mode {mode!r}; allowed: prefix, dual", key="cache")
        self.model, self.mode = model, mode
        #: Dream (native): slot i reads the output at i-1, so the window starts one position earlier, the logits
        #: are shifted, and positions count from each row's first real token (Dream's left padding)
        self.shift = getattr(model, "family", None) == "dream"
        self.offset: torch.Tensor | None = None  # per row: left padding (Dream's positions)
        self.cache = None
        self.keep_len = 0
        self.lo = self.hi = 0
        self.attn_kept: torch.Tensor | None = None

    def full(self, x: torch.Tensor, attn: torch.Tensor | None, lo: int, hi: int, logits_to_keep: int = 0) -> torch.Tensor:
        """Full forward on x; keeps the keys/values outside the recomputed window [lo, hi) of the next steps
        (absolute positions; for `prefix` hi is the sequence end). Returns logits [B, T, V], or of the last
        `logits_to_keep` positions only when it is > 0 (the output head is skipped for the prompt)."""
        kw = {"logits_to_keep": logits_to_keep + self.shift} if logits_to_keep else {}
        if self.shift:
            from difflm.models.dream import dream_position_ids

            lo -= 1  # the output at lo - 1 scores slot lo
            if attn is not None:
                kw["position_ids"] = dream_position_ids(attn)
                self.offset = (attn == 0).sum(1)
        out = _module(self.model)(x, attention_mask=attn, use_cache=True, **kw)
        cache = _cache_of(out)
        n = x.shape[1]
        keep = torch.cat([torch.arange(0, lo), torch.arange(hi, n)]).to(x.device)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)
        self.cache, self.keep_len, self.lo, self.hi = cache, keep.numel(), lo, hi
        self.attn_kept = None if attn is None else attn.index_select(1, keep)
        logits = logits_of(out)
        if self.shift:
            from difflm.models.dream import shift_logits

            logits = logits[:, :-1] if logits_to_keep else shift_logits(logits)
        return logits

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, hi - lo, V] of the window [lo, hi) of x, attending to the cached keys/values."""
        ids = x[:, self.lo : self.hi]
        pos = torch.arange(self.lo, self.hi, device=x.device)[None].expand(x.shape[0], -1)
        if self.offset is not None:
            pos = pos - self.offset[:, None]
        am = None
        if self.attn_kept is not None:
            am = torch.cat([self.attn_kept, torch.ones_like(ids, dtype=self.attn_kept.dtype)], 1)
        out = _module(self.model)(ids, attention_mask=am, position_ids=pos, cache=self.cache, use_cache=True)
        for layer in self.cache.layers:  # drop the window's keys again: the cache stays the refreshed one
            layer.keys = layer.keys[..., : self.keep_len, :]
            layer.values = layer.values[..., : self.keep_len, :]
        logits = logits_of(out)
        return logits[:, :-1] if self.shift else logits  # Dream: the window's first output scores its second slot
