"""Errors that users meet, as sentences that name the field and what is allowed."""

from __future__ import annotations

import reprlib
from typing import Any

from pydantic import ValidationError

MAX_LINE_CHARS = 1000  # a message line; a value quoted in it is cut by `brief` long before
MAX_LINES = 40  # a message's lines: one per problem, so more repeat the same mistake


class UserError(Exception):
    """A problem in the user's input or environment, reported without a traceback."""


def _short_repr() -> reprlib.Repr:
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxstring, shown.maxother, shown.maxlong = 3, 80, 80, 40
    shown.maxlist = shown.maxtuple = shown.maxdict = shown.maxset = shown.maxfrozenset = 8
    return shown


SHORT_REPR = _short_repr()


def brief(value: Any) -> str:
    """`repr(value)` cut to a few hundred characters (`[1, 1, ...]`): a value quoted in a message or a
    table must not make it megabytes long."""
    return SHORT_REPR.repr(value)


def bounded(text: str) -> str:
    """At most MAX_LINES lines of at most MAX_LINE_CHARS each, saying what was cut."""
    lines = text.splitlines() or [""]
    kept = [line if len(line) <= MAX_LINE_CHARS else f"{line[:MAX_LINE_CHARS]}... ({len(line) - MAX_LINE_CHARS} "
            "more characters)" for line in lines[:MAX_LINES]]
    if len(lines) > MAX_LINES:
        kept.append(f"  ... and {len(lines) - MAX_LINES} more lines")
    return "\n".join(kept)


def describe_error(err: BaseException) -> str:
    """One readable message of bounded size; pydantic errors become `field.path: reason` lines."""
    if isinstance(err, ValidationError):
        lines = []
        for item in err.errors():
            where = ".".join(str(p) for p in item["loc"]) or "config"
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message}")
        return bounded("\n  ".join(["invalid configuration:", *dict.fromkeys(lines)]))
    return bounded(str(err))


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def last_line(err: BaseException) -> str:
    """The exception's own message: Ray wraps trial errors in their remote traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
