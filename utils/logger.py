"""Logging to stdout (through tqdm, so progress bars stay intact) and to ``log/``."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

LOGGER_NAME = "opqn"


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # logging must never crash the run
            self.handleError(record)


def setup_logging(log_file: str | Path | None = None, enabled: bool = True) -> logging.Logger:
    """Configure the ``opqn`` logger: messages to stdout and, if given, to ``log_file``.

    On non-main distributed ranks pass ``enabled=False`` to keep only warnings.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    logger.propagate = False
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_file is not None and enabled:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file_handler)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
