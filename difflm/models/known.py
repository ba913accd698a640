"""Real Hub checkpoints difflm knows by name: their family without a Hub lookup, and what to pass for each.

`load_model` reads every checkpoint's family from its config.json, so this table is not needed to load one;
it lets `known_family` answer for these names before any download (e.g. to refuse `--decode nucleus` on a
diffusion model at once), and it is the list the models README points users to.
"""

from __future__ import annotations

#: Hub name -> (family, what it is / how it is used)
KNOWN_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "GSAI-ML/LLaDA-8B-Base": ("llada", "LLaDA-8B pretrained; native bidirectional Llama"),
    "GSAI-ML/LLaDA-8B-Instruct": ("llada", "LLaDA-8B SFT; native bidirectional Llama; chat template with <|eot_id|>"),
    "GSAI-ML/LLaDA-1.5": (
        "llada",
        "LLaDA-8B-Instruct after VRPO preference optimisation, the same architecture and ids; its evaluation "
        "keeps EOS/EoT from committing early: decode.suppress_tokens=[126081,126348] (recipes/generate-llada15-gsm8k.yaml)",
    ),
    "Dream-org/Dream-v0-Instruct-7B": ("dream", "Dream 7B SFT; native bidirectional Qwen2 with Dream's shift"),
    "Dream-org/Dream-v0-Base-7B": ("dream", "Dream 7B pretrained; native bidirectional Qwen2 with Dream's shift"),
    "kuleshov-group/mdlm-owt": ("mdlm", "MDLM trained on OpenWebText (no tokenizer: GPT-2's)"),
}


def known_checkpoint_family(name: str) -> str | None:
    """The family of a known Hub checkpoint name, or None."""
    entry = KNOWN_CHECKPOINTS.get(name)
    return entry[0] if entry else None
