"""Errors that users meet, as sentences that name the field and what is allowed."""

from __future__ import annotations

from pydantic import ValidationError


class UserError(Exception):
    """A problem in the user's input or environment, reported without a traceback."""


def describe_error(err: BaseException) -> str:
    """One readable message; pydantic errors become `field.path: reason` lines."""
    if isinstance(err, ValidationError):
        lines = []
        for item in err.errors():
            where = ".".join(str(p) for p in item["loc"]) or "config"
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message}")
        return "\n  ".join(["invalid configuration:", *dict.fromkeys(lines)])
    return str(err)


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def last_line(err: BaseException) -> str:
    """The exception's own message: Ray wraps trial errors in their remote traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
