"""What every `difflm` command shares: option types, error handling, recipe loading, printing.

A command is a thin typer function: declare options with the `RecipePath`, `Overrides` and `Debug`
types below, put the work in an inner function, and hand it to `run_command`::

    from cli.common import Debug, Overrides, RecipePath, load_cli_recipe, print_config, run_command

    def generate(
        recipe: RecipePath = None,
        overrides: Overrides = None,
        steps: Annotated[Optional[int], typer.Option(help="Denoising steps S.")] = None,
        debug: Debug = False,
    ):
        '''Generate text.

        Example: difflm generate --recipe recipes/generate-gsm8k.yaml decode.steps=64
        '''

        def work():
            from difflm.generation import GenerateRecipe  # heavy imports inside: `--help` stays fast
            cfg = load_cli_recipe(GenerateRecipe, recipe, overrides, {"decode.steps": steps})
            print_config(cfg)
            ...

        run_command(work, debug)

Exit codes: 0 success, 1 runtime failure, 2 bad input (ConfigError or a typer usage error),
130 interrupted.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.syntax import Syntax

from difflm.config import dump_yaml, load_recipe
from difflm.errors import ConfigError

T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# Option and argument types shared by the commands (typer reads the Annotated metadata).
RecipePath = Annotated[
    Optional[Path],
    typer.Option(
        "--recipe", "-r", metavar="FILE", dir_okay=False, help="YAML recipe file; options and KEY=VALUE override it."
    ),
]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="KEY=VALUE",
        show_default=False,
        help="Recipe overrides, e.g. decode.steps=64 model.name=foo x.y=null (values read as YAML).",
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="On error, print the full traceback.")]


def option(*names: str, help: str, panel: str | None = None, **kw: Any) -> Any:
    """A typer option listed under the `panel` heading of --help (typer's `rich_help_panel`)."""
    return typer.Option(*names, help=help, rich_help_panel=panel, **kw)


def console() -> Console:
    """A rich console on stdout, for results."""
    return Console()


def err_console() -> Console:
    """A rich console on stderr, for progress, configs and errors (stdout stays clean for results)."""
    return Console(stderr=True)


def error_line(message: str) -> None:
    """Print `error: <message>` as one line on stderr."""
    one_line = " ".join(str(message).split())
    err_console().print(f"[bold red]error:[/] {escape(one_line)}", soft_wrap=True, highlight=False)


def run_command(fn: Callable[[], T], debug: bool = False) -> T:
    """Run a command's body `fn()` and turn failures into one line on stderr and an exit code.

    - `ConfigError` (bad recipe, option or file)   -> `error: <message>`, exit 2
    - KeyboardInterrupt                             -> `interrupted; rerun ...`, exit 130
    - any other Exception                           -> `error: <Type>: <message> (rerun with
      --debug for the traceback)`, exit 1
    With `debug`, the full traceback is printed (to stderr) before the line. typer/click's own
    exceptions (`typer.Exit`, `typer.BadParameter`, ...) pass through untouched. Returns fn's value.
    The exit is raised as `typer.Exit(code)` (tests: `pytest.raises(typer.Exit)`, `.exit_code`).
    """
    try:
        return fn()
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except ConfigError as e:
        if debug:
            _print_traceback()
        error_line(str(e))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        error_line("interrupted; rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except ModuleNotFoundError as e:  # an optional dependency: one line naming the pip command
        if debug:
            _print_traceback()
        error_line(missing_module_message(e))
        raise typer.Exit(EXIT_FAILURE) from None
    except Exception as e:  # noqa: BLE001 (the CLI's last line of defence)
        if debug:
            _print_traceback()
            error_line(f"{type(e).__name__}: {e}")
        else:
            error_line(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)")
        raise typer.Exit(EXIT_FAILURE) from None


#: top-level module -> the extra of setup.cfg that installs it
OPTIONAL_MODULES = {"fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "h11": "serve", "openai": "serve",
                    "httpx2": "serve", "alpaca_eval": "eval", "lm_eval": "eval", "matplotlib": "eval",
                    "gguf": "smollm2", "playwright": "test"}


def missing_module_message(e: ModuleNotFoundError) -> str:
    """One line for a missing module: the pip command of difflm's extra that brings it, if one does."""
    name = (e.name or "").split(".")[0]
    extra = OPTIONAL_MODULES.get(name)
    if extra:
        return f"this needs the optional dependency {name!r}: pip install 'difflm[{extra}]'"
    return f"missing Python module {name or str(e)!r}: pip install {name or '...'} (rerun with --debug for the traceback)"


def _print_traceback() -> None:
    # Plain text (not rich's boxed traceback): easy to copy into an issue.
    typer.echo(traceback.format_exc().rstrip(), err=True)


def load_cli_recipe(
    cls: type[T],
    recipe_path: str | Path | None,
    overrides: Iterable[str] | None = None,
    cli_values: Mapping[str, Any] | None = None,
) -> T:
    """`difflm.config.load_recipe` for commands: defaults <- `--recipe` file <- given options
    (`cli_values`, nested or dotted keys; None = option not given) <- `KEY=VALUE` overrides.
    Raises ConfigError (run_command turns it into exit 2)."""
    return load_recipe(cls, recipe_path, list(overrides or ()), cli_values)


def canvas_panel(cells, title: str) -> Panel:
    """The denoising canvas (generate --live, chat): `cells` is (text, is_stop) per answer position, text
    None while masked; masked positions dim, stop tokens a dim dot, committed tokens where they sit."""
    from rich.text import Text

    text = Text()
    for cell, is_stop in cells:
        if cell is None:
            text.append("░", style="dim")
        elif is_stop:
            text.append("·", style="dim cyan")
        else:
            text.append(cell, style="bold")
    return Panel(text, title=title, border_style="magenta")


def print_config(cfg: Any, out: Console | None = None, title: str = "resolved config") -> None:
    """Show the resolved recipe as highlighted YAML in a panel (on stderr unless `out` is given)."""
    out = out or err_console()
    body = Syntax(dump_yaml(cfg).rstrip(), "yaml", theme="ansi_dark", background_color="default")
    out.print(Panel(body, title=title, title_align="left", expand=False))
