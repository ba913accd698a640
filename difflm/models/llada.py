"""LLaDA as a bidirectional Llama: config and parameter mapping, the load-time checks, native saving.

LLaDA-8B is a Llama-style transformer whose remote code does not load on transformers 5.x; its
weights are a pure rename of `LlamaForCausalLM`'s. With transformers 5.x,
`LlamaForCausalLM(LlamaConfig(..., is_causal=False))` reproduces LLaDA's logits (tested within 1e-4
against logits of LLaDA's own code on tests/fixtures/llada-tiny-reference; the mapping is tabled in
difflm/models/README.md), and gives us what LLaDA's code lacks: gradient checkpointing, sdpa/flash
attention, bitsandbytes and peft support.

Two on-disk formats load as this model:
- LLaDA's own (config model_type "llada", `model.transformer.blocks.{i}...` names): the config is
  translated by `llama_config_from_llada` and the names by `from_pretrained(key_mapping=...)`.
- difflm's native one (model_type "llama" with `is_causal: false` and `mask_token_id`), written by
  `save_native`: a plain Llama checkpoint that any transformers 5.x loads.

transformers 4.x ignores `is_causal=False` and silently builds a causal model, so every load runs
`check_bidirectional` (difflm.models.checks: change the last token, position 0 must move).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from difflm.errors import ConfigError
from difflm.io import usual_permissions

from .base import DiffusionLM, TokenIds
from .checks import BidirectionalityError, check_bidirectional  # noqa: F401  (their home was here)

# LLaDA checkpoint key -> Llama key. transformers' key_mapping supports ONE capture group (`\1`) per
# rule (a `\2` is written literally into the key), hence one rule per projection. The rules are
# anchored on `model.transformer.`, so renamed keys never match a second rule (renamings chain).
LLADA_KEY_MAPPING: dict[str, str] = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.": r"model.layers.\1.input_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.q_proj\.": r"model.layers.\1.self_attn.q_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.k_proj\.": r"model.layers.\1.self_attn.k_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.v_proj\.": r"model.layers.\1.self_attn.v_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_out\.": r"model.layers.\1.self_attn.o_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.up_proj\.": r"model.layers.\1.mlp.up_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_out\.": r"model.layers.\1.mlp.down_proj.",
}

# LLaDA config fields whose other values change the architecture away from a Llama; the mapping
# refuses them instead of loading a silently different model. (field, accepted values)
_REQUIRED_LLADA_FIELDS: list[tuple[str, tuple]] = [
    ("block_type", ("llama",)),
    ("activation_type", ("silu",)),
    ("layer_norm_type", ("rms",)),
    ("rope", (True,)),
    ("alibi", (False, None)),
    ("include_bias", (False, None)),
    ("include_qkv_bias", (False, None)),
    ("bias_for_layer_norm", (False, None)),
    ("layer_norm_with_affine", (True, None)),
    ("attention_layer_norm", (False, None)),
    ("input_emb_norm", (False, None)),
    ("scale_logits", (False, None)),
    ("multi_query_attention", (False, None)),
    ("clip_qkv", (None,)),
]


def read_config(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def is_llada_format(config: dict[str, Any]) -> bool:
    return str(config.get("model_type", "")).lower() == "llada"


def is_native_bidirectional(config: dict[str, Any]) -> bool:
    """difflm's native format: a decoder config with `is_causal: false` and a mask id."""
    return config.get("is_causal") is False and config.get("mask_token_id") is not None


