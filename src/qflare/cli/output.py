"""Where the ``qflare`` command writes, and how a failure reads.

Two audiences: an operator at a terminal (rich tables on stdout, notes and warnings on stderr)
and a script (``--json``: exactly one JSON document on stdout, no markup). Errors are one red
line on stderr in both modes, plus ``{"error": code, "message": ...}`` on stdout with ``--json``.

Values shown here can come from a peer (a security event's detail, a device's state reason):
they are printed as plain text with control characters escaped, so a stored string can neither
inject rich markup nor drive the operator's terminal with escape sequences.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from qflare.keys import MasterKeyUnavailable
from qflare.store import MigrationError, SchemaNotCurrent

PIPE_WIDTH = 200

# What to do next, for the failures an operator meets first.
_HINTS: tuple[tuple[type[BaseException], str], ...] = (
    (MasterKeyUnavailable, "run `qflare init` first, or set QFLARE_MASTER_KEY"),
    (SchemaNotCurrent, "run `qflare db migrate`"),
    (MigrationError, "the database and this release disagree about the schema history"),
)


def printable(value: str) -> str:
    """``value`` with every non-printable character escaped (``\\x1b``, ``\\n``, ...)."""
    if value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in value)


def error_code(exc: BaseException) -> str:
    """A stable snake_case code: the exception's class name (``NotFound`` -> ``not_found``)."""
    if isinstance(exc, ValidationError):
        return "config_error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def error_message(exc: BaseException) -> str:
    """One line that says what failed, with a hint where there is an obvious next step."""
    if isinstance(exc, ValidationError):
        text = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        text = f"invalid settings: {text}"
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    for cls, hint in _HINTS:
        if isinstance(exc, cls):
            text = f"{text} ({hint})"
            break
    return printable(" ".join(text.split()))


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def to_json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, default=_json_default)


class Output:
    def __init__(self, *, json_mode: bool) -> None:
        self.json = json_mode
        # No file given: rich writes to whatever sys.stdout / sys.stderr is at print time.
        self.console = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            # Piped or captured: no screen to fit, and an id folded over two lines is useless
            # to grep, so tables get room instead of rich's 80-column default.
            self.console.width = PIPE_WIDTH

    def emit(self, document: Mapping[str, Any], human: Callable[[Console], None]) -> None:
        """The command's result: ``document`` as JSON, or ``human`` drawing it for a person."""
        if self.json:
            typer.echo(to_json(document))
        else:
            human(self.console)

    def note(self, message: str) -> None:
        """Progress or context for a person; silent with ``--json``."""
        if not self.json:
            self.err.print(Text(message, style="dim"), soft_wrap=True)

    def warn(self, message: str) -> None:
        if not self.json:
            self.err.print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)

    def error(self, code: str, message: str) -> None:
        self.err.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
        if self.json:
            typer.echo(to_json({"error": code, "message": message}))

    def fail(self, exc: BaseException) -> None:
        self.error(error_code(exc), error_message(exc))
