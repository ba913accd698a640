"""The model adapter every other part of difflm talks to: `DiffusionLM` and its `TokenIds`.

Samplers, training losses and evaluation never touch a family's quirks (Dream's shifted logits,
MDLM's timestep argument, BERT's [SEP] as end of text): they call `m(input_ids, attention_mask)`
and get logits [B, L, V] where position i predicts token i, and they read every special id from
`m.ids`. Ids are validated once here (mask inside the vocabulary, pad != mask), so a bad checkpoint
fails at load, not after an hour of decoding.
"""

from __future__ import annotations

import inspect

from typing import Any, Callable, Sequence

import torch
from torch import nn

from difflm.errors import ConfigError
from difflm.model_families import FAMILIES  # noqa: F401 (also difflm.models.FAMILIES)

from .ids import TokenIds

#: Default LoRA target modules per family, as candidate groups: the first group whose names all
#: occur in the module wins (BERT calls its projections query/key/value, ModernBERT fuses them
#: into Wqkv, GPT-2 into c_attn). LLaDA's follow the paper (r 64 on q/k/v).
_LORA_TARGETS: dict[str, list[list[str]]] = {
    "llada": [["q_proj", "k_proj", "v_proj"]],
    "dream": [["q_proj", "k_proj", "v_proj"]],
    "mdlm": [["attn_qkv", "attn_out"], ["attn_qkv"]],
    "mlm": [["query", "key", "value"], ["Wqkv"], ["q_lin", "k_lin", "v_lin"], ["q_proj", "k_proj", "v_proj"]],
    "ar": [["q_proj", "k_proj", "v_proj"], ["c_attn"], ["query_key_value"], ["qkv_proj"]],
}


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of whatever a model returned (tensor, ModelOutput, tuple or dict)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, dict):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _call_hf(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """LLaDA (native Llama or remote code), masked LMs and causal LMs: the standard HF call."""
    return logits_of(module(input_ids=input_ids, attention_mask=attention_mask))


def _call_mdlm(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """MDLM's DiT takes a noise level: the released model ignores it (time_conditioning False), so 0.
    difflm's native DiT (`difflm.models.mdlm`, `handles_padding`) takes the attention mask (and defaults the
    timestep to 0); MDLM's own code (trust_remote_code) has no attention mask, so padding is refused there."""
    if getattr(module, "handles_padding", False):
        return logits_of(module(input_ids=input_ids, attention_mask=attention_mask))
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(
            "MDLM has no attention mask: padded batches would attend to the padding; "
            "decode prompts of equal length (or one at a time)"
        )
    timesteps = torch.zeros(input_ids.shape[0], device=input_ids.device)
    return logits_of(module(input_ids=input_ids, timesteps=timesteps))


def _call_dream(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Dream predicts token i at position i-1 (it was initialised from an AR model): shift right.

    The native module (a bidirectional Qwen2, `difflm.models.dream.dream_logits`) takes the 2-D key mask and
    Dream's position ids. Dream's remote code (trust_remote_code) gets what its own sampler passes. Masks follow Dream's own sampler: no padding -> the string "full"; with (left) padding a boolean
    [B, 1, L, L] mask and position ids that start at 0 on the first real token. Unlike Dream's code
    the mask only hides padded KEYS (padded query rows stay finite instead of all-masked NaN).
    """
    from .dream import dream_logits, is_native_dream

    if is_native_dream(module):
        return dream_logits(module, input_ids, attention_mask)
    if attention_mask is None or bool(attention_mask.bool().all()):
        raw = logits_of(module(input_ids, "full", None))
    else:
        keep = attention_mask.bool()
        length = keep.shape[1]
        position_ids = keep.long().cumsum(-1) - 1
        position_ids = position_ids.masked_fill(~keep, 1)
        mask4d = keep[:, None, None, :].expand(-1, 1, length, length)
        raw = logits_of(module(input_ids, mask4d, position_ids))
    return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)


_FORWARDS: dict[str, Callable] = {
    "llada": _call_hf,
    "mlm": _call_hf,
    "ar": _call_hf,
    "mdlm": _call_mdlm,
    "dream": _call_dream,
}


def _module_leaf_names(module: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}


def default_lora_targets(module: nn.Module, family: str) -> list[str]:
    """The first candidate group of `_LORA_TARGETS[family]` whose names all exist in `module`."""
    names = _module_leaf_names(module)
    groups = _LORA_TARGETS.get(family, [])
    for group in groups:
        if all(n in names for n in group):
            return list(group)
    return list(groups[0]) if groups else []


class DiffusionLM:
    """A loaded model plus what decoding needs to know about it.

    Attributes: `module` (the torch module, eval mode; a `peft.PeftModel` when an adapter was
    loaded), `tokenizer` (or None), `ids` (`TokenIds`), `family`, `name`, `max_length` (context
    length from the config, or None), `vocab_size` (rows of the output head, or None), `device`,
    `dtype`, `is_diffusion`, `lora_target_modules`.

    Calling it runs one forward pass: `m(input_ids, attention_mask=None) -> logits [B, L, V]`
    with position i scoring token i (Dream's shift undone). `attention_mask` is 1 for real tokens
    and 0 for (left) padding; None is passed to the module as None. The logits keep the model's
    dtype (bf16 for a bf16 model): samplers upcast where they need to. No `torch.no_grad()` here,
    so training uses the same call.
    """

    def __init__(
        self,
        module: nn.Module,
        family: str,
        ids: TokenIds,
        tokenizer: Any = None,
        name: str = "",
        max_length: int | None = None,
        vocab_size: int | None = None,
        lora_target_modules: Sequence[str] | None = None,
    ):
        if family not in FAMILIES:
            raise ConfigError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}", key="family")
        self.module = module
        self.family = family
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.ids = ids.validate(family, vocab_size, name or type(module).__name__)
        self.lora_target_modules = (
            list(lora_target_modules) if lora_target_modules is not None else default_lora_targets(module, family)
        )
        self._forward = _FORWARDS[family]
        self._keeps: bool | None = None

    @classmethod
    def from_module(cls, module: nn.Module, family: str, ids: TokenIds, **kwargs: Any) -> "DiffusionLM":
        """Wrap a module built in memory (tests, custom models); puts it in eval mode like load_model.
        Keyword arguments are those of the constructor (tokenizer, name, max_length, vocab_size, ...)."""
        module.eval()
        return cls(module, family, ids, **kwargs)

    # -- properties -------------------------------------------------------------------------------
    @property
    def is_diffusion(self) -> bool:
        return self.family != "ar"

    def _first_parameter(self) -> torch.Tensor | None:
        return next(iter(self.module.parameters()), None)

    @property
    def device(self) -> torch.device:
        p = self._first_parameter()
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the first floating parameter's (quantized weights are uint8/int8)."""
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    # -- forward ----------------------------------------------------------------------------------
    #: `forward` takes `logits_to_keep` (decoders use it to skip the output head over the prompt)
    accepts_logits_to_keep = True

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int | None = None
    ) -> torch.Tensor:
        """Logits [B, L, V] for `input_ids` [B, L]; inputs are moved to the model's device.

        `logits_to_keep=n` returns the logits of the last n positions only, [B, n, V]. On the native LLaDA
        and MDLM paths the model then runs the output head (the vocabulary projection, the largest matmul at a
        126k vocabulary) on those positions alone; other families compute all and slice.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        if logits_to_keep is None:
            return self._forward(self.module, input_ids, attention_mask)
        if self.family == "dream" and self._head_keeps_logits():  # the head on one slot more, then the shift
            from .dream import dream_logits

            return dream_logits(self.module, input_ids, attention_mask, logits_to_keep)
        if self._head_keeps_logits():
            return logits_of(self.module(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep))
        return self._forward(self.module, input_ids, attention_mask)[:, -logits_to_keep:]

    def _head_keeps_logits(self) -> bool:
        """Whether the (base) module's forward takes `logits_to_keep` (transformers' causal LMs do)."""
        if self._keeps is None:
            base = self.module.get_base_model() if hasattr(self.module, "get_base_model") else self.module
            from .dream import is_native_dream

            native = self.family in ("llada", "mdlm") or (self.family == "dream" and is_native_dream(base))
            self._keeps = native and "logits_to_keep" in inspect.signature(base.forward).parameters
        return self._keeps

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int | None = None
    ) -> torch.Tensor:
        return self.forward(input_ids, attention_mask, logits_to_keep)

    # -- text -------------------------------------------------------------------------------------
    def chat_ids(self, messages_or_text: str | Sequence[dict]) -> list[int]:
        """Token ids of a chat prompt ending with the assistant header (add_generation_prompt=True).

        A plain string is one user turn. Uses the tokenizer's own chat template, which writes any
        BOS itself (no extra special tokens are added): rendered and encoded as `encode_prompt` and
        the lm-eval wrapper do (`difflm.data.prompts.render_chat`, `encode_text`).
        """
        from difflm.data.prompts import encode_text, render_chat

        if self.tokenizer is None:
            raise ConfigError(
                f"{self.name or 'this model'} has no tokenizer, so text prompts are impossible; "
                "pass tokenizer=... to load_model",
                key="tokenizer",
            )
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ConfigError(
                f"the tokenizer of {self.name or 'this model'} has no chat template; use a plain prompt format",
                key="tokenizer",
            )
        if isinstance(messages_or_text, str):
            messages = [{"role": "user", "content": messages_or_text}]
        else:
            messages = list(messages_or_text)
        return encode_text(self.tokenizer, render_chat(self.tokenizer, messages))

    def __repr__(self) -> str:
        return (
            f"DiffusionLM(name={self.name!r}, family={self.family!r}, ids={self.ids}, "
            f"device={self.device}, dtype={self.dtype}, max_length={self.max_length})"
        )