def llama_config_from_llada(config: dict[str, Any]):
    """Translate LLaDA's config fields into a bidirectional `LlamaConfig` (table: difflm/models/README.md).

    The token ids (mask/eos/pad/bos/eot) are stored on the config too, so that a plain
    `module.save_pretrained(dir)` already writes difflm's native format.
    """
    from transformers import LlamaConfig

    for field, allowed in _REQUIRED_LLADA_FIELDS:
        if field in config and config[field] not in allowed:
            raise ConfigError(
                f"LLaDA config field {field}={config[field]!r} is not supported by the bidirectional-Llama "
                f"mapping (supported: {allowed[0]!r}); load with trust_remote_code=True instead",
                key=field,
            )
    d_model = int(config["d_model"])
    n_heads = int(config["n_heads"])
    if d_model % n_heads:
        raise ConfigError(f"LLaDA config: d_model {d_model} is not a multiple of n_heads {n_heads}", key="n_heads")
    mlp = config.get("mlp_hidden_size") or int(config.get("mlp_ratio", 4)) * d_model
    vocab = int(config.get("embedding_size") or config["vocab_size"])
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=int(mlp),
        num_hidden_layers=int(config["n_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=int(config.get("n_kv_heads") or n_heads),
        head_dim=d_model // n_heads,
        hidden_act="silu",
        max_position_embeddings=int(config.get("max_sequence_length", 4096)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        use_cache=False,
        is_causal=False,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        mask_token_id=config.get("mask_token_id"),
        eot_token_id=config.get("eot_token_id"),
        architectures=["LlamaForCausalLM"],
    )


def check_loading_info(info: dict[str, Any], name: str, what: str = "a bidirectional Llama") -> None:
    """Fail when the checkpoint's names did not all land on the model (`what`: the native class it was loaded as;
    for LLaDA, a key_mapping that is incomplete)."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in (info.get(kind) or ()))
        if keys:
            shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if info.get("error_msgs"):
        problems.append(f"errors: {info['error_msgs'][0]}")
    if problems:
        raise ConfigError(f"{name} does not load as {what}; " + "; ".join(problems), key="model")


def load_llama_module(path: str, config=None, key_mapping: dict | None = None, **kwargs) -> nn.Module:
    """`LlamaForCausalLM.from_pretrained` (or the Auto class for a native config), checked.

    `kwargs` go to from_pretrained (dtype, device_map, quantization_config, ...).
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cls = LlamaForCausalLM if config is not None else AutoModelForCausalLM
    extra = {"config": config} if config is not None else {}
    if key_mapping is not None:
        extra["key_mapping"] = key_mapping
    module, info = cls.from_pretrained(path, output_loading_info=True, **extra, **kwargs)
    check_loading_info(info, path)
    # transformers 5.x remembers the key_mapping and would REVERT it in save_pretrained, writing LLaDA
    # parameter names under a Llama config. Forget it: this module's own format is the native one.
    if key_mapping is not None:
        module._weight_conversions = []
    return module


def save_native(
    model: DiffusionLM | nn.Module, dir: str | Path, tokenizer: Any = None, ids: TokenIds | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Save a LLaDA-family model in difflm's native format (bidirectional Llama) and return `dir`.

    Writes config.json (model_type "llama", `is_causal: false`, `use_cache: false`, and
    `mask_token_id`, `eos_token_id`, `pad_token_id`, `bos_token_id`, `eot_token_id`), safetensors
    weights with Llama names, and the tokenizer when there is one, so that
    `load_model(dir)` auto-detects family "llada" and finds every id. A peft-wrapped model must be
    merged first (`module.merge_and_unload()`), or its adapter saved alone with `save_pretrained`.
    `state_dict`: the weights to write instead of the module's own (e.g. FSDP2's gathered full weights).
    """
    if isinstance(model, DiffusionLM):
        if model.family != "llada":
            raise ConfigError(f"save_native writes LLaDA-family models only, not {model.family!r}", key="family")
        module, ids = model.module, ids or model.ids
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    else:
        module = model
    if ids is None:
        raise ConfigError("save_native needs the token ids (pass ids=TokenIds(...))", key="ids")
    if hasattr(module, "peft_config"):
        raise ConfigError(
            "save_native got a peft model: merge it first (module.merge_and_unload()) or save the adapter alone",
            key="model",
        )
    config = getattr(module, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        raise ConfigError(
            "save_native needs a natively loaded LLaDA model (a Llama module; not trust_remote_code)", key="model"
        )
    config.is_causal = False
    config.use_cache = False
    config.mask_token_id = ids.mask_id
    config.eos_token_id = ids.eos_id
    config.pad_token_id = ids.pad_id
    config.bos_token_id = ids.bos_id
    config.eot_token_id = ids.eot_id
    generation_config = getattr(module, "generation_config", None)
    if generation_config is not None:  # keep generation_config.json consistent with config.json
        for field in ("eos_token_id", "pad_token_id", "bos_token_id"):
            setattr(generation_config, field, getattr(config, field))
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(str(dir), state_dict=state_dict, save_original_format=False)
    for weights in dir.glob("*.safetensors"):  # safetensors >= 0.8 writes them 0600, whatever the umask
        usual_permissions(weights)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dir))
    return dir
