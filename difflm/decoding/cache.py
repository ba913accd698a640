"""Approximate KV caching for block decoders (Fast-dLLM's prefix and dual caches), on Hugging Face
Llama-style modules that accept `cache=`, `use_cache=` and `position_ids=` (difflm's native LLaDA path).

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
        self.cache = None
        self.keep_len = 0
        self.lo = self.hi = 0
        self.attn_kept: torch.Tensor | None = None

    def full(self, x: torch.Tensor, attn: torch.Tensor | None, lo: int, hi: int, logits_to_keep: int = 0) -> torch.Tensor:
        """Full forward on x; keeps the keys/values outside the recomputed window [lo, hi) of the next steps
        (absolute positions; for `prefix` hi is the sequence end). Returns logits [B, T, V], or of the last
        `logits_to_keep` positions only when it is > 0 (the output head is skipped for the prompt)."""
        kw = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        out = _module(self.model)(x, attention_mask=attn, use_cache=True, **kw)
        cache = _cache_of(out)
        n = x.shape[1]
        keep = torch.cat([torch.arange(0, lo), torch.arange(hi, n)]).to(x.device)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)
        self.cache, self.keep_len, self.lo, self.hi = cache, keep.numel(), lo, hi
        self.attn_kept = None if attn is None else attn.index_select(1, keep)
        return logits_of(out)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, hi - lo, V] of the window [lo, hi) of x, attending to the cached keys/values."""
        ids = x[:, self.lo : self.hi]
        pos = torch.arange(self.lo, self.hi, device=x.device)[None].expand(x.shape[0], -1)
        am = None
        if self.attn_kept is not None:
            am = torch.cat([self.attn_kept, torch.ones_like(ids, dtype=self.attn_kept.dtype)], 1)
        out = _module(self.model)(ids, attention_mask=am, position_ids=pos, cache=self.cache, use_cache=True)
        for layer in self.cache.layers:  # drop the window's keys again: the cache stays the refreshed one
            layer.keys = layer.keys[..., : self.keep_len, :]
            layer.values = layer.values[..., : self.keep_len, :]
        return logits_of(out)
