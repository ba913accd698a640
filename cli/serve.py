"""`difflm serve`: the OpenAI-compatible server (difflm.serve) on a loaded model. Thin: options -> recipe and
`ServeSettings` -> `difflm.serve.app.serve`; the model load and the address are printed here."""

from __future__ import annotations

import socket
from typing import Annotated, Optional

import typer

from cli.common import Debug, Overrides, RecipePath, err_console, load_cli_recipe, option, print_config, run_command
from cli.generate import DecodeOptionsCommand, decode_values, load_with_spinner, model_values

_S = "Server"
_L = "Limits"
API_KEY_ENV = "DIFFLM_API_KEY"


def serve(
    ctx: typer.Context,
    recipe: RecipePath = None,
    overrides: Overrides = None,
    # the Model and Decoding panels: added by DecodeOptionsCommand (the defaults of every request)
    host: Annotated[str, option("--host", help="Address to bind (127.0.0.1: this machine only).", panel=_S)] = "127.0.0.1",
    port: Annotated[int, option("--port", help="TCP port.", panel=_S)] = 8000,
    api_key: Annotated[Optional[str], option("--api-key", envvar=API_KEY_ENV, show_envvar=True,
                                             help="Require 'Authorization: Bearer KEY' on /v1.", panel=_S)] = None,
    served_name: Annotated[Optional[str], option("--served-model-name", help="Model id in /v1/models (default: --model).", panel=_S)] = None,
    prompt_format: Annotated[str, option("--prompt-format", help="Chat messages: chat (template; alpaca if none)|alpaca|alpaca-cot|raw", panel=_S)] = "chat",
    max_batch: Annotated[int, option("--max-batch", help="Rows decoded together.", panel=_S)] = 16,
    window_ms: Annotated[float, option("--batch-window-ms", help="Wait this long for batch-mates.", panel=_S)] = 10.0,
    max_queue: Annotated[int, option("--max-queue", help="Queued rows; beyond: 429.", panel=_S)] = 256,
    timeout: Annotated[float, option("--timeout", help="Seconds per request, queue included (504 after).", panel=_S)] = 600.0,
    max_tokens: Annotated[Optional[int], option("--max-tokens", help="Largest max_tokens (default: the context).", panel=_L)] = None,
    max_n: Annotated[int, option("--max-n", help="Largest n.", panel=_L)] = 8,
    max_body_kb: Annotated[int, option("--max-body-kb", help="Largest request body.", panel=_L)] = 1024,
    max_steps_per_token: Annotated[int, option("--max-steps-per-token", help="Largest steps, per max_tokens token.", panel=_L)] = 4,
    body_timeout: Annotated[float, option("--body-timeout", help="Seconds for a request's body to arrive (408 after).", panel=_L)] = 30.0,
    header_timeout: Annotated[float, option("--header-timeout", help="Seconds for a request's headers to arrive (closed after).", panel=_L)] = 10.0,
    log_level: Annotated[str, option("--log-level", help="critical|error|warning|info|debug", panel=_S)] = "info",
    debug: Debug = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with dynamic batching and a chat page at /.

    Example: difflm serve -m tiny-math --decode conv --steps 32 --gen-length 64 --port 8000

    Example: difflm serve -m GSAI-ML/LLaDA-8B-Instruct --recipe recipes/generate-alpaca-eval.yaml --api-key $KEY

    Then: curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}], "steps": 16}'
    or the openai client with base_url="http://localhost:8000/v1"; the page: http://localhost:8000/
    """
    cli_values = {
        "model": model_values(ctx),
        "decode": decode_values(ctx),
    }

    def work() -> None:
        from difflm.generation import GenerateRecipe, check_model_decoder

        cfg = load_cli_recipe(GenerateRecipe, recipe, overrides, cli_values)
        settings = _settings(cfg, api_key, served_name, prompt_format, max_batch, window_ms, max_queue, timeout,
                             max_tokens, max_n, max_body_kb, log_level, max_steps_per_token=max_steps_per_token,
                             body_timeout=body_timeout, header_timeout=header_timeout)
        check_model_decoder(cfg)
        _check_canvas(cfg)
        _check_port(host, port)
        err = err_console()
        print_config(cfg.decode, title="decode defaults")
        loaded = load_with_spinner(cfg.model)
        _fit_limits(settings, loaded, cfg)
        from difflm.serve.app import serve as run_server

        where = f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}"
        err.print(f"[green]serving[/] {settings.model_id} on {where}  (page: {where}/, API: {where}/v1, "
                  f"batches of <= {max_batch}, key {'required' if settings.api_key else 'off'}); Ctrl-C stops")
        if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
            err.print(f"[yellow]warning[/]: listening on {host} without --api-key: anyone who reaches it can use it")
        run_server(loaded, settings, host=host, port=port, log_level=log_level)

    run_command(work, debug)


def _settings(cfg, api_key, served_name, prompt_format, max_batch, window_ms, max_queue, timeout, max_tokens, max_n,
              max_body_kb, log_level, *, max_steps_per_token=4, body_timeout=30.0, header_timeout=10.0):
    from difflm.errors import ConfigError
    from difflm.serve.app import ServeSettings
    from difflm.serve.protocol import Limits

    checks = [("--max-batch", max_batch, 1), ("--max-queue", max_queue, 1), ("--max-n", max_n, 1),
              ("--max-body-kb", max_body_kb, 1), ("--batch-window-ms", window_ms, 0), ("--timeout", timeout, 0.001),
              ("--max-steps-per-token", max_steps_per_token, 1), ("--body-timeout", body_timeout, 0.001),
              ("--header-timeout", header_timeout, 0.001)]
    for name, value, lo in checks:
        if not value >= lo:  # NaN too
            raise ConfigError(f"must be >= {lo}, got {value}", key=name)
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"must be >= 1, got {max_tokens}", key="--max-tokens")
    check_prompt_format(prompt_format)
    levels = ("critical", "error", "warning", "info", "debug")
    if log_level not in levels:
        raise ConfigError(f"must be one of {', '.join(levels)}, got {log_level!r}", key="--log-level")
    check_api_key(api_key)
    limits = Limits(max_tokens=max_tokens, n=max_n, body_bytes=max_body_kb * 1024, steps_per_token=max_steps_per_token)
    return ServeSettings(decode=cfg.decode, model_id=served_name or cfg.model.name or "difflm", prompt_format=prompt_format,
                         api_key=api_key, max_batch=max_batch, window_ms=window_ms, max_queue=max_queue, timeout_s=timeout,
                         body_timeout_s=body_timeout, header_timeout_s=header_timeout, limits=limits)


def check_api_key(api_key: str | None) -> None:
    """--api-key (or $DIFFLM_API_KEY) may be unset, not blank (serve and chat)."""
    from difflm.errors import ConfigError

    if api_key is not None and not api_key.strip():
        raise ConfigError(f"is empty (from --api-key or ${API_KEY_ENV}): give a key or leave it unset", key="--api-key")


def check_prompt_format(prompt_format: str | None) -> None:
    """--prompt-format, when given, is one of difflm's formats (serve and chat)."""
    from difflm.data.prompts import PROMPT_FORMATS
    from difflm.errors import ConfigError

    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}", key="--prompt-format")


