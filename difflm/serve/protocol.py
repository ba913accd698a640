"""OpenAI request bodies -> what the engine decodes, checked field by field with one-line messages.

Pure functions (no web framework): `parse_request(body, kind, settings, model)` returns a `Parsed` or raises
`APIError(status, message, param)`, which the app turns into OpenAI's error JSON
{"error": {"message", "type", "param", "code"}}. difflm's decode settings are extra body fields named as
`DecodeConfig`'s fields (`decode` for the method), checked by the same `from_dict` + `validate` as a recipe,
so the messages are the CLI's.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from difflm.config import from_dict, to_dict
from difflm.decoding.config import DecodeConfig, check_method_family
from difflm.errors import ConfigError, first_line

#: OpenAI fields accepted and ignored (they do not change what a diffusion LM decodes)
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
#: OpenAI fields accepted only at their neutral value
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "echo": False, "best_of": 1,
           "suffix": None, "logit_bias": None, "tools": None, "tool_choice": None, "response_format": None,
           "top_logprobs": None}
#: difflm body fields that are not DecodeConfig fields
EXTRA = {"denoise", "prompt_format"}
#: DecodeConfig fields a body may set by name (the method is `decode`; gen_length is max_tokens; seed is seed)
#: total_length / leading_eos set a whole canvas (a batch setting of `difflm generate`); a request has max_tokens
DECODE_FIELDS = frozenset(f.name for f in dataclasses.fields(DecodeConfig)) - {
    "gen_length", "seed", "method", "total_length", "leading_eos"}
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """An error answer: HTTP status, one-line message, the offending field, OpenAI's error type/code."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens: int | None = None  #: the largest max_tokens (gen_length) a request may ask for (None: the context)
    n: int = 8  #: the most choices per request
    prompts: int = 16  #: the most prompts in one /v1/completions request
    body_bytes: int = 1 << 20
    stop: int = 4  #: stop strings (OpenAI's limit)
    steps_per_token: int = 4  #: steps <= this x the request's max_tokens (a huge `steps` holds the worker)

    def steps(self, gen_length: int) -> int:
        """The most denoising steps a request of `gen_length` answer tokens may ask for."""
        return self.steps_per_token * gen_length

    def tokens(self, model) -> int:
        """The effective max_tokens limit: the one set, else the model's context (4096 if unknown)."""
        return self.max_tokens or getattr(model, "max_length", None) or 4096


@dataclass
class Parsed:
    prompts: list[list[int]]  #: token ids, one list per prompt
    config: DecodeConfig  #: with the request's seed
    n: int
    stream: bool
    denoise: bool
    stop: list[str]
    include_usage: bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _want(body: dict, key: str, tp: type, what: str, default=None):
    """body[key] (default when absent or null), refused unless of JSON type `tp` (`_json_type_ok`)."""
    v = body.get(key, default)
    if v is None:
        return default
    if not _json_type_ok(tp, v):
        raise APIError(400, f"{key} must be {what}, got {type(v).__name__} {str(v)[:40]!r}", key)
    return v


def _json_type_ok(hint: Any, v: Any) -> bool:
    """Whether JSON value `v` has the type `hint` (a DecodeConfig field's, or int/float/bool/str/dict): no "64"
    for an int, no true for a number."""
    args = typing.get_args(hint)
    if type(None) in args:
        if v is None:
            return True
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return _is_int(v)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, hint) if isinstance(hint, type) else True


def decode_config(body: dict, defaults: DecodeConfig, gen_length: int, seed: int) -> DecodeConfig:
    """The server's DecodeConfig with the body's difflm fields applied, checked as a recipe is."""
    hints = typing.get_type_hints(DecodeConfig)
    over: dict[str, Any] = {}
    for key in [k for k in body if k in DECODE_FIELDS or k == "decode"]:
        name = "method" if key == "decode" else key
        v = body[key]
        if not _json_type_ok(hints[name], v):
            raise APIError(400, f"{key} must be of type {_type_word(hints[name])}, got {type(v).__name__} {str(v)[:40]!r}", key)
        over[name] = v  # temperature and top_p (OpenAI's names too) are DecodeConfig fields
    data = {**to_dict(defaults), **over, "gen_length": gen_length, "seed": seed}
    try:
        return from_dict(DecodeConfig, data)
    except ConfigError as err:
        param = "decode" if err.key == "method" else err.key
        raise APIError(400, first_line(err), param) from None


def _type_word(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args) + (" or null" if type(None) in typing.get_args(hint) else "")


def _check_fields(body: dict, kind: str) -> None:
    own = {"model", "max_tokens", "max_completion_tokens", "seed", "stop", "n", "stream",
           "stream_options", "decode"} | EXTRA | DECODE_FIELDS | IGNORED | set(NEUTRAL)
    own |= {"messages"} if kind == "chat" else {"prompt"}
    for key in body:
        if key not in own:
            raise APIError(400, f"unknown field {key!r}; difflm's decode fields are: decode, "
                                f"{', '.join(sorted(DECODE_FIELDS))}, denoise, prompt_format", key)
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in (neutral, None) and not (neutral == 0 and body[key] == 0):
            raise APIError(400, f"{key} is not supported by difflm (only {neutral!r})", key)


