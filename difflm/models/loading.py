"""`load_model`: one call from a folder or Hub name to a validated `DiffusionLM`.

Why a single entry point: every family needs a different Auto class, a different rule for its
special ids and a different forward call, and each has a trap that costs hours when missed
(LLaDA's remote code does not run on transformers 5; transformers 4 silently makes the Llama
mapping causal; Dream's logits are shifted; an offline Hub lookup retries for tens of seconds).
All of that is decided through here, once, and the rest of difflm sees only `DiffusionLM`.

This module holds the entry point, its argument checks and where a name points to; each step it
takes lives in its own module (hub, named, families, tokenizer, ids, checks: difflm/models/README.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflm.errors import ConfigError, first_line
from difflm.model_families import FAMILY_CHOICES

from .base import DiffusionLM
from .checks import check_adapter, check_bidirectional, check_finite
from .families import detect_family, load_module
from .hub import hub_config_file, hub_errors, looks_like_repo_id
from .ids import first_int, resolve_ids
from .known import known_checkpoint_family
from .llada import read_config
from .named import PACKAGED_MODELS, embedded_model_dir, packaged_gguf
from .tokenizer import load_tokenizer

# Re-exported: these lived here before the split (callers import them from difflm.models.loading).
from .hub import hub_offline, hub_reachable  # noqa: F401
from .ids import token_id  # noqa: F401
from .named import DEFAULT_MODEL, EMBEDDED_MODELS, PackagedModel, packaged_model_file  # noqa: F401

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_QUANTIZATIONS = ("4bit", "8bit")
_MAX_LENGTH_KEYS = (
    "max_position_embeddings", "max_sequence_length", "n_positions", "model_length", "max_seq_len", "seq_length"
)


# -- argument checks --------------------------------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A torch dtype, or "auto" (the checkpoint's own dtype; also for None)."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype {dtype} is not a floating-point type", key="dtype")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise ConfigError(f"unknown dtype {dtype!r}; allowed: auto, float32, bfloat16, float16", key="dtype")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda when a GPU is visible, else cpu; a bare "cuda" gets the current GPU's index."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N ({err})", key="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but no CUDA GPU is visible", key="device")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible", key="device")
        dev = torch.device("cuda", index)
    return dev


def _check_family(family: str | None) -> str:
    if family is None:
        return "auto"
    allowed = FAMILY_CHOICES
    if not isinstance(family, str) or family.lower() not in allowed:
        raise ConfigError(f"unknown model family {family!r}; allowed: {', '.join(allowed)}", key="family")
    return family.lower()


def _check_quantization(quantization: str | None, device: torch.device) -> str | None:
    if quantization is None or (isinstance(quantization, str) and quantization.lower() in ("", "none")):
        return None
    q = str(quantization).lower()
    if q not in _QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; allowed: none, 4bit, 8bit", key="quantization")
    if device.type != "cuda":
        raise ConfigError(f"quantization needs a CUDA GPU (bitsandbytes); device is {device}", key="quantization")
    return q


def bnb_config(quantization: str):
    """QLoRA's 4-bit NF4 with double quantization and bf16 compute, or plain LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


# -- finding the model --------------------------------------------------------------------------------
def resolve_source(name_or_path: str | os.PathLike) -> tuple[str, dict[str, Any], bool]:
    """(what to pass to from_pretrained, the parsed config.json, whether it is a local folder)."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    embedded = embedded_model_dir(name)
    if not path.is_dir() and embedded is not None:
        if not (embedded / "config.json").is_file():
            raise ConfigError(f"embedded model {name} is missing from {embedded} (rebuild: make tiny-models)", key="model")
        path = embedded
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{name} has no config.json, so it is not a Hugging Face model folder", key="model")
        return str(path), read_config(path / "config.json"), True
    if path.exists():
        raise ConfigError(f"{name} is a file; expected a model folder or a Hub name", key="model")
    if not looks_like_repo_id(name):
        raise ConfigError(f"model folder {name} does not exist", key="model")
    return name, read_config(hub_config_file(name)), False


def known_family(name_or_path: str | os.PathLike, family: str = "auto") -> str | None:
    """The model's family without loading weights, when that is cheap: the given family, a packaged
    model's, a known Hub checkpoint's (`difflm.models.known`), or the family a local (or embedded) folder's
    config.json implies. None otherwise (a Hub name is not looked up here; load_model tells)."""
    family = _check_family(family)
    if family != "auto":
        return family
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if not path.is_dir() and name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name].family
    if not path.is_dir() and known_checkpoint_family(name) is not None:  # a real Hub checkpoint difflm knows
        return known_checkpoint_family(name)
    folder = path if path.is_dir() else embedded_model_dir(name)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return detect_family(read_config(folder / "config.json"), name)
    except ConfigError:
        return None


# -- after the load -----------------------------------------------------------------------------------
def _load_adapter(module: nn.Module, adapter: str) -> nn.Module:
    """peft LoRA weights on top of `module` (inference: is_trainable=False, eval mode)."""
    from peft import PeftModel

    from safetensors import SafetensorError

    try:
        with hub_errors(adapter, "adapter"):
            module = PeftModel.from_pretrained(module, adapter, is_trainable=False)
    except SafetensorError as err:  # a truncated or corrupted adapter_model.safetensors
        raise ConfigError(f"cannot read adapter {adapter!r} (corrupted weights file?): {first_line(err)}",
                          key="adapter") from None
    except RuntimeError as err:
        mismatch = re.search(r"size mismatch for [^:]+: .*?current model is torch\.Size\(\[[^\]]*\]\)", str(err))
        if mismatch is None:
            raise
        raise ConfigError(f"adapter {adapter!r} does not fit this base model (made for another one?): "
                          f"{mismatch.group(0)}", key="adapter") from None
    module.eval()
    return module


def _vocab_size(module: nn.Module, config: dict[str, Any]) -> int | None:
    """Rows of the output head (what the logits are indexed by); the config's size otherwise."""
    try:
        head = module.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
    except (AttributeError, NotImplementedError):
        pass
    return first_int(config.get("embedding_size"), config.get("vocab_size"))


