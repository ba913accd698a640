"""MDLM natively: the DiT of Sahoo et al. 2024 (kuleshov-group/mdlm, `models/dit.py`, wrapped as
`kuleshov-group/mdlm-owt`'s `MDLM`), written for difflm on torch's `scaled_dot_product_attention`.

Why our own copy: MDLM's code imports flash-attn at module level and calls two of its kernels (rotary
and varlen attention), so it cannot run on a CPU; on transformers 5 its class fails in `from_pretrained`
(it never calls `post_init()`); and it has no attention mask, so prompts of different lengths cannot share
a batch. This module computes the same function (checked against logits from MDLM's own code,
tests/fixtures/mdlm-tiny-reference) and adds what it lacks:

- an attention mask (1 = real token) and position ids: a left-padded row attends to its real tokens only, and
  rotary attention depends on position differences only, so every row of a batch equals its run alone (up to
  float rounding; tested);
- CPU and CUDA, any dtype; transformers' `PreTrainedModel` (from_pretrained / save_pretrained, dtype,
  device_map, peft, gradient checkpointing); `MDLMBlock` is the unit `_no_split_modules` names (FSDP);
- `logits_to_keep` (the 50258-wide output head only where the decoder reads);
- a KV cache (`use_cache`, `cache`: transformers' `DynamicCache`) for difflm's Fast-dLLM block caches
  (`decode.cache prefix|dual`), the same approximation as on LLaDA: exact only when nothing changes.

Parameter and buffer names are mdlm-owt's own (`backbone.blocks.{i}.attn_qkv.weight`, ...), so its
checkpoint loads with no renaming and `save_pretrained` writes weights MDLM's own code also reads.

The timestep: MDLM's forward takes a noise level `sigma` per row. difflm's decoders do not pass one: the
default is 0 for every row, and a checkpoint with `time_conditioning: false` (mdlm-owt) replaces any value by 0
(MDLM's own rule), so the conditioning path runs on sigma = 0 (its output is a learned constant, not zero).

Numerics as MDLM's code, except: the norms, their modulation and the rotary embedding are computed in
float32 whatever the weights' dtype (MDLM's LayerNorm is float32 too), and nothing is autocast (MDLM runs
its blocks under CUDA bf16 autocast; here the weights' dtype decides). Dropout (residual branches only;
MDLM's attention itself has none) is active in training mode, as in MDLM.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from difflm.errors import ConfigError, first_line

log = logging.getLogger(__name__)

__all__ = ["MDLMConfig", "MDLMBlock", "MDLMForMaskedLM", "MDLMOutput", "load_mdlm_module", "ROPE_BASE"]

#: MDLM's rotary base (its `Rotary(dim)` default; mdlm-owt stores the resulting `inv_freq` buffer).
ROPE_BASE = 10_000
#: Size of the sinusoidal timestep features fed to `sigma_map` (MDLM's `frequency_embedding_size`).
TIME_FREQUENCIES = 256


class MDLMConfig(PretrainedConfig):
    """mdlm-owt's config.json fields (model_type "mdlm"), with MDLM's defaults (the OWT small model)."""

    model_type = "mdlm"
    attribute_map = {
        "hidden_size": "hidden_dim",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_blocks",
        "max_position_embeddings": "model_length",
    }

    def __init__(
        self,
        vocab_size: int = 50258,
        model_length: int = 1024,
        hidden_dim: int = 768,
        cond_dim: int = 128,
        n_blocks: int = 12,
        n_heads: int = 12,
        dropout: float = 0.1,
        time_conditioning: bool = False,
        **kwargs: Any,
    ):
        # mdlm-owt's auto_map points at its own modeling files; a natively saved checkpoint has none of them
        kwargs.pop("auto_map", None)
        kwargs.setdefault("tie_word_embeddings", False)
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        super().__init__(**kwargs)


@dataclass
class MDLMOutput(ModelOutput):
    """`logits` [B, L, V] (or [B, logits_to_keep, V]); `hidden_states`: the embeddings and each block's output;
    `cache`: the keys/values of every block (with `use_cache`)."""

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cache: Any = None


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (1 + scale) + shift, shift/scale [B, 1, D] broadcast over positions."""
    return x * (1 + scale) + shift


def _zero_init(linear: nn.Linear) -> nn.Linear:
    """Marks a layer MDLM initialises to zero (adaLN modulations, the output projection): `_init_weights` reads it."""
    linear.zero_init = True
    return linear


class MDLMLayerNorm(nn.Module):
    """MDLM's LayerNorm: no bias, eps 1e-5, computed in float32 (returns float32)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), [self.dim]) * self.weight.float()


class MDLMEmbedding(nn.Module):
    """The token embedding, a bare [V, D] parameter named `embedding` as in MDLM's checkpoint."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[input_ids]


