"""Model loading and the adapter the rest of difflm uses.

    from difflm.models import load_model
    m = load_model("GSAI-ML/LLaDA-8B-Instruct", dtype="bfloat16")
    logits = m(input_ids, attention_mask)      # [B, L, V], position i scores token i
    m.ids.mask_id, m.ids.eos_id, m.chat_ids("Hello")

LLaDA checkpoints load natively as a bidirectional `LlamaForCausalLM` (no remote code; gradient
checkpointing, sdpa, bitsandbytes and peft work); see `difflm.models.llada`. What each module
holds: difflm/models/README.md.
"""

from .base import FAMILIES, DiffusionLM, default_lora_targets, logits_of
from .checks import BidirectionalityError, check_bidirectional
from .families import detect_family
from .ids import TokenIds, resolve_ids
from .llada import LLADA_KEY_MAPPING, llama_config_from_llada, save_native
from .loading import load_model, resolve_dtype, resolve_device

__all__ = [
    "FAMILIES",
    "LLADA_KEY_MAPPING",
    "BidirectionalityError",
    "DiffusionLM",
    "TokenIds",
    "check_bidirectional",
    "default_lora_targets",
    "detect_family",
    "llama_config_from_llada",
    "load_model",
    "logits_of",
    "resolve_device",
    "resolve_dtype",
    "resolve_ids",
    "save_native",
]
