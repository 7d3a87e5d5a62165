"""Shared fixtures: a tiny synthface dataset, generated once per test session."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What `--synthface-identities 6 --synthface-images 6` asks for (see utils.cli.data_folders).
TINY_SYNTHFACE = ["--synthface-identities", "6", "--synthface-images", "6"]
PROG = "opqn_main.py: error: "
SEARCH_COMMON = ["--workers", "0", "--no-progress", "--bs", "12"]


def one_line_error(capsys, *fragments: str) -> str:
    """stderr is exactly one error line holding every fragment; no traceback anywhere."""
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith(PROG), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    from data.synthface import ensure_synthface

    data_dir = tmp_path_factory.mktemp("data")
    ensure_synthface(data_dir, num_identities=6, train_per_identity=6, cross_identities=3,
                     progress=False)
    return data_dir


@pytest.fixture(scope="session")
def search_model(tiny_data_dir, tmp_path_factory):
    """For --search tests: a tiny synthface model trained 2 epochs (12 bits, 2x64), a private
    copy of the gallery (train split) and the test split: ``(checkpoint, gallery, test)``."""
    import shutil

    import opqn_main

    root = tmp_path_factory.mktemp("search")
    with opqn_logger_restored():
        code = opqn_main.main([
            "--dataset", "synthface", "--data-dir", str(tiny_data_dir), *TINY_SYNTHFACE,
            *SEARCH_COMMON, "--len", "12", "--num", "2", "--words", "64", "--epochs", "2",
            "--eval-every", "0", "--seed", "3", "--amp", "off", "--save", str(root / "tiny.tar"),
            "--log-dir", str(root / "log"), "--out", str(root / "train_results")])
    assert code == 0
    gallery = root / "gallery"
    shutil.copytree(tiny_data_dir / "synthface" / "train", gallery)
    return root / "tiny.tar", gallery, tiny_data_dir / "synthface" / "test"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: faster on 2 shared cores, and the same arithmetic run to run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_debug(monkeypatch):
    """Errors must print their one line, not re-raise for a traceback."""
    monkeypatch.delenv("OPQN_DEBUG", raising=False)


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Run ``opqn_main.main`` in-process inside ``tmp_path``; returns (exit code, out, err)."""
    import opqn_main

    monkeypatch.chdir(tmp_path)

    def run(*argv: str, capsys=None) -> int:
        try:
            return opqn_main.main(list(argv))
        except SystemExit as exc:  # argparse errors
            return int(exc.code)

    with opqn_logger_restored():
        yield run


@contextlib.contextmanager
def opqn_logger_restored():
    """The CLI's setup_logging stops the "opqn" logger from propagating; restore it so that
    later tests' caplog still sees its records (test order must not matter)."""
    import logging

    logger = logging.getLogger("opqn")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        yield
    finally:
        for handler in list(logger.handlers):
            if handler not in saved[0]:
                logger.removeHandler(handler)
                handler.close()
        logger.handlers[:] = saved[0]
        logger.propagate, logger.level = saved[1], saved[2]


@pytest.fixture(autouse=True)
def restore_opqn_logger():
    """Every test, not only those using run_cli, leaves the logger as it found it."""
    with opqn_logger_restored():
        yield
