"""The families: which one a config.json describes (`detect_family`), how each loads (`load_module`).

llada: natively as a bidirectional `LlamaForCausalLM` (`difflm.models.llada`), or LLaDA's own code
with trust_remote_code; dream: natively as a bidirectional `Qwen2ForCausalLM` (`difflm.models.dream`), or
Dream's own code with trust_remote_code (RoPE buffers rebuilt); mdlm: natively as MDLM's DiT
(`difflm.models.mdlm`), or its own code with trust_remote_code; mlm: `AutoModelForMaskedLM`; ar:
`AutoModelForCausalLM` (a packaged GGUF file is dequantised).
The table with each family's ids and quirks: difflm/models/README.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from torch import nn

from difflm.errors import ConfigError

from .base import FAMILIES
from .dream import is_dream_format, load_dream_module, rebuild_rope, remote_code_error
from .llada import LLADA_KEY_MAPPING, is_llada_format, is_native_bidirectional, llama_config_from_llada, load_llama_module


def detect_family(config: dict[str, Any], name: str = "model") -> str:
    """The family from config.json alone (no weights are read)."""
    model_type = str(config.get("model_type", "")).lower()
    archs = [str(a) for a in (config.get("architectures") or [])]
    if is_llada_format(config) or any(a.lower().startswith("llada") for a in archs):
        return "llada"
    if is_dream_format(config):  # Dream's own format, or difflm's native Dream (before the native LLaDA rule)
        return "dream"
    if is_native_bidirectional(config):
        return "llada"
    if model_type == "mdlm" or "MDLM" in archs:
        return "mdlm"
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "mlm"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "ar"
    from transformers.models.auto import modeling_auto

    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # before causal: bert is in both
        return "mlm"
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "ar"
    raise ConfigError(
        f"cannot tell the model family of {name} (model_type {model_type or None!r}); "
        f"pass family= one of {', '.join(FAMILIES)}",
        key="family",
    )


@contextmanager
def gguf_progress_bar():
    """transformers' GGUF dequantisation draws its tqdm bar directly, ignoring
    `transformers.utils.logging.disable_progress_bar()` (which the CLI calls for its own spinner):
    make that bar follow the same switch."""
    from functools import partial

    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_module(
    family: str, source: str, config: dict[str, Any], kwargs: dict[str, Any], trust_remote_code: bool
) -> nn.Module:
    """The torch module of `family` from `source`; `kwargs` go to from_pretrained (dtype, device_map, ...)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    if kwargs.get("gguf_file"):  # a packaged GGUF model: transformers dequantises it (family ar)
        with gguf_progress_bar():
            return AutoModelForCausalLM.from_pretrained(source, **kwargs)

    if family == "llada":
        if trust_remote_code:  # LLaDA's own code (runs on transformers 4.x; not on 5.24 without patches)
            return AutoModel.from_pretrained(source, trust_remote_code=True, **kwargs)
        if is_llada_format(config):
            llama_config = llama_config_from_llada(config)
            return load_llama_module(source, config=llama_config, key_mapping=LLADA_KEY_MAPPING, **kwargs)
        return load_llama_module(source, **kwargs)  # native format (or any decoder forced to "llada")
    if family == "dream":
        if not trust_remote_code:  # natively: a bidirectional Qwen2 (difflm.models.dream)
            return load_dream_module(source, config, **kwargs)
        try:  # Dream's own code, opt-in: its known failures on transformers 5 become one line
            module = AutoModel.from_pretrained(source, trust_remote_code=True, **kwargs)
        except (KeyError, TypeError) as err:
            known = remote_code_error(err, source)
            if known is None:
                raise
            raise known from None
        rebuild_rope(module, source)  # from_pretrained leaves them uninitialised
        return module
    if family == "mdlm":
        if trust_remote_code:  # MDLM's own code: fails on transformers 5 and without flash-attn (one line)
            from .mdlm import remote_code_errors

            with remote_code_errors(source):
                return AutoModelForMaskedLM.from_pretrained(source, trust_remote_code=True, **kwargs)
        from .mdlm import load_mdlm_module

        return load_mdlm_module(source, **kwargs)
    if family == "mlm":
        return AutoModelForMaskedLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
