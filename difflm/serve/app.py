"""The OpenAI-compatible HTTP API of `difflm serve` (FastAPI on uvicorn) and the chat page at `/`.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (stream: SSE ending with
`data: [DONE]`), GET /v1/difflm/config (the decode defaults and choices, for the page), GET /health, GET /
(the page) and /static/*. Requests are parsed by `protocol.parse_request` and decoded by the batching
`engine.Engine`; every error is OpenAI's JSON {"error": {message, type, param, code}}.

Why our own body reading and parsing instead of FastAPI's pydantic models: the limits (body size, a slow
sender) must hold before a body is parsed, wrong JSON types must be refused rather than coerced, and the
messages must be the CLI's one-liners with status 400 (FastAPI's validation answers 422 in its own shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from difflm.config import to_dict
from difflm.decoding.config import DecodeConfig, check_method_family
from difflm.decoding.config import METHODS
from difflm.decoding.methods import REGISTRY
from difflm.errors import ConfigError, first_line
from difflm.serve.engine import Engine, QueueFull, ShuttingDown
from difflm.serve.protocol import APIError, Limits, Parsed, cut_at_stop, parse_request

STATIC = Path(__file__).with_name("static")


@dataclass
class ServeSettings:
    """What `difflm serve` was started with (the CLI fills it from options and the recipe)."""

    decode: DecodeConfig = field(default_factory=DecodeConfig)  #: defaults for every request
    model_id: str = "difflm"  #: the name /v1/models lists and requests may give
    prompt_format: str = "chat"  #: for chat messages: the chat template (alpaca where a model has none)
    api_key: str | None = None  #: when set, every /v1 request needs `Authorization: Bearer KEY`
    max_batch: int = 16
    window_ms: float = 10.0
    max_queue: int = 256
    timeout_s: float = 600.0  #: per request, queue time included
    body_timeout_s: float = 30.0  #: a client that has not sent its whole body by then gets 408
    header_timeout_s: float = 10.0  #: a connection that has not sent a request's headers by then is closed
    limits: Limits = field(default_factory=Limits)


def create_app(model, settings: ServeSettings | None = None) -> FastAPI:
    """The app around a loaded model; its engine is `app.state.engine` (started and stopped with the app)."""
    settings = settings or ServeSettings()
    engine = Engine(model, max_batch=settings.max_batch, window_ms=settings.window_ms, max_queue=settings.max_queue,
                    timeout_s=settings.timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="difflm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings, app.state.model = engine, settings, model
    _handlers(app)
    _routes(app, model, settings, engine)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        msg = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return JSONResponse(APIError(err.status_code, msg, type=kind).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        return JSONResponse(APIError(500, first_line(err)).body(), status_code=500)


def _routes(app: FastAPI, model, settings: ServeSettings, engine: Engine) -> None:
    created = int(time.time())

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise APIError(404, "the chat page is not installed (difflm/serve/static/index.html)", type="not_found_error")
        return FileResponse(index)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", **dataclasses.asdict(engine.stats())}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, settings)
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": created,
                                            "owned_by": "difflm"}]}

    @app.get("/v1/difflm/config")
    async def config(request: Request):
        _check_key(request, settings)
        return _config(model, settings)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _complete(request, "chat", model, settings, engine)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, "completions", model, settings, engine)


def _config(model, settings: ServeSettings) -> dict:
    family = getattr(model, "family", None)

    def fits(m: str) -> bool:
        try:
            check_method_family(m, family)
            return True
        except ConfigError:
            return False

    ids = model.ids
    tok = getattr(model, "tokenizer", None)
    return {
        "model": settings.model_id, "decode": to_dict(settings.decode), "methods": [m for m in METHODS if fits(m)],
        "prompt_format": settings.prompt_format,
        "limits": {"max_tokens": settings.limits.tokens(model), "n": settings.limits.n,
                   "steps_per_token": settings.limits.steps_per_token, "prompts": settings.limits.prompts,
                   "stop": settings.limits.stop, "body_bytes": settings.limits.body_bytes},
        "mask_token": tok.convert_ids_to_tokens(ids.mask_id) if tok is not None and ids.mask_id is not None else None,
        "stop_token_ids": list(ids.stop_ids), "context": getattr(model, "max_length", None),
        "api_key_required": settings.api_key is not None,
    }


def _check_key(request: Request, settings: ServeSettings) -> None:
    """Bearer-token check in constant time (hmac.compare_digest) when the server has a key."""
    if settings.api_key is None:
        return
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
        raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                       type="authentication_error", code="invalid_api_key")


async def _read_json(request: Request, settings: ServeSettings):
    limit = settings.limits.body_bytes
    length = request.headers.get("content-length")  # a non-numeric one never gets here: h11 answers 400 itself
    too_large = APIError(413, f"the body is larger than the limit of {limit} bytes")
    if length is not None and int(length) > limit:
        raise too_large
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), settings.body_timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise APIError(408, f"the body did not arrive within {settings.body_timeout_s:g} s") from None

    def no_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(b"".join(chunks), parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON: {first_line(err)}") from None
    except RecursionError:  # "[[[[...]]]]" deeper than Python's stack
        raise APIError(400, "the body is not valid JSON: nested too deeply") from None


async def _complete(request: Request, kind: str, model, settings: ServeSettings, engine: Engine):
    _check_key(request, settings)
    body = await _read_json(request, settings)
    parsed = parse_request(body, kind, defaults=settings.decode, model=model, model_id=settings.model_id,
                           limits=settings.limits, prompt_format=settings.prompt_format)
    run = _Run(kind, parsed, settings.model_id, asyncio.get_running_loop(), engine)
    run.submit(engine)
    if parsed.stream:
        return StreamingResponse(run.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await run.gather(request)


class _Run:
    """One HTTP request's jobs (one per prompt) and the events coming back from the engine thread."""

    def __init__(self, kind: str, parsed: Parsed, model_id: str, loop: asyncio.AbstractEventLoop, engine: Engine):
        self.kind, self.p, self.model_id, self.loop, self.engine = kind, parsed, model_id, loop, engine
        self.queue: asyncio.Queue = asyncio.Queue()
        self.jobs = []
        self.total = len(parsed.prompts) * parsed.n
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def submit(self, engine: Engine) -> None:
        if self.total > engine.max_queue:  # would never fit: not a "retry later"
            raise APIError(400, f"{self.total} choices (prompts x n) exceed the server's queue of {engine.max_queue} "
                                "rows (--max-queue)", "n")
        try:
            for i, ids in enumerate(self.p.prompts):
                base = i * self.p.n

                def sink(ev: dict, base=base) -> None:
                    self.loop.call_soon_threadsafe(self.queue.put_nowait, (base, ev))

                self.jobs.append(engine.submit(ids, self.p.config, n=self.p.n, events=self.p.stream, sink=sink,
                                               first=base))
        except QueueFull as err:
            self.cancel()
            raise APIError(429, str(err), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(err.retry_after)}) from None
        except ShuttingDown as err:
            self.cancel()
            raise APIError(503, str(err), type="server_error", headers={"Retry-After": "5"}) from None

    def cancel(self) -> None:
        for j in self.jobs:
            j.cancel()

    def final_text(self, ev: dict) -> tuple[str, str]:
        text, hit = cut_at_stop(ev["text"], self.p.stop)
        return text, "stop" if hit else ev["finish_reason"]

    def returned_tokens(self, ev: dict) -> int:
        """The answer's tokens that the returned text holds (fewer than content_tokens when a stop string cut it)."""
        text, hit = cut_at_stop(ev["text"], self.p.stop)
        return self.engine.tokens_of_prefix(ev["token_ids"][: ev["content_tokens"]], text) if hit else ev["content_tokens"]

    def usage(self, done: dict[int, dict]) -> dict:
        prompt = sum(len(p) for p in self.p.prompts)
        completion = sum(self.returned_tokens(ev) for ev in done.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def gather(self, request: Request):
        """Wait for every choice (a gone client cancels its rows), then one completion object."""
        done: dict[int, dict] = {}
        try:
            while len(done) < self.total:
                try:
                    base, ev = await asyncio.wait_for(self.queue.get(), 0.5)
                except (asyncio.TimeoutError, TimeoutError):
                    if await request.is_disconnected():
                        self.cancel()
                        return Response(status_code=499)
                    continue
                if ev["type"] == "error":
                    raise _event_error(ev)
                if ev["type"] == "done":
                    done[base + ev["index"]] = ev
        finally:
            if len(done) < self.total:
                self.cancel()
            self.jobs = []  # the jobs' sinks point back here: no cycle outlives the request
        choices = [self.choice(i, done[i]) for i in range(self.total)]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_id,
                "system_fingerprint": _fingerprint(), "choices": choices, "usage": self.usage(done)}

    def choice(self, i: int, ev: dict) -> dict:
        text, reason = self.final_text(ev)
        out = {"index": i, "finish_reason": reason, "logprobs": None, "difflm": _summary(ev)}
        if self.kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        return out

    async def stream(self):
        """SSE: content deltas as the decoded prefix grows, the canvas events when asked (denoise), one
        final chunk per choice, usage if asked, then [DONE]. Closing the connection cancels the rows."""
        sent = [""] * self.total
        done: dict[int, dict] = {}
        holdback = max((len(s) for s in self.p.stop), default=1) - 1
        streams_prefix = not REGISTRY[self.p.config.method].remdm  # ReMDM remasks: its prefix can shrink
        try:
            if self.kind == "chat":
                yield self.sse([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                for i in range(self.total)])
            while len(done) < self.total:
                base, ev = await self.queue.get()
                i = base + ev["index"]
                if ev["type"] == "error":
                    yield _sse(_event_error(ev).body())
                    break
                if ev["type"] == "step":
                    delta = ""
                    if streams_prefix:
                        text, hit = cut_at_stop(ev["text"], self.p.stop)
                        keep = text if hit else text[: max(0, len(text) - holdback)].rstrip("\ufffd")
                        if keep.startswith(sent[i]) and len(keep) > len(sent[i]):
                            delta, sent[i] = keep[len(sent[i]):], keep
                    if delta or self.p.denoise:
                        step = {**ev, "index": i} if self.p.denoise else None  # i: the request's choice
                        yield self.sse([self.delta(i, delta, None)], difflm=step)
                    continue
                done[i] = ev
                text, reason = self.final_text(ev)
                rest = text[len(sent[i]):] if text.startswith(sent[i]) else ""
                yield self.sse([self.delta(i, rest, reason)], difflm={"type": "done", **_summary(ev), "index": i,
                                                                      "token_ids": ev["token_ids"]})
            else:
                if self.p.include_usage:
                    yield self.sse([], usage=self.usage(done))
            yield "data: [DONE]\n\n"
        finally:
            if len(done) < self.total:
                self.cancel()
            self.jobs = []

    def delta(self, i: int, text: str, reason: str | None) -> dict:
        if self.kind == "chat":
            return {"index": i, "delta": {"content": text} if text else {}, "finish_reason": reason, "logprobs": None}
        return {"index": i, "text": text, "finish_reason": reason, "logprobs": None}

    def sse(self, choices: list, **extra) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                 "created": self.created, "model": self.model_id, "system_fingerprint": _fingerprint(),
                 "choices": choices}
        chunk.update({k: v for k, v in extra.items() if v is not None})
        return _sse(chunk)


