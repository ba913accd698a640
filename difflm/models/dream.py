"""Dream natively: a bidirectional `Qwen2ForCausalLM` whose slot i scores token i after a one-position shift.

Dream-v0 (Dream-org/Dream-v0-Instruct-7B, Dream-org/Dream-v0-Base-7B) is a Qwen2-architecture transformer run
without a causal mask, initialised from an autoregressive model, so its output at position i-1 scores token i.
Its parameter names are exactly `Qwen2ForCausalLM`'s (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`
with bias, ..., `lm_head`): the checkpoint loads with no renaming into
`Qwen2ForCausalLM(Qwen2Config(..., is_causal=False))`, checked to have no missing or unexpected keys.

Why not Dream's own code: on transformers 5 it fails to load (`ROPE_INIT_FUNCTIONS["default"]` is gone,
`DreamGenerationConfig.validate` lacks `**kwargs`), and patched just enough to load it is silently wrong:
`from_pretrained` initialises on the meta device and Dream's `_init_weights` never rebuilds the RoPE `inv_freq`
buffers, so its logits change from process to process. The native module also brings SDPA, gradient
checkpointing, peft and bitsandbytes. `remote_code_error` turns the known failures of the remote path into one
line; `rebuild_rope` repairs (or refuses) a remote-code module whose RoPE buffers were left uninitialised.

The forward (`dream_logits`): no padding -> plain call; left padding -> the 2-D key mask and position ids that
start at 0 on the first real token (Dream's sampler: `cumsum(mask) - 1`, padded slots 1), then the shift
`cat([logits[:, :1], logits[:, :-1]], 1)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difflm.errors import ConfigError

#: config.json marker of a Dream model saved in difflm's native format (a qwen2 config): the family must come
#: back as "dream" (the shift), not as the native LLaDA format that `is_causal: false` alone would mean
NATIVE_MARKER = ("difflm_family", "dream")

# Dream config fields whose other values make a different architecture than the native mapping builds.
_REQUIRED_DREAM_FIELDS: list[tuple[str, tuple]] = [
    ("hidden_act", ("silu",)),
    ("use_sliding_window", (False, None)),
    ("rope_scaling", (None,)),
]


_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def is_dream_format(config: dict[str, Any]) -> bool:
    """Dream's own format (model_type "Dream" / a Dream* architecture) or difflm's native Dream."""
    archs = [str(a) for a in (config.get("architectures") or [])]
    if str(config.get("model_type", "")).lower() == "dream" or any(a.startswith("Dream") for a in archs):
        return True
    return config.get(NATIVE_MARKER[0]) == NATIVE_MARKER[1]


def qwen2_config_from_dream(config: dict[str, Any]):
    """A bidirectional `Qwen2Config` from Dream's config.json fields (the ids stored on it too)."""
    from transformers import Qwen2Config

    for field, allowed in _REQUIRED_DREAM_FIELDS:
        if config.get(field) not in allowed:
            raise ConfigError(
                f"Dream config field {field}={config[field]!r} is not supported by the native Qwen2 mapping "
                f"(supported: {allowed[0]!r})",
                key=field,
            )
    missing = [f for f in _SIZE_FIELDS if config.get(f) is None]
    if missing:
        raise ConfigError(f"Dream config.json lacks {', '.join(missing)}: not a Dream checkpoint", key="model")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if hidden % heads:
        raise ConfigError(f"Dream config: hidden_size {hidden} is not a multiple of {heads} heads", key="hidden_size")
    n_layers = int(config["num_hidden_layers"])
    return Qwen2Config(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        hidden_act="silu",
        max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        use_sliding_window=False,
        layer_types=["full_attention"] * n_layers,
        use_cache=False,
        is_causal=False,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        mask_token_id=config.get("mask_token_id"),
        architectures=["Qwen2ForCausalLM"],
        **{NATIVE_MARKER[0]: NATIVE_MARKER[1]},
    )