def _max_length(config: dict[str, Any]) -> int | None:
    return first_int(*(config.get(k) for k in _MAX_LENGTH_KEYS))


def _pretrained_kwargs(
    torch_dtype: torch.dtype | str, quant: str | None, dev: torch.device, gguf: Path | None
) -> dict[str, Any]:
    """from_pretrained's dtype, quantization_config, device_map and gguf_file for these arguments."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quant is not None:
        kwargs["quantization_config"] = bnb_config(quant)
        if torch_dtype == "auto":
            kwargs["dtype"] = torch.bfloat16
    if dev.type != "cpu":
        kwargs["device_map"] = {"": str(dev)}
    if gguf is not None:
        kwargs["gguf_file"] = gguf.name
    return kwargs


# -- the entry point ----------------------------------------------------------------------------------
def load_model(
    name_or_path: str | os.PathLike,
    family: str = "auto",
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    adapter: str | os.PathLike | None = None,
    quantization: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
) -> DiffusionLM:
    """Load a model folder or Hub name as a `DiffusionLM` (eval mode, ids validated).

    name_or_path: a model folder, a Hub name, an embedded model (`EMBEDDED_MODELS`) or a packaged
        pre-trained one (`PACKAGED_MODELS`: "smollm2-135m-instruct", from an optional pip package).

    family: "auto" (from config.json) or one of "llada", "dream", "mdlm", "mlm", "ar".
    dtype: "auto" (the checkpoint's dtype), "float32", "bfloat16", "float16" or a torch.dtype;
        passed to from_pretrained as `dtype=` (casting afterwards with .to() would also cast RoPE's
        frequency buffer). With quantization, "auto" means bfloat16.
    device: "cpu", "cuda", "cuda:N", or None (cuda when available). Weights load straight onto it.
    adapter: a peft LoRA adapter folder (or Hub name) applied on top (`m.module` is then a PeftModel).
    quantization: None, "4bit" (QLoRA NF4, double quant, bf16 compute) or "8bit"; needs CUDA.
    trust_remote_code: for llada, dream and mdlm it selects the family's own remote code instead of the
        native model (bidirectional Llama / Qwen2, MDLM's DiT); known failures on transformers 5: one line.
    tokenizer: None (the model folder's own, if any), a folder/Hub name, or a tokenizer object.

    Raises ConfigError (one line) for bad arguments, a missing model, an unusable checkpoint or ids.
    """
    name = os.fspath(name_or_path)
    family = _check_family(family)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    quant = _check_quantization(quantization, dev)
    gguf = packaged_gguf(name, family, quant)  # a built-in GGUF model (a local folder of that name wins)
    if gguf is not None:
        family = PACKAGED_MODELS[name].family
    adapter = check_adapter(adapter) if adapter is not None else None  # before the (maybe 16 GB) base
    if gguf is not None:
        source, config, local = str(gguf.parent), {}, True
    else:
        source, config, local = resolve_source(name)
    if family == "auto":
        family = detect_family(config, name)

    kwargs = _pretrained_kwargs(torch_dtype, quant, dev, gguf)
    with hub_errors(name):
        module = load_module(family, source, config, kwargs, trust_remote_code)
    module.eval()
    check_finite(module, name)
    if gguf is not None:  # no config.json: the config transformers built from the GGUF metadata
        config = module.config.to_dict()
    vocab_size = _vocab_size(module, config)
    if family == "llada" or (family == "dream" and not trust_remote_code):
        check_bidirectional(module, vocab_size or 16, name)
    tok = load_tokenizer(
        tokenizer, source, local, family, trust_remote_code, getattr(module, "config", None),
        gguf_file=gguf.name if gguf is not None else None,
    )
    ids = resolve_ids(family, config, tok, vocab_size)
    if adapter is not None:
        module = _load_adapter(module, adapter)
        check_finite(module, adapter, only="lora_", what="adapter")
    return DiffusionLM(
        module, family, ids, tokenizer=tok, name=name, max_length=_max_length(config), vocab_size=vocab_size
    )
