"""`difflm chat`: a terminal REPL on a local model or a running `difflm serve` (`--url`).

Thin: options -> a `difflm.serve.chat.ChatSession`; this file reads lines, draws the canvas while the answer
decodes (rich Live, on a terminal) and prints. The session, the commands and the backends are in
difflm/serve/chat.py.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from cli.common import Debug, Overrides, RecipePath, canvas_panel, console, err_console, error_line, load_cli_recipe, option, run_command
from cli.generate import DecodeOptionsCommand, decode_values, load_with_spinner, model_values
from cli.serve import API_KEY_ENV, check_api_key, check_prompt_format

_C = "Chat"


def chat(
    ctx: typer.Context,
    recipe: RecipePath = None,
    overrides: Overrides = None,
    # the Model and Decoding panels: added by DecodeOptionsCommand (the settings the chat starts with)
    url: Annotated[Optional[str], option("--url", help="A running `difflm serve` (http://host:port) instead of a local model.", panel=_C)] = None,
    api_key: Annotated[Optional[str], option("--api-key", envvar=API_KEY_ENV, show_envvar=True,
                                             help="The server's key (with --url).", panel=_C)] = None,
    prompt_format: Annotated[Optional[str], option("--prompt-format", help="chat (template; alpaca if none)|alpaca|alpaca-cot|raw", panel=_C)] = None,
    system: Annotated[Optional[str], option("--system", help="A system message before the conversation.", panel=_C)] = None,
    plain: Annotated[bool, option("--plain", help="No live canvas (the default when stdin or stderr is not a terminal).", panel=_C)] = False,
    debug: Debug = False,
) -> None:
    """Chat with a diffusion LM in the terminal and watch each answer decode in place.

    Example: difflm chat -m tiny-math --decode conv --steps 16

    Example: difflm chat --url http://localhost:8000

    Type a message and Enter. Commands: /decode conv, /steps 32, /set kernel_size=16 (any decode setting), /show, /reset (forget the conversation), /help, /quit (or Ctrl-D). Ctrl-C cancels the answer being decoded.

    Input may be piped, one message or command a line: the answers are printed on stdout, without the live canvas.
    """
    given_model = model_values(ctx)
    decode = decode_values(ctx)

    def start():
        if url is not None:
            return _remote_session(url, api_key, prompt_format, system, given_model, decode, recipe, overrides)
        return _local_session(recipe, overrides, given_model, decode, prompt_format, system)

    session = run_command(start, debug)
    live = not plain and sys.stdin.isatty() and sys.stderr.isatty()
    try:
        run_command(lambda: _repl(session, live), debug)
    finally:
        session.backend.close()


def _local_session(recipe, overrides, given_model, decode, prompt_format, system):
    from difflm.generation import GenerateRecipe, check_model_decoder
    from difflm.models.named import DEFAULT_MODEL
    from difflm.serve.chat import ChatSession, LocalBackend

    check_prompt_format(prompt_format)
    cfg = load_cli_recipe(GenerateRecipe, recipe, overrides, {"model": given_model, "decode": decode})
    check_model_decoder(cfg)
    name = cfg.model.name or DEFAULT_MODEL
    loaded = load_with_spinner(cfg.model)
    return ChatSession(LocalBackend(loaded, name=name, prompt_format=prompt_format or "chat"), cfg.decode, system=system)


def _remote_session(url, api_key, prompt_format, system, given_model, decode, recipe, overrides):
    from difflm.errors import ConfigError
    from difflm.serve.chat import ChatSession, RemoteBackend, apply_settings

    local_only = [f"--{k.replace('_', '-')}" for k, v in given_model.items() if v is not None]
    if recipe is not None or overrides:
        local_only.append("--recipe/KEY=VALUE")
    if local_only:
        raise ConfigError(f"{', '.join(local_only)} apply to a local model; with --url the server's model decodes "
                          "(set decoding with the decoding options or /set)", key="--url")
    check_prompt_format(prompt_format)
    check_api_key(api_key)
    backend = RemoteBackend(url, api_key=api_key, prompt_format=prompt_format)
    config = apply_settings(backend.defaults, {k: v for k, v in decode.items() if v is not None})
    backend.check(config)
    return ChatSession(backend, config, system=system)


def _read_line(out, interactive: bool) -> str | None:
    """The next input line (None: EOF or Ctrl-C at the prompt, which end the chat)."""
    try:
        return out.input("[bold green]you>[/] ") if interactive else input()
    except (EOFError, KeyboardInterrupt):
        if interactive:
            out.print()
        return None


def _repl(session, live: bool) -> None:
    from difflm.errors import ConfigError
    from difflm.serve.chat import Quit, show_settings

    out, err = console(), err_console()
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    err.print(f"[bold]difflm chat[/]: {session.backend.describe()}; {show_settings(session.config)}", highlight=False,
              soft_wrap=True)
    err.print("[dim]/help for commands, /quit or Ctrl-D to leave[/]")
    while (line := _read_line(out, interactive)) is not None:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            try:
                out.print(session.command(line), markup=False, highlight=False, soft_wrap=True)
            except Quit:
                break
            except ConfigError as e:
                error_line(str(e))
            continue
        _answer(session, line, out, err, live)


def _answer(session, line: str, out, err, live: bool) -> None:
    """Decode one answer (the canvas live on stderr when `live`), then print it on stdout."""
    from rich.live import Live

    from difflm.errors import ConfigError
    from difflm.serve.chat import Canvas, Cancelled

    canvas = Canvas()
    view = Live(console=err, refresh_per_second=15, transient=True) if live else None

    def on_event(ev: dict) -> None:
        canvas.update(ev)
        view.update(_render(canvas, session.backend.stop_ids))

    try:
        if view is None:
            ans = session.ask(line)
        else:
            with view:
                ans = session.ask(line, on_event)
    except (Cancelled, KeyboardInterrupt):
        err.print("[yellow](answer cancelled)[/]")
        return
    except ConfigError as e:
        error_line(str(e))
        return
    out.print(ans.text, markup=False, highlight=False, soft_wrap=True)
    err.print(f"[dim]{ans.content_tokens} tokens, {ans.nfe} NFE, {ans.seconds:.2f} s, "
              f"{ans.tokens_per_second:.1f} tokens/s, seed {ans.seed}[/]", highlight=False)


def _render(canvas, stop_ids):
    """The canvas as generate --live draws it: masked positions dim, committed tokens where they sit."""
    cells = [(cell, tid in stop_ids) for cell, tid in zip(canvas.cells, canvas.ids)]
    return canvas_panel(cells, f"step {canvas.step}  NFE {canvas.nfe}  masked {canvas.masked}/{canvas.length}")


def register(app: typer.Typer) -> None:
    app.command("chat", cls=DecodeOptionsCommand)(chat)
