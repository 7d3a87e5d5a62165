"""Turning exceptions into the one-line messages the command line prints."""
from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first meaningful line of an exception's message (cut to ``limit`` characters).

    Messages such as ``load_state_dict``'s span many lines and open with a bare header
    ("Error(s) in loading state_dict for X:"); then the line after the header is the one
    that says what is wrong. An empty message gives the exception's type name.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return line if limit is None else line[:limit]
