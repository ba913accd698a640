"""`difflm chat`'s logic: a multi-turn session on a local model or on a running `difflm serve`.

Importable without typer or rich: `cli/chat.py` reads lines and prints; everything else is here.

- `ChatSession` holds the conversation (OpenAI-style messages), the current `DecodeConfig` and a backend;
  `session.command(line)` applies a `/command` (settings are checked by building the DecodeConfig with
  `difflm.config.from_dict`, so a bad value raises the CLI's one-line `ConfigError` and changes nothing),
  `session.ask(text, on_event)` decodes the assistant's answer and, only once it is complete, adds both
  turns to the history (a cancelled or failed answer leaves the conversation as it was).
- Two backends with one interface, `answer(messages, config, on_event, stop) -> Answer`:
  `LocalBackend` (an `Engine` on a loaded model, the same engine `difflm serve` runs) and `RemoteBackend`
  (a running `difflm serve`, through the official `openai` client: the decode settings go as extra body
  fields, the canvas events come from the stream's top-level "difflm" field with `denoise: true`).
  Both give `on_event` the engine's step events and return the done event's figures, so the live view and
  the summary do not depend on where the model runs.
- `Canvas` follows the step events: which answer positions are still masked, which token each holds.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from difflm.config import from_dict, parse_overrides, to_dict
from difflm.decoding.config import DecodeConfig
from difflm.errors import ConfigError, first_line
from difflm.serve.protocol import DECODE_FIELDS

Event = dict
OnEvent = Callable[[Event], None]

#: `/set` names a user may write instead of the DecodeConfig field's
ALIASES = {"decode": "method", "max_tokens": "gen_length"}
#: settings the `/command` of the same name changes (`/steps 32` is `/set steps=32`)
SHORT_COMMANDS = {"/decode": "method", "/steps": "steps", "/seed": "seed", "/gen-length": "gen_length",
                  "/temperature": "temperature", "/kernel-size": "kernel_size", "/top-k": "top_k",
                  "/block-length": "block_length", "/threshold": "threshold"}
HELP = """commands:
  /decode METHOD        the decoder, e.g. /decode conv, /decode llada
  /steps N              denoising steps (also /seed, /gen-length, /temperature, /kernel-size, /top-k,
                        /block-length, /threshold)
  /set KEY=VALUE ...    any decode setting, e.g. /set kernel_size=16 top_k=1 (values read as YAML)
  /show                 the current settings and the conversation's length
  /reset                forget the conversation (settings stay)
  /help                 this text
  /quit                 leave (also Ctrl-D; Ctrl-C during an answer cancels that answer)"""


class Cancelled(Exception):
    """The answer was cancelled (Ctrl-C or the `stop` event) before it was complete."""


class Quit(Exception):
    """`/quit`: leave the REPL."""


@dataclass
class Answer:
    """A finished assistant answer: its text and the figures of the done event."""

    text: str
    nfe: int = 0
    steps: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    content_tokens: int = 0
    seed: int | None = None
    rep4: float | None = None

    @classmethod
    def from_done(cls, text: str, ev: dict) -> "Answer":
        names = {f.name for f in dataclasses.fields(cls)} - {"text"}
        return cls(text=text, **{k: ev[k] for k in names if ev.get(k) is not None})


@dataclass
class Canvas:
    """The answer as the decoder fills it: `cells[pos]` is the token's text, or None while masked."""

    length: int = 0
    cells: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    step: int = 0
    nfe: int = 0

    def update(self, ev: Event) -> None:
        if ev.get("type") != "step":
            return
        if len(self.cells) != ev["length"]:
            self.length = ev["length"]
            self.cells, self.ids = [None] * self.length, [None] * self.length
        for pos, tid, text in ev["committed"]:
            self.cells[pos], self.ids[pos] = text, tid
        for pos in ev["remasked"]:
            self.cells[pos] = self.ids[pos] = None
        self.step, self.nfe = ev["step"], ev["nfe"]

    @property
    def masked(self) -> int:
        return sum(c is None for c in self.cells)


