"""`difflm merge`: fold a LoRA adapter into its base model and save a full checkpoint.

LLaDA-family models are written in difflm's native format (a bidirectional Llama that
`load_model` and plain transformers 5.x load); other families with `save_pretrained`. The
tokenizer is saved alongside. The result is built in a temporary folder beside the output and
swapped in only once complete (`difflm.io.atomic_directory`): a merge that fails (a corrupted
adapter, one for another base model, a full disk) leaves an existing output untouched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from difflm.errors import ConfigError
from difflm.io import atomic_directory
from difflm.model_families import FAMILY_CHOICES

__all__ = ["MergeRecipe", "merge_adapter"]


@dataclass
class MergeRecipe:
    adapter: str | None = field(default=None, metadata={"help": "the LoRA adapter folder"})
    model: str | None = field(default=None, metadata={"help": "the base model (default: the adapter's base)"})
    output: str | None = field(default=None, metadata={"help": "the folder to write"})
    family: str = field(default="auto", metadata={"choices": list(FAMILY_CHOICES)})
    dtype: str = field(default="auto", metadata={"choices": ["auto", "float32", "bfloat16", "float16"]})
    device: str | None = field(default="cpu", metadata={"help": "where to merge (cpu needs RAM for the full model)"})
    trust_remote_code: bool = False
    tokenizer: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        if not self.adapter:
            raise ConfigError("no adapter given: pass --adapter DIR", key="adapter")
        if not self.output:
            raise ConfigError("no output folder given: pass --output DIR", key="output")


def base_of_adapter(adapter: str | Path) -> str | None:
    """The base model the adapter was trained on (its adapter_config.json), if recorded."""
    from difflm.models.checks import adapter_config_file

    cfg = adapter_config_file(adapter, key="adapter")
    return json.loads(cfg.read_text()).get("base_model_name_or_path") or None


def merge_adapter(recipe: MergeRecipe) -> Path:
    """Load base + adapter, merge (W + B A * alpha / r), save to `recipe.output`; return the path."""
    from difflm.models import load_model, save_native

    base = recipe.model or base_of_adapter(recipe.adapter)
    if not base:
        raise ConfigError("the adapter does not name its base model: pass --model", key="model")
    out = Path(recipe.output)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "link" if out.is_symlink() else "file"
        raise ConfigError(f"{out} is a {kind}; expected a folder to write the merged model to", key="output")
    if out.exists() and any(out.iterdir()) and not recipe.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it", key="output")
    for what, src in (("adapter", recipe.adapter), ("base model", base)):
        if Path(src).is_dir() and out.exists() and os.path.samefile(src, out):
            raise ConfigError(f"{out} is the {what} folder; write the merged model elsewhere", key="output")
    m = load_model(
        base, family=recipe.family, dtype=recipe.dtype, device=recipe.device, adapter=recipe.adapter,
        trust_remote_code=recipe.trust_remote_code, tokenizer=recipe.tokenizer,
    )
    merged = m.module.merge_and_unload()
    m.module = merged
    with atomic_directory(out) as tmp:  # the old output stays until the new one is complete
        if m.family == "llada":
            save_native(m, tmp)
        else:
            merged.save_pretrained(str(tmp))
            if m.tokenizer is not None:
                m.tokenizer.save_pretrained(str(tmp))
    return out
