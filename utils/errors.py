"""The errors every layer raises, and turning them into the one-line messages the command
lines print (exit 2 for usage errors, 3 for a training run that diverged)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


#: The exit status of ``opqn_main.py`` when training diverged (NaN/inf loss or outputs), so a
#: caller such as the comparison can tell a diverged run from a broken one.
EXIT_DIVERGED = 3


class UsageError(ValueError):
    """A bad command-line value; the message is one line naming the flag and the value."""


class CheckpointError(Exception):
    """A checkpoint could not be loaded; the message is one line naming the file and why."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        # Keep the message on one line so it reads well in logs and CLI errors.
        super().__init__(" ".join(str(message).split()))
        self.path = None if path is None else Path(path)


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