# -- settings ----------------------------------------------------------------------------------------
def apply_settings(config: DecodeConfig, values: dict[str, Any]) -> DecodeConfig:
    """`config` with `values` (DecodeConfig field names or ALIASES) applied, validated as a recipe is
    (`from_dict`: the same one-line ConfigError messages as the CLI and the server)."""
    fields = DECODE_FIELDS | {"method", "gen_length", "seed"}  # what a request can carry (no whole canvas)
    over = {}
    for key, value in values.items():
        name = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if name.startswith("decode."):
            name = name[len("decode."):]
        if name not in fields:
            raise ConfigError(f"unknown decode setting {key!r}; allowed: decode, {', '.join(sorted(fields - {'method'}))}")
        over[name] = value
    return from_dict(DecodeConfig, {**to_dict(config), **over})


def parse_assignments(text: str) -> dict[str, Any]:
    """`"kernel_size=16 top_k=1"` -> {"kernel_size": 16, "top_k": 1} (values read as YAML)."""
    items = text.split()
    if not items:
        raise ConfigError("/set needs KEY=VALUE, e.g. /set kernel_size=16")
    for item in items:
        if "=" not in item:
            raise ConfigError(f"bad setting {item!r}: expected KEY=VALUE, e.g. /set kernel_size=16")
    out: dict[str, Any] = {}
    for item in items:  # one at a time: a dotted key (decode.steps=8) stays one name
        key, _, value = item.partition("=")
        out[key] = parse_overrides([f"v={value}"])["v"]
    return out


def show_settings(config: DecodeConfig) -> str:
    """One line: every decode setting as key=value (method first, as `decode`)."""
    d = to_dict(config)
    parts = [f"decode={d.pop('method')}"] + [f"{k}={'null' if v is None else v}" for k, v in d.items()]
    return " ".join(parts)