def messages_of(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a role among {', '.join(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", "messages")
    return out


def prompts_of(body: dict, limits: Limits) -> list[str]:
    p = body.get("prompt")
    if isinstance(p, str):
        p = [p]
    if not isinstance(p, list) or not p or not all(isinstance(x, str) for x in p):
        raise APIError(400, "prompt must be a string or a non-empty list of strings", "prompt")
    if len(p) > limits.prompts:
        raise APIError(400, f"at most {limits.prompts} prompts per request, got {len(p)}", "prompt")
    return p


def _stop_of(body: dict, limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > limits.stop:
        raise APIError(400, f"stop must be a string or a list of at most {limits.stop} non-empty strings", "stop")
    return stop


def parse_request(body: Any, kind: str, *, defaults: DecodeConfig, model, model_id: str, limits: Limits,
                  prompt_format: str) -> Parsed:
    """kind: "chat" (/v1/chat/completions) or "completions" (/v1/completions)."""
    from difflm.data.prompts import PROMPT_FORMATS, conversation_ids, encode_text, format_prompt

    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    _check_fields(body, kind)
    name = body.get("model")
    if name is not None and name not in (model_id, "difflm"):
        raise APIError(404, f"model {str(name)[:80]!r} is not served here; this server serves {model_id!r}",
                       "model", code="model_not_found")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _want(body, key, int, "an integer")  # 0 is a value (refused below), not "absent"
    gen_length = defaults.gen_length if max_tokens is None else max_tokens
    if not 1 <= gen_length <= limits.tokens(model):
        raise APIError(400, f"{key} must be in [1, {limits.tokens(model)}], got {gen_length}", key)
    n = _want(body, "n", int, "an integer", 1)
    if not 1 <= n <= limits.n:
        raise APIError(400, f"n must be in [1, {limits.n}], got {n}", "n")
    seed = _want(body, "seed", int, "an integer")
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(400, f"seed must be in [0, 2**63), got {seed}", "seed")
    stream = _want(body, "stream", bool, "true or false", False)
    denoise = _want(body, "denoise", bool, "true or false", False)
    if denoise and not stream:
        raise APIError(400, "denoise (the per-step canvas events) needs stream: true", "denoise")
    opts = _want(body, "stream_options", dict, "an object", {})
    fmt = _want(body, "prompt_format", str, "a string", prompt_format if kind == "chat" else "raw")
    if fmt not in PROMPT_FORMATS:
        raise APIError(400, f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}", "prompt_format")
    _check_finite(body)
    _check_text(body)
    cfg = decode_config(body, defaults, gen_length, defaults.seed if seed is None else seed)
    if "steps" in body and cfg.steps > limits.steps(gen_length):  # the server's own default is the operator's
        raise APIError(400, f"steps must be <= {limits.steps_per_token} x max_tokens = {limits.steps(gen_length)} "
                            f"on this server (--max-steps-per-token), got {cfg.steps}", "steps")
    try:
        check_method_family(cfg.method, getattr(model, "family", None), model_id)
    except ConfigError as err:
        raise APIError(400, first_line(err), "decode") from None
    try:
        if kind == "chat":
            prompts = [conversation_ids(model, messages_of(body), fmt)]
        else:
            prompts = [encode_text(model.tokenizer, format_prompt(p, None, fmt)) for p in prompts_of(body, limits)]
    except ConfigError as err:
        raise APIError(400, first_line(err), err.key) from None
    for p in prompts:
        if not p:
            raise APIError(400, "the prompt is empty", "prompt" if kind != "chat" else "messages")
        try:
            cfg.validate(prompt_length=len(p), max_length=getattr(model, "max_length", None))
        except ConfigError as err:
            raise APIError(400, first_line(err), "max_tokens" if err.key == "gen_length" else err.key) from None
    return Parsed(prompts, cfg, n, stream, denoise, _stop_of(body, limits), bool(opts.get("include_usage")))


def _walk(v: Any, path: str):
    """(path, value) of every scalar in a parsed JSON value, paths as `messages[0].content` (a loop, not a
    recursion: a body nested as deep as the JSON parser allows must not overflow the stack here)."""
    todo = [(path, v)]
    while todo:
        path, v = todo.pop()
        if isinstance(v, dict):
            todo.extend((f"{path}.{k}" if path else str(k), x) for k, x in reversed(list(v.items())))
        elif isinstance(v, list):
            todo.extend((f"{path}[{i}]", x) for i, x in reversed(list(enumerate(v))))
        else:
            yield path, v


def _check_finite(body: dict) -> None:
    """No inf or NaN anywhere (1e400 parses as inf; the app's parser refuses the NaN/Infinity literals)."""
    for path, v in _walk(body, ""):
        if isinstance(v, float) and not math.isfinite(v):
            raise APIError(400, f"{path} must be a finite number, got {v!r}", path)


def _check_text(body: dict) -> None:
    """Every string must be valid Unicode text: JSON's \\ud800 escapes give lone surrogates, which no tokenizer
    (and no UTF-8 encoder) accepts."""
    for path, v in _walk(body, ""):
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as err:
                raise APIError(400, f"{path} is not valid Unicode text: a lone surrogate at character {err.start}",
                               path) from None


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    at = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)
