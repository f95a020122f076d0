"""Errors that reach the user as one clear message (the CLI prints them without a traceback)."""

from __future__ import annotations

from collections.abc import Iterable
from difflib import get_close_matches


class XtunerError(Exception):
    """An error caused by user input or environment, with a message that says what to fix."""


class UsageError(XtunerError):
    """A command-line option or request value out of range (the CLI exits 2, before any work)."""


class DataError(XtunerError):
    """Bad data: names the file, the row or line, and the field."""

    def __init__(
        self,
        message: str,
        source: str | None = None,
        location: str | None = None,
        field: str | None = None,
    ):
        self.reason = message
        self.source = source
        self.location = location
        self.field = field
        where = ", ".join(p for p in (source, location, f"field {field!r}" if field else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class RowError(ValueError):
    """Raised by a map fn for one bad row; the pipeline adds file and row, or counts a skip."""

    def __init__(self, message: str, field: str | None = None, skip: bool = False):
        self.reason = message
        self.field = field
        self.skip = skip  # counted and skipped even without ``skip_invalid`` (asked for)
        super().__init__(message)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` naming the known name closest to ``name``, or ``""``."""
    close = get_close_matches(str(name), list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