# -- the session -------------------------------------------------------------------------------------
class ChatSession:
    """A conversation with one backend under the current decode settings."""

    def __init__(self, backend, config: DecodeConfig, *, system: str | None = None):
        self.backend, self.config, self.system = backend, config, system
        self.messages: list[dict] = []

    def conversation(self, user_text: str) -> list[dict]:
        """The messages the next answer is decoded from: system prompt, history, the new user turn."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages + [{"role": "user", "content": user_text}]

    def ask(self, text: str, on_event: OnEvent | None = None, stop: threading.Event | None = None) -> Answer:
        """Decode the answer to `text`; both turns join the history only when the answer is complete.
        Raises Cancelled (Ctrl-C or `stop` set), ConfigError (a setting or prompt the backend refused)."""
        answer = self.backend.answer(self.conversation(text), self.config, on_event, stop)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.text}]
        return answer

    def reset(self) -> None:
        self.messages = []

    def set(self, values: dict[str, Any]) -> DecodeConfig:
        new = apply_settings(self.config, values)
        self.backend.check(new)
        self.config = new
        return new

    def show(self) -> str:
        turns = len(self.messages) // 2
        return (f"backend: {self.backend.describe()}\nsettings: {show_settings(self.config)}\n"
                f"history: {turns} turn{'s' if turns != 1 else ''}" + (f"; system: {self.system!r}" if self.system else ""))

    def command(self, line: str) -> str:
        """Apply a `/command` line; returns the text to print. Raises Quit, or ConfigError for bad input
        (the settings are then unchanged)."""
        name, _, rest = line.strip().partition(" ")
        name, rest = name.lower(), rest.strip()
        if name in ("/quit", "/exit", "/q"):
            raise Quit()
        if name in ("/help", "/?"):
            return HELP
        if name == "/show":
            return self.show()
        if name == "/reset":
            self.reset()
            return "history cleared"
        if name == "/set":
            return self._changed(parse_assignments(rest))
        if name in SHORT_COMMANDS:
            if not rest or len(rest.split()) != 1:
                raise ConfigError(f"{name} needs one value, e.g. {name} {_example(name)}")
            return self._changed({SHORT_COMMANDS[name]: parse_overrides([f"v={rest}"])["v"]})
        raise ConfigError(f"unknown command {name!r}; /help lists the commands")


    def _changed(self, values: dict[str, Any]) -> str:
        """Apply `values`; the settings that changed, as `set key=value ...`."""
        before = to_dict(self.config)
        after = to_dict(self.set(values))
        diff = [f"{'decode' if k == 'method' else k}={'null' if v is None else v}" for k, v in after.items()
                if before[k] != v]
        return "set " + " ".join(diff) if diff else "unchanged: " + show_settings(self.config)


def _example(name: str) -> str:
    return {"/decode": "conv", "/temperature": "0.5", "/threshold": "0.9"}.get(name, "32")


# -- backends ----------------------------------------------------------------------------------------
class LocalBackend:
    """An Engine on a loaded model, in this process (the engine `difflm serve` uses, with batches of one)."""

    def __init__(self, model, *, name: str, prompt_format: str = "chat"):
        from difflm.serve.engine import Engine

        self.model, self.name, self.prompt_format = model, name, prompt_format
        self.family = getattr(model, "family", None)
        self.stop_ids = set(model.ids.stop_ids)
        self.engine = Engine(model, max_batch=1, window_ms=0.0, max_queue=4, timeout_s=None).start()
        self.last_prompt_ids: list[int] | None = None  #: what the last answer was decoded from

    def describe(self) -> str:
        return f"local {self.name} on {self.model.device}"

    def check(self, config: DecodeConfig) -> None:
        """Refuse a decoder that cannot apply to the model's family (nucleus on a diffusion LM, ...)."""
        from difflm.decoding.config import check_method_family

        check_method_family(config.method, self.family, self.name)

    def prompt_ids(self, messages: list[dict], config: DecodeConfig) -> list[int]:
        from difflm.data.prompts import conversation_ids

        ids = conversation_ids(self.model, messages, self.prompt_format)
        config.validate(prompt_length=len(ids), max_length=getattr(self.model, "max_length", None))
        return ids

    def answer(self, messages, config: DecodeConfig, on_event: OnEvent | None = None,
               stop: threading.Event | None = None) -> Answer:
        ids = self.prompt_ids(messages, config)
        self.last_prompt_ids = ids
        events: queue.Queue = queue.Queue()
        job = self.engine.submit(ids, config, events=on_event is not None, sink=events.put)
        try:
            while True:  # events are handled here, in the caller's thread (Ctrl-C arrives here too)
                if stop is not None and stop.is_set():
                    raise Cancelled()
                try:
                    ev = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if ev["type"] == "step" and on_event is not None:
                    on_event(ev)
                elif ev["type"] == "done":
                    return Answer.from_done(ev["text"], ev)
                elif ev["type"] == "error":
                    raise ConfigError(f"the answer failed: {ev['message']}")
        except KeyboardInterrupt:
            job.cancel()
            raise Cancelled() from None
        except Cancelled:
            job.cancel()
            raise

    def close(self) -> None:
        self.engine.stop()


