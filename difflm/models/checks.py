"""Load-time checks that a model is usable: finite weights, bidirectional attention, an adapter folder.

Each runs before (the adapter argument) or right after (weights, attention) the load, so that a bad
checkpoint fails with one line naming what is wrong instead of misbehaving hours later.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from difflm.errors import ConfigError, first_line

from .base import logits_of
from .hub import hub_local_only, looks_like_repo_id


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


class BidirectionalityError(ConfigError):
    """The loaded model is causal although it should be bidirectional (e.g. transformers 4.x)."""


def check_bidirectional(module: nn.Module, vocab_size: int, name: str = "model") -> None:
    """Raise BidirectionalityError unless position 0's logits depend on the last token.

    Runs a 4-token input twice with different last tokens (two alternatives, to be safe against a
    coincidence). A causal model gives bit-identical position-0 logits.
    """
    device = next(module.parameters()).device
    base = torch.tensor([[11, 12, 13, 14]], device=device) % vocab_size
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ref = logits_of(module(input_ids=base))[0, 0].float()
            moved = 0.0
            for alt in (15, 16):
                other = base.clone()
                other[0, -1] = alt % vocab_size
                out = logits_of(module(input_ids=other))[0, 0].float()
                moved = max(moved, float((out - ref).abs().max()))
    finally:
        module.train(was_training)
    if not moved > 0.0:
        import transformers

        raise BidirectionalityError(
            f"{name} loaded as a CAUSAL model (position 0 ignores later tokens); a diffusion LM must be "
            f"bidirectional: needs transformers>=5 (have {transformers.__version__}) "
            "and is_causal: false in config.json",
            key="model",
        )


def adapter_config_file(folder: str | os.PathLike, key: str = "adapter") -> Path:
    """`folder`/adapter_config.json; ConfigError (with `key`) when it is missing: no peft LoRA adapter folder."""
    path = Path(folder).expanduser() / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{os.fspath(folder)} is not a LoRA adapter folder (no adapter_config.json)", key=key)
    return path


def check_adapter(adapter: str | os.PathLike) -> str:
    """Validate the adapter argument BEFORE the (possibly 16 GB) base model is loaded: a local adapter
    folder, or a Hub adapter that is cached or fetchable now (peft itself would retry for a long time).
    Returns what to hand to peft."""
    name = os.fspath(adapter)
    path = Path(name).expanduser()
    if path.is_dir():
        adapter_config_file(path)
        return str(path)
    if path.exists() or not looks_like_repo_id(name):
        raise ConfigError(f"adapter folder {name} does not exist", key="adapter")
    from huggingface_hub import hf_hub_download

    local_only = hub_local_only()
    try:
        hf_hub_download(name, "adapter_config.json", local_files_only=local_only)
    except Exception as err:
        if local_only:
            raise ConfigError(
                f"adapter {name!r} is not a local folder nor in the Hugging Face cache, "
                "and the Hub is offline or unreachable",
                key="adapter",
            ) from None
        raise ConfigError(
            f"cannot fetch adapter {name!r} from the Hugging Face Hub: {first_line(err)}", key="adapter"
        ) from None
    return name
