"""Error types shared by the library and the CLI.

`ConfigError` means bad input from the user (a recipe key, an option, a file): the CLI prints its
one-line message and exits with code 2. Anything else that escapes is a runtime failure (exit 1).
"""


class DifflmError(Exception):
    """Base class for difflm's own errors."""


class ConfigError(DifflmError, ValueError):
    """Bad user input. The message is one line and names the offending key or value."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def error_summary(err: BaseException) -> str:
    """`Type: first line of the message` (just `Type` when the message is empty), for one-line reports."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