class MDLMTimestepEmbedder(nn.Module):
    """sigma [B] -> sinusoidal features (cos then sin, `TIME_FREQUENCIES` of them) -> MLP -> [B, cond_dim]."""

    def __init__(self, cond_dim: int, frequencies: int = TIME_FREQUENCIES):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    @staticmethod
    def features(sigma: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        out = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            out = torch.cat([out, torch.zeros_like(out[:, :1])], dim=-1)
        return out

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        return self.mlp(self.features(sigma, self.frequencies).to(weight.dtype))


class MDLMRotary(nn.Module):
    """Rotary position embedding on the head dimension, halves rotated against each other (flash-attn's
    non-interleaved layout, which MDLM uses), applied to queries and keys (not values).

    `inv_freq` is a persistent buffer only because mdlm-owt's checkpoint stores it (a checkpoint saved
    here stays readable by MDLM's code); the angles are always recomputed in float32 from MDLM's fixed
    formula (base `ROPE_BASE`), so loading in bf16 cannot round them.
    """

    def __init__(self, head_dim: int, base: int = ROPE_BASE):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self.frequencies(), persistent=True)

    def frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.base ** (steps / self.head_dim))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, L, 1, head_dim] (float32) for integer positions [B, L]."""
        angles = position_ids.float()[..., None] * self.frequencies(position_ids.device)
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
        return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] rotated in float32: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class MDLMBlock(GradientCheckpointingLayer):
    """One DiT block (MDLM's `DDiTBlock`): adaLN-modulated bidirectional attention and MLP, each added
    through a gate: x + gate_msa * attn(mod(norm1 x)), then + gate_mlp * mlp(mod(norm2 x))."""

    def __init__(self, config: MDLMConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        dim, heads = config.hidden_dim, config.n_heads
        if dim % heads:
            raise ConfigError(f"hidden_dim {dim} is not divisible by n_heads {heads}", key="model")
        self.n_heads, self.head_dim, self.dropout = heads, dim // heads, float(config.dropout)
        self.norm1 = MDLMLayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = MDLMLayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = _zero_init(nn.Linear(config.cond_dim, 6 * dim))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """x [B, L, D]; c [B, cond_dim]; cos/sin from `MDLMRotary`; attn_mask bool [B, 1, 1, keys] (True = key
        attended) or None (every key); `cache`: a transformers Cache this block's keys/values are appended to
        (the queries then attend to the cached keys and their own)."""
        batch, length, dim = x.shape
        mods = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        dtype = self.attn_qkv.weight.dtype

        h = _modulate(self.norm1(x), shift_msa, scale_msa).to(dtype)
        q, k, v = self.attn_qkv(h).view(batch, length, 3, self.n_heads, self.head_dim).unbind(2)
        q, k, v = _rotate(q, cos, sin).transpose(1, 2), _rotate(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)
        attn = attn.transpose(1, 2).reshape(batch, length, dim)
        x = x + gate_msa * F.dropout(self.attn_out(attn), p=self.dropout, training=self.training)

        h = _modulate(self.norm2(x), shift_mlp, scale_mlp).to(dtype)
        return x + gate_mlp * F.dropout(self.mlp(h), p=self.dropout, training=self.training)


class MDLMFinalLayer(nn.Module):
    """MDLM's `DDitFinalLayer`: adaLN-modulated norm, then the vocabulary projection (with bias)."""

    def __init__(self, config: MDLMConfig):
        super().__init__()
        self.norm_final = MDLMLayerNorm(config.hidden_dim)
        self.linear = _zero_init(nn.Linear(config.hidden_dim, config.vocab_size))
        self.adaLN_modulation = _zero_init(nn.Linear(config.cond_dim, 2 * config.hidden_dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(_modulate(self.norm_final(x), shift, scale).to(self.linear.weight.dtype))


class MDLMBackbone(nn.Module):
    """MDLM's `DITBackbone` (parameter names as in mdlm-owt under `backbone.`)."""

    def __init__(self, config: MDLMConfig):
        super().__init__()
        self.config = config
        self.vocab_embed = MDLMEmbedding(config.hidden_dim, config.vocab_size)
        self.sigma_map = MDLMTimestepEmbedder(config.cond_dim)
        self.rotary_emb = MDLMRotary(config.hidden_dim // config.n_heads)
        self.blocks = nn.ModuleList([MDLMBlock(config, i) for i in range(config.n_blocks)])
        self.output_layer = MDLMFinalLayer(config)


class MDLMForMaskedLM(PreTrainedModel):
    """MDLM (mdlm-owt) as a transformers model: `forward(input_ids, attention_mask=None, position_ids=None,
    timesteps=None, ...)` -> `MDLMOutput(logits)`: raw logits, position i scoring token i (SUBS, the MASK
    logit at -inf, is the caller's: difflm.subs)."""

    config_class = MDLMConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _no_split_modules = ["MDLMBlock"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    #: read by `DiffusionLM` (also through a peft wrapper): this forward honours `attention_mask`
    handles_padding = True

    def __init__(self, config: MDLMConfig):
        super().__init__(config)
        self.backbone = MDLMBackbone(config)
        self.post_init()

    # -- transformers hooks ---------------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """MDLM's initialisation: torch's defaults for linear layers, kaiming-uniform embedding, unit norms,
        and zeros for every adaLN modulation and the output projection (so a fresh model predicts uniformly)."""
        if isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, MDLMEmbedding):
            init.kaiming_uniform_(module.embedding, a=math.sqrt(5))
        elif isinstance(module, MDLMLayerNorm):
            init.ones_(module.weight)
        elif isinstance(module, MDLMRotary):
            init.copy_(module.inv_freq, module.frequencies(module.inv_freq.device))

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.vocab_embed

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.output_layer.linear

    # -- forward --------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> MDLMOutput:
        """Raw logits [B, L, V] for `input_ids` [B, L].

        attention_mask: [B, keys], 1 = real token, 0 = padding (padded keys are never attended; padded query
            rows attend to the real tokens and their logits are meaningless). None: every token is real. With a
            cache it covers the cached keys, then the new ones.
        position_ids: [B, L] rotary positions; default 0..L-1 (after the cached length), as MDLM. Left padding
            needs none: rotary scores depend on position differences only, so the offset cancels.
        timesteps: the noise level sigma per row [B] (or a scalar); default 0. Ignored (0) when the config
            has `time_conditioning: false`, as MDLM's own code does.
        logits_to_keep: > 0 returns the last n positions' logits only (the output head skips the rest).
        cache, use_cache: a transformers Cache to attend to and extend (`use_cache` without one starts a
            `DynamicCache`); returned as `.cache`.
        """
        batch, length = input_ids.shape
        device = input_ids.device
        if timesteps is None or not self.config.time_conditioning:
            sigma = torch.zeros(batch, device=device, dtype=torch.float32)
        else:
            sigma = torch.as_tensor(timesteps, device=device, dtype=torch.float32).reshape(-1).expand(batch)
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)[None].expand(batch, -1)
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            keep = attention_mask.to(device).bool()
            keep = keep | ~keep.any(dim=1, keepdim=True)  # a row with no real token attends to all (no NaN)
            attn_mask = keep[:, None, None, :]

        bb = self.backbone
        x = bb.vocab_embed(input_ids)
        c = F.silu(bb.sigma_map(sigma)).to(x.dtype)
        cos, sin = bb.rotary_emb(position_ids.to(device))
        hidden = [x] if output_hidden_states else None
        for block in bb.blocks:
            x = block(x, c, cos, sin, attn_mask, cache=cache)
            if hidden is not None:
                hidden.append(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = bb.output_layer(x, c)
        return MDLMOutput(
            logits=logits, hidden_states=tuple(hidden) if hidden is not None else None, cache=cache
        )


def load_mdlm_module(path: str, **kwargs: Any) -> MDLMForMaskedLM:
    """`MDLMForMaskedLM.from_pretrained(path)` (no remote code), failing when a name does not land on the model.
    `kwargs` go to from_pretrained (dtype, device_map, ...)."""
    module, info = MDLMForMaskedLM.from_pretrained(path, output_loading_info=True, **kwargs)
    from .llada import check_loading_info

    check_loading_info(info, path, "MDLM's DiT")
    if module.config.time_conditioning:
        log.warning(
            "%s is time-conditioned, but difflm's decoders pass no noise level: it runs at sigma = 0", path
        )
    return module


#: What MDLM's own code (mdlm-owt's modeling_mdlm.py) is known to fail on here: transformers 5 expects
#: `all_tied_weights_keys`, which only `post_init()` (never called there) sets; it imports flash-attn (a CUDA
#: build only) and einops at module level.
_KNOWN_REMOTE_FAILURES = ("all_tied_weights_keys", "flash_attn", "flash-attn", "einops", "omegaconf")


@contextmanager
def remote_code_errors(name: str) -> Iterator[None]:
    """Loading MDLM's own code (trust_remote_code): its known failures become one `ConfigError` line that
    says to drop the flag (difflm's native DiT computes the same logits)."""
    try:
        yield
    except (ImportError, AttributeError) as err:
        text = str(err)
        if not any(k in text for k in _KNOWN_REMOTE_FAILURES):
            raise
        raise ConfigError(
            f"MDLM's own code in {name} does not run here ({first_line(err)}); drop --trust-remote-code "
            "(trust_remote_code=False): difflm loads MDLM natively",
            key="trust_remote_code",
        ) from None
