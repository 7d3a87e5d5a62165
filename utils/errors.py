"""Turning exceptions into the one-line messages the command lines print."""
from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (plus a --help hint) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def report_error(prog: str, message: str, status: int) -> int:
    """Print ``<prog>: error: <message>`` on stderr; returns the exit ``status``."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


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
