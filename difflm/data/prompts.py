"""Prompt formats shared by training and generation.

Formats (`PROMPT_FORMATS`):

- ``alpaca``: the Stanford Alpaca template, used for training *and* generation::

      Below is an instruction that describes a task. Write a response that appropriately completes the request.

      ### Instruction:
      {instruction}

      {input}

      ### Response:

  The ``{input}`` block (the input and a blank line) appears only when the input is non-blank.
  Training appends the answer right after ``### Response:\\n``.
- ``alpaca-cot``: ``alpaca`` with the instruction followed by ``"\\nLet's think step by step."``
  (zero-shot chain-of-thought prompting, e.g. for GSM8K; difflm's own, not the paper's).
- ``paper-cot``: the CoT template of the paper's Appendix E (Tables 6-7): ``alpaca`` with its second
  sentence ("Write a response that appropriately completes the request.") replaced by "Think through the
  problem carefully, explaining in detail before arriving at the final answer."; the instruction and the
  response header are unchanged, nothing is appended to the instruction. The text is the one of the
  authors' code (github.com/ybseo-ac/Conv, ``answer_generation/answer_tool.py``, commit 4beb487); the copy of
  the paper read for this states the CoT instruction but does not print the whole template. A non-blank input is placed as in ``alpaca`` (the authors' code has instructions only).
- ``raw``: the instruction as is; a non-blank input follows on a new line.
- ``chat``: the tokenizer's chat template on one user message (the instruction, then a blank line
  and the input when non-blank), with the assistant header appended. It needs the tokenizer:
  `format_prompt` renders it only when given ``chat_fn`` (messages -> text) and `encode_prompt`
  uses ``chat_ids_fn`` (messages -> ids) or else the tokenizer's own ``apply_chat_template``.
"""

from __future__ import annotations

from typing import Any, Callable

from difflm.errors import ConfigError

__all__ = [
    "ALPACA_TEMPLATE",
    "COT_SUFFIX",
    "PAPER_COT_TEMPLATE",
    "PROMPT_FORMATS",
    "chat_messages",
    "conversation_ids",
    "encode_prompt",
    "encode_text",
    "format_prompt",
    "render_chat",
]

#: `{input_block}` is ``input + "\n\n"`` when the input is non-blank, else empty.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
COT_SUFFIX = "\nLet's think step by step."
#: the paper's CoT template (Appendix E; the authors' generation code): alpaca with another second sentence
PAPER_COT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Think through the problem carefully, explaining in detail before arriving at the final answer.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
PROMPT_FORMATS = ("alpaca", "alpaca-cot", "paper-cot", "raw", "chat")

Messages = list[dict[str, str]]


def _check_format(fmt: str) -> None:
    if fmt not in PROMPT_FORMATS:
        raise ConfigError(
            f"unknown prompt format {fmt!r}; allowed: {', '.join(PROMPT_FORMATS)}", key="prompt_format"
        )


def _has_input(input: str | None) -> bool:
    return bool(input and input.strip())


def chat_messages(instruction: str, input: str | None = None) -> Messages:
    """The one-turn conversation used by the ``chat`` format."""
    content = f"{instruction}\n\n{input}" if _has_input(input) else instruction
    return [{"role": "user", "content": content}]


def format_prompt(
    instruction: str,
    input: str | None = None,
    fmt: str = "alpaca",
    chat_fn: Callable[[Messages], str] | None = None,
) -> str:
    """The prompt text for one instruction in format `fmt`.

    ``fmt="chat"`` needs ``chat_fn`` (e.g. ``lambda m: tok.apply_chat_template(m,
    add_generation_prompt=True, tokenize=False)``); without it a ConfigError is raised.
    """
    _check_format(fmt)
    if fmt == "raw":
        return f"{instruction}\n{input}" if _has_input(input) else instruction
    if fmt == "chat":
        if chat_fn is None:
            raise ConfigError(
                "prompt format 'chat' needs the tokenizer's chat template: pass chat_fn, "
                "or use encode_prompt(tokenizer, ..., fmt='chat')",
                key="prompt_format",
            )
        return chat_fn(chat_messages(instruction, input))
    if fmt == "alpaca-cot":
        instruction = instruction + COT_SUFFIX
    input_block = f"{input}\n\n" if _has_input(input) else ""
    template = PAPER_COT_TEMPLATE if fmt == "paper-cot" else ALPACA_TEMPLATE
    return template.format(instruction=instruction, input_block=input_block)


def encode_prompt(
    tokenizer_or_model: Any,
    instruction: str,
    input: str | None = None,
    fmt: str = "alpaca",
    chat_ids_fn: Callable[[Messages], list[int]] | None = None,
) -> list[int]:
    """Token ids of the prompt.

    `tokenizer_or_model` is a Hugging Face tokenizer or anything with a ``.tokenizer`` attribute
    (a model adapter). Text formats are encoded with ``add_special_tokens=False`` (the templates
    carry no BOS; LLaDA's tokenizer adds none either). For ``chat`` the ids come from
    ``chat_ids_fn(messages)`` when given, else from the tokenizer's chat template rendered as text
    (with the generation prompt) and encoded the same way, so special-token strings in the
    template map to their ids.
    """
    _check_format(fmt)
    tok = getattr(tokenizer_or_model, "tokenizer", None)
    if tok is None:
        tok = tokenizer_or_model
    if fmt == "chat":
        messages = chat_messages(instruction, input)
        if chat_ids_fn is not None:
            return [int(i) for i in chat_ids_fn(messages)]
        if not getattr(tok, "chat_template", None):
            raise ConfigError(
                "prompt format 'chat' needs a tokenizer with a chat template; this one has none "
                "(use --prompt-format alpaca)",
                key="prompt_format",
            )
        text = render_chat(tok, messages)
    else:
        text = format_prompt(instruction, input, fmt)
    return encode_text(tok, text)


def render_chat(tokenizer: Any, messages: Messages, add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template applied to `messages`, as text (to be encoded by `encode_text`)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of prompt text with no special tokens added: the templates carry their own (a chat
    template's BOS and headers are strings in the text that map to their ids)."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _transcript(messages: Messages) -> str:
    """A multi-turn conversation as one instruction, for a format with no chat template: the earlier
    turns as "Role: text" lines, then the last user message."""
    *earlier, last = messages
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in earlier]
    return "\n".join(lines + [last["content"]]) if lines else last["content"]


def conversation_ids(model: Any, messages: Messages, fmt: str = "chat") -> list[int]:
    """Token ids of a multi-turn conversation (OpenAI-style messages ending with a user turn), ready
    for the assistant's answer: what `difflm serve`'s /v1/chat/completions and `difflm chat` decode.

    ``fmt="chat"`` uses the model's chat template (`model.chat_ids`); a model whose tokenizer has none
    (the embedded models) and any other format get `format_prompt(transcript, fmt=...)`, where the
    transcript is the earlier turns as "User: ..." / "Assistant: ..." lines followed by the last message.
    """
    _check_format(fmt)
    if not messages or messages[-1].get("role") != "user":
        raise ConfigError("messages must end with a user message", key="messages")
    tok = getattr(model, "tokenizer", None)
    if fmt == "chat" and getattr(tok, "chat_template", None):
        return [int(i) for i in model.chat_ids(messages)]
    text_fmt = "alpaca" if fmt == "chat" else fmt
    return encode_text(tok, format_prompt(_transcript(messages), None, text_fmt))
