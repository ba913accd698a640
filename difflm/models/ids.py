"""Special token ids: `TokenIds` (what samplers and losses read) and each family's rules for finding them.

Ids come from config.json and the tokenizer's vocabulary, never from encoding a string (an encoding
adds or merges tokens differently per tokenizer). The per-family table: difflm/models/README.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from difflm.errors import ConfigError

log = logging.getLogger(__name__)

# The end-of-turn token of each family's chat template (looked up by token, never by encoding text).
_EOT_TOKENS = {"llada": ("<|eot_id|>",), "dream": ("<|im_end|>",), "ar": ("<|eot_id|>", "<|im_end|>", "<|end|>")}


def stop_ids_from(eos_id: int | None, eot_id: int | None) -> tuple[int, ...]:
    """The ids that end an answer: eos, then eot when it differs (None left out)."""
    return tuple(dict.fromkeys(i for i in (eos_id, eot_id) if i is not None))


@dataclass(frozen=True)
class TokenIds:
    """The special token ids a sampler or a loss needs, validated at load.

    mask_id: the [MASK] token of a diffusion LM (None only for "ar" models).
    eos_id:  end of text (for BERT-style models: [SEP]).
    eot_id:  end of a chat turn (`<|eot_id|>` for LLaDA, `<|im_end|>` for Dream), or None.
    pad_id:  the padding id (may equal eos_id, as in LLaDA; never mask_id).
    bos_id:  beginning of text, or None.
    """

    mask_id: int | None
    eos_id: int | None
    eot_id: int | None = None
    pad_id: int | None = None
    bos_id: int | None = None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an answer (eos and eot), for cutting outputs and for EOS fill."""
        return stop_ids_from(self.eos_id, self.eot_id)

    @property
    def pad_or_eos(self) -> int | None:
        """The id to left-pad a batch of prompts with: pad, or eos when the model has no pad."""
        return self.pad_id if self.pad_id is not None else self.eos_id

    def validate(self, family: str, vocab_size: int | None = None, name: str = "model") -> "TokenIds":
        """Raise ConfigError when the ids cannot work: missing/out-of-vocabulary mask, pad == mask."""
        if family != "ar" and self.mask_id is None:
            raise ConfigError(
                f"no mask token id found for {name} (family {family}): set mask_token_id in its config.json",
                key="mask_id",
            )
        for field in ("mask_id", "eos_id", "eot_id", "pad_id", "bos_id"):
            value = getattr(self, field)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{field} {value!r} of {name} is not a non-negative integer", key=field)
            if vocab_size is not None and value >= vocab_size:
                raise ConfigError(
                    f"{field} {value} of {name} is outside the vocabulary (size {vocab_size})", key=field
                )
        if self.mask_id is not None and self.pad_id == self.mask_id:
            raise ConfigError(
                f"pad id equals the mask id ({self.mask_id}) for {name}: padding would look like masked "
                "positions; set a different pad_token_id",
                key="pad_id",
            )
        return self


def scalar_int(value: Any) -> int | None:
    """Config ids may be lists (Llama-3: eos [128001, 128009]); the first one is THE id."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if value is not None else None


def first_int(*values: Any) -> int | None:
    """The first of `values` that is set, as an int (a list counts as its first element)."""
    for v in values:
        v = scalar_int(v)
        if v is not None:
            return v
    return None


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a token string in the vocabulary, or None (no unk fallback, no text encoding)."""
    if tokenizer is None:
        return None
    try:
        tid = tokenizer.convert_tokens_to_ids(token)
    except (KeyError, ValueError, TypeError):
        return None
    if tid is None or (isinstance(tid, list)):
        return None
    if tokenizer.convert_ids_to_tokens(tid) != token:  # unknown tokens come back as unk_token_id
        return None
    return int(tid)


def resolve_ids(family: str, config: dict[str, Any], tokenizer: Any = None, vocab_size: int | None = None) -> TokenIds:
    """The family's rules for special ids (table: difflm/models/README.md). Never derived by encoding text.

    - llada, dream: the config's mask/eos/pad first (they define the model), the tokenizer for bos
      and for the end-of-turn token (`<|eot_id|>`, `<|im_end|>`), pad falls back to eos.
    - mdlm: the config, then the tokenizer; MDLM appends [MASK] after GPT-2's vocabulary, so
      without an explicit id the mask is the last id (50257) and eos = bos = pad = 50256.
    - mlm: the tokenizer's [MASK], [SEP] (or eos), [PAD], [CLS] (or bos).
    - ar: the tokenizer's eos/pad/bos (pad falls back to eos); no mask.
    """
    cfg = config.get
    tok = (lambda attr: getattr(tokenizer, attr, None)) if tokenizer is not None else (lambda attr: None)
    eot_from_tok = first_int(*(token_id(tokenizer, t) for t in _EOT_TOKENS.get(family, ())))
    if family in ("llada", "dream"):
        mask = first_int(cfg("mask_token_id"), tok("mask_token_id"))
        eos = first_int(cfg("eos_token_id"), tok("eos_token_id"))
        pad = first_int(cfg("pad_token_id"), tok("pad_token_id"), eos)
        bos = first_int(tok("bos_token_id"), cfg("bos_token_id"))
        eot = first_int(eot_from_tok, cfg("eot_token_id"))
        tok_mask = scalar_int(tok("mask_token_id"))
        if tok_mask is not None and mask is not None and tok_mask != mask:
            log.warning("tokenizer mask id %s differs from the config's %s; using the config's", tok_mask, mask)
    elif family == "mdlm":
        gpt2_like = vocab_size == 50258
        mask = first_int(cfg("mask_token_id"), tok("mask_token_id"), (vocab_size - 1) if vocab_size else None)
        eos = first_int(tok("eos_token_id"), cfg("eos_token_id"), 50256 if gpt2_like else None)
        bos = first_int(tok("bos_token_id"), cfg("bos_token_id"), eos)
        pad = first_int(tok("pad_token_id"), cfg("pad_token_id"), eos)
        eot = first_int(cfg("eot_token_id"))
    elif family == "mlm":
        mask = first_int(tok("mask_token_id"), cfg("mask_token_id"))
        eos = first_int(tok("sep_token_id"), tok("eos_token_id"), cfg("sep_token_id"), cfg("eos_token_id"))
        pad = first_int(tok("pad_token_id"), cfg("pad_token_id"))
        bos = first_int(tok("cls_token_id"), tok("bos_token_id"), cfg("cls_token_id"), cfg("bos_token_id"))
        eot = None
    else:  # ar
        mask = None
        eos = first_int(tok("eos_token_id"), cfg("eos_token_id"))
        pad = first_int(tok("pad_token_id"), cfg("pad_token_id"), eos)
        bos = first_int(tok("bos_token_id"), cfg("bos_token_id"))
        eot = first_int(eot_from_tok, cfg("eot_token_id"))
    return TokenIds(mask_id=mask, eos_id=eos, eot_id=eot, pad_id=pad, bos_id=bos)