def api_base(url: str) -> str:
    """The OpenAI base URL of a `difflm serve` address: http://host:port -> http://host:port/v1."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"must start with http:// or https://, got {url!r}", key="--url")
    return url if url.endswith("/v1") else url + "/v1"


class RemoteBackend:
    """A running `difflm serve`, through the openai client (streaming; canvas events with denoise)."""

    def __init__(self, url: str, *, api_key: str | None = None, prompt_format: str | None = None,
                 timeout_s: float = 600.0):
        import openai

        self.base = api_base(url)
        self.prompt_format = prompt_format
        self.client = openai.OpenAI(base_url=self.base, api_key=api_key or "none", max_retries=0, timeout=timeout_s)
        info = self._server_config(api_key)
        self.name = info["model"]
        self.defaults = from_dict(DecodeConfig, info["decode"])
        self.stop_ids = set(info.get("stop_token_ids") or ())
        self.methods = info.get("methods")

    def _server_config(self, api_key: str | None) -> dict:
        """GET /v1/difflm/config: the server's decode defaults; an unreachable server or a refused key is
        bad input (one line, exit 2) before any prompt is read."""
        import httpx2

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            r = httpx2.get(self.base + "/difflm/config", headers=headers, timeout=10.0)
        except httpx2.HTTPError as err:
            raise ConfigError(f"cannot reach {self.base}: {first_line(err)} (is `difflm serve` running?)",
                              key="--url") from None
        if r.status_code == 401:
            raise ConfigError("the server refused the API key (give --api-key or $DIFFLM_API_KEY)", key="--api-key")
        if r.status_code != 200:
            raise ConfigError(f"{self.base}/difflm/config answered {r.status_code}: is this a difflm serve?", key="--url")
        try:
            return r.json()
        except ValueError:
            raise ConfigError(f"{self.base}/difflm/config did not answer JSON: is this a difflm serve?", key="--url") from None

    def describe(self) -> str:
        return f"{self.name} at {self.base}"

    def check(self, config: DecodeConfig) -> None:
        """The methods the server lists for its model (it checks again on every request)."""
        if self.methods and config.method not in self.methods:
            raise ConfigError(f"must be one of {', '.join(self.methods)} for {self.name}, got {config.method!r}",
                              key="decode")

    def body(self, config: DecodeConfig, events: bool) -> dict:
        """The extra body fields: every decode setting (so the server decodes what /show says) and denoise."""
        d = to_dict(config)
        extra = {"decode": d.pop("method"), **{k: v for k, v in d.items() if k in DECODE_FIELDS}}
        if events:
            extra["denoise"] = True
        if self.prompt_format:
            extra["prompt_format"] = self.prompt_format
        return extra

    def answer(self, messages, config: DecodeConfig, on_event: OnEvent | None = None,
               stop: threading.Event | None = None) -> Answer:
        import openai

        try:
            stream = self.client.chat.completions.create(
                model=self.name, messages=messages, max_tokens=config.gen_length, seed=config.seed, stream=True,
                extra_body=self.body(config, on_event is not None))
        except openai.APIError as err:
            raise ConfigError(_api_message(err)) from None
        try:
            return self._read(stream, on_event, stop)
        except KeyboardInterrupt:
            raise Cancelled() from None  # the finally below closes the stream: the server cancels the row
        except openai.APIError as err:
            raise ConfigError(_api_message(err)) from None
        finally:
            stream.close()

    def _read(self, stream, on_event: OnEvent | None, stop: threading.Event | None) -> Answer:
        parts: list[str] = []
        for chunk in stream:
            if stop is not None and stop.is_set():
                raise Cancelled()
            extra = (chunk.model_extra or {}).get("difflm")
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    parts.append(choice.delta.content)
            if extra and extra.get("type") == "step" and on_event is not None:
                on_event(extra)
            elif extra and extra.get("type") == "done":
                return Answer.from_done("".join(parts), extra)
        raise ConfigError("the server closed the stream before the answer was complete")

    def close(self) -> None:
        self.client.close()


def _api_message(err) -> str:
    """The server's one-line message from an openai error (its body is OpenAI's error object)."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        msg = body.get("message") or (body.get("error") or {}).get("message")
        if msg:
            return str(msg)
    return first_line(err)


__all__ = ["Answer", "Canvas", "Cancelled", "ChatSession", "LocalBackend", "Quit", "RemoteBackend",
           "apply_settings", "api_base", "parse_assignments", "show_settings"]
