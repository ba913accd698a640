"""The tokenizer of a model: a given object, a folder or Hub name, or the model's own (if it has one).

A model without a tokenizer still loads (token ids work, text prompts do not); MDLM's checkpoint
ships none and gets GPT-2's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from difflm.errors import ConfigError, first_line

from .hub import hub_errors, hub_local_only, looks_like_repo_id

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model"
)


def load_tokenizer(
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
        with hub_errors(source, "tokenizer"):
            return AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    if tokenizer is not None:
        name = os.fspath(tokenizer)
        path = Path(name).expanduser()
        if path.is_dir():
            with hub_errors(name, "tokenizer"):
                return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if not looks_like_repo_id(name):
            raise ConfigError(f"tokenizer folder {name} does not exist", key="tokenizer")
        if hub_local_only():
            try:
                return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=True)
            except OSError:
                raise ConfigError(
                    f"tokenizer {name!r} is not a local folder nor cached, and the Hub is offline or unreachable",
                    key="tokenizer",
                ) from None
        with hub_errors(name, "tokenizer"):
            return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if local:
        if not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
            if family == "mdlm":  # kuleshov-group/mdlm-owt ships no tokenizer: it is GPT-2's
                return mdlm_tokenizer(source)
            return None
        with hub_errors(source, "tokenizer"):
            return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, config=model_config)
    if family == "mdlm":
        return mdlm_tokenizer(source)
    return optional_hub_tokenizer(source, trust_remote_code, config=model_config)


#: The tokenizer MDLM was trained with (mdlm-owt ships none): GPT-2's, with [MASK] appended as id 50257.
MDLM_TOKENIZER = "gpt2"


def mdlm_tokenizer(source: str):
    """GPT-2's tokenizer for an MDLM checkpoint that ships none (said in a warning); a one-line ConfigError
    when it is neither cached nor downloadable."""
    from transformers import AutoTokenizer

    log.warning("%s ships no tokenizer: using GPT-2's (%r), as MDLM was trained with", source, MDLM_TOKENIZER)
    local_only = hub_local_only()
    try:
        return AutoTokenizer.from_pretrained(MDLM_TOKENIZER, local_files_only=local_only)
    except (OSError, ValueError) as err:
        where = "it is not cached and the Hub is offline or unreachable" if local_only else first_line(err)
        raise ConfigError(
            f"{source} is an MDLM checkpoint without a tokenizer, and GPT-2's ({MDLM_TOKENIZER!r}) cannot be loaded: "
            f"{where}; pass tokenizer= (--tokenizer) a GPT-2 tokenizer folder, or run once online",
            key="tokenizer",
        ) from None


def optional_hub_tokenizer(name: str, trust_remote_code: bool, config: Any = None):
    """A Hub tokenizer if it is cached or can be fetched now; None (with a warning) otherwise."""
    from transformers import AutoTokenizer

    local_only = hub_local_only()
    try:
        return AutoTokenizer.from_pretrained(
            name, trust_remote_code=trust_remote_code, local_files_only=local_only, config=config
        )
    except (OSError, ValueError) as err:
        log.warning(
            "no tokenizer for %s (%s): text prompts are impossible, token ids still work", name, first_line(err)
        )
        return None