def _event_error(ev: dict) -> APIError:
    """The engine's error event as the API error a response or a stream carries (one type for both)."""
    return APIError(ev["status"], ev["message"], type="timeout" if ev["status"] == 504 else None)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _summary(ev: dict) -> dict:
    keys = ("nfe", "steps", "seconds", "tokens_per_second", "rep4", "seed", "content_tokens", "text")
    return {k: ev[k] for k in keys}


def _fingerprint() -> str:
    from difflm import __version__

    return f"difflm-{__version__}"


def serve(model, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_s: float = 30.0) -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM (`build_server`: graceful shutdown, header timeout)."""
    with _stop_signals_handled():
        build_server(model, settings, host=host, port=port, log_level=log_level, graceful_s=graceful_s).run()


def build_server(model, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000,
                 log_level: str = "info", graceful_s: float = 30.0, drain_s: float = 10.0):
    """The uvicorn server of `create_app(model, settings)` (`server.config.app`), not yet running.

    Shutdown (SIGINT/SIGTERM, or `server.should_exit = True`): uvicorn stops accepting and lets in-flight
    requests finish; at `graceful_s` the engine stops, so every request still waiting gets OpenAI's error
    (503; a stream: an error event, then `[DONE]`) within `drain_s` more seconds, before uvicorn would cut what
    is left (a plain-text 500 or a stream without its end). Connections that have not sent a request's headers
    within `settings.header_timeout_s` are closed (uvicorn times out only idle keep-alive connections)."""
    import uvicorn

    app = create_app(model, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            http=_header_timeout_protocol(settings.header_timeout_s),
                            timeout_graceful_shutdown=graceful_s + drain_s, access_log=log_level == "debug")
    return _graceful_server_class()(config, engine=app.state.engine, graceful_s=graceful_s)


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's Server that stops the engine `graceful_s` into its shutdown (the waiters then answer)."""

        def __init__(self, config, *, engine: Engine, graceful_s: float):
            super().__init__(config)
            self.engine, self.graceful_s = engine, graceful_s

        async def shutdown(self, sockets=None) -> None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.graceful_s, lambda: loop.run_in_executor(None, self.engine.stop))
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return GracefulServer


def _header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline for a request's headers: `timeout_s` from the connection's
    start, or from the end of its previous response; a connection still without complete headers then is
    closed. (uvicorn times out idle keep-alive connections only until their first byte, and never a new one.)"""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer = None

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request (or only part of its headers) within the deadline

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return HeaderTimeoutH11


@contextlib.contextmanager
def _stop_signals_handled():
    """uvicorn handles SIGINT/SIGTERM itself, and after its graceful shutdown raises the signal again for
    the handler that was there before it: Python's default would kill the process by SIGTERM (exit -15) or
    raise KeyboardInterrupt (the CLI's "interrupted; rerun" exit 130) after a clean stop. A no-op handler
    for that re-raise makes a signalled, cleanly stopped server exit 0."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGINT, signal.SIGTERM]
    before = {sig: signal.signal(sig, lambda *_: None) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
