"""The `difflm` command line: `difflm tokenize | sft | r2ft | generate | eval | serve | chat ...`.

Each subcommand lives in its own module with a `register(app)` function; this file only wires
them together. `main()` is the console script (setup.cfg: `difflm = cli.main:main`);
`python -m cli.main` works too.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli import chat as _chat
from cli import eval as _eval
from cli import generate as _generate
from cli import merge as _merge
from cli import r2ft as _r2ft
from cli import serve as _serve
from cli import sft as _sft
from cli import sweep as _sweep
from cli import tokenize as _tokenize

app = typer.Typer(
    name="difflm",
    help="Fast and fluent diffusion language models: convolutional decoding and R2FT.\n\n"
    "Example: difflm generate --recipe recipes/generate-gsm8k.yaml decode.steps=64",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from difflm import __version__

        typer.echo(f"difflm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Global options (the app's help text is set on `app` above)."""


_tokenize.register(app)
_sft.register(app)
_r2ft.register(app)
_generate.register(app)
_sweep.register(app)
_eval.register(app)
_merge.register(app)
_serve.register(app)
_chat.register(app)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="difflm")


if __name__ == "__main__":
    main()