def load_dream_module(path: str, config: dict[str, Any], **kwargs) -> nn.Module:
    """`Qwen2ForCausalLM.from_pretrained` of a Dream checkpoint (Dream's format or difflm's native one), checked:
    every checkpoint name must land on the model (no renaming). kwargs go to from_pretrained."""
    from transformers import Qwen2ForCausalLM

    from .llada import check_loading_info

    qwen2 = qwen2_config_from_dream(config) if str(config.get("model_type", "")).lower() != "qwen2" else None
    extra = {"config": qwen2} if qwen2 is not None else {}
    module, info = Qwen2ForCausalLM.from_pretrained(path, output_loading_info=True, **extra, **kwargs)
    check_loading_info(info, path, "a bidirectional Qwen2 (Dream)")
    setattr(module.config, *NATIVE_MARKER)  # save_pretrained writes the marker: it reloads as "dream"
    module.config.is_causal = False
    return module


def is_native_dream(module: nn.Module) -> bool:
    """Whether `module` (possibly peft-wrapped) is the native Qwen2 Dream, not Dream's remote code."""
    config = getattr(module, "config", None)
    return str(getattr(config, "model_type", "")).lower() == "qwen2"


def dream_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Dream's sampler's positions for left padding: 0 at the first real token; padded slots get 1."""
    keep = attention_mask.bool()
    return (keep.long().cumsum(-1) - 1).masked_fill(~keep, 1)


def shift_logits(raw: torch.Tensor) -> torch.Tensor:
    """Dream's shift: slot i takes the output at i-1 (slot 0 keeps its own)."""
    return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)


def dream_logits(
    module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, logits_to_keep: int | None = None
) -> torch.Tensor:
    """Shifted logits of the native module [B, L, V] (or of the last `logits_to_keep` slots: the head then runs
    on one position more than that, the one whose output the first kept slot takes)."""
    from .base import logits_of

    kw: dict[str, Any] = {}
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        kw = {"attention_mask": attention_mask, "position_ids": dream_position_ids(attention_mask)}
    n = input_ids.shape[1]
    if logits_to_keep is not None and logits_to_keep < n:
        raw = logits_of(module(input_ids=input_ids, logits_to_keep=logits_to_keep + 1, **kw))
        return raw[:, :-1]
    out = shift_logits(logits_of(module(input_ids=input_ids, **kw)))
    return out if logits_to_keep is None else out[:, -logits_to_keep:]


# -- remote code (opt-in) -------------------------------------------------------------------------------
_DROP = "drop --trust-remote-code (trust_remote_code=False): difflm loads Dream natively as a bidirectional Qwen2"


def remote_code_error(err: BaseException, name: str) -> ConfigError | None:
    """One line for the known failures of Dream's remote code on transformers 5, or None for any other error."""
    import transformers

    text = str(err)
    version = transformers.__version__
    if isinstance(err, KeyError) and text.strip("'\"") == "default":
        why = "its RoPE setup asks for ROPE_INIT_FUNCTIONS['default'], which transformers 5 removed"
    elif isinstance(err, TypeError) and "user_set_attributes" in text:
        why = "DreamGenerationConfig.validate() does not take transformers 5's user_set_attributes argument"
    else:
        return None
    return ConfigError(f"{name}: Dream's remote code does not run on transformers {version} ({why}); {_DROP}",
                       key="trust_remote_code")


def rebuild_rope(module: nn.Module, name: str) -> int:
    """Recompute the RoPE `inv_freq` buffers of Dream's remote-code module, which `from_pretrained` leaves
    uninitialised (meta-device init; Dream's `_init_weights` does not rebuild them): its logits would otherwise
    be silently wrong and differ from run to run. Uses each rotary module's own `reset_rope_parameters()`;
    refuses (ConfigError) a module holding `inv_freq` without it. Returns how many buffers were rebuilt."""
    rebuilt = 0
    for sub in module.modules():
        if "inv_freq" not in getattr(sub, "_buffers", {}):
            continue
        reset = getattr(sub, "reset_rope_parameters", None)
        if not callable(reset):
            raise ConfigError(
                f"{name}: the remote code's RoPE buffers (inv_freq) are left uninitialised by from_pretrained and it "
                f"offers no reset_rope_parameters() to rebuild them, so its logits would be silently wrong; {_DROP}",
                key="trust_remote_code",
            )
        with torch.no_grad():
            reset()
        rebuilt += 1
    return rebuilt