def _check_canvas(cfg) -> None:
    """A canvas including the prompt (generate's total_length / leading_eos) has no meaning for a request, whose
    answer length is its max_tokens: refused before the model load."""
    from difflm.errors import ConfigError

    for key in ("total_length", "leading_eos"):  # the answer length is each request's max_tokens
        if getattr(cfg.decode, key):
            raise ConfigError(f"is a difflm generate setting (a canvas including the prompt); serve answers "
                              f"max_tokens per request: drop it, got {getattr(cfg.decode, key)}", key=f"decode.{key}")


def _fit_limits(settings, model, cfg) -> None:
    """The defaults must fit what a request may ask (--max-tokens, else the model's context)."""
    from difflm.errors import ConfigError

    if cfg.decode.gen_length > settings.limits.tokens(model):
        raise ConfigError(f"the default gen_length {cfg.decode.gen_length} exceeds the max_tokens limit "
                          f"{settings.limits.tokens(model)} (--max-tokens, else the model's context)",
                          key="decode.gen_length")



def _check_port(host: str, port: int) -> None:
    """Fail before the (slow) model load when the address cannot be bound."""
    from difflm.errors import ConfigError

    if not 0 < port < 65536:
        raise ConfigError(f"must be in 1..65535, got {port}", key="--port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve {host!r}: {e.strerror}", key="--host") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port", key="--port") from None


def register(app: typer.Typer) -> None:
    app.command("serve", cls=DecodeOptionsCommand)(serve)
