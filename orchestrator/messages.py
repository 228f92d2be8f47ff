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
