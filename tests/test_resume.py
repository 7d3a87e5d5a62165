"""Safe, resumable checkpoints: a run killed with SIGKILL resumes to exactly the result of
an uninterrupted one, checkpoints load with ``weights_only=True``, a NaN/inf loss stops
the run with the last good checkpoint intact, and ``--resume`` refuses what it cannot
continue."""
from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_SYNTHFACE, one_line_error
from models.methods import OPQNLoss
from utils.checkpoints.store import load_checkpoint
from utils.errors import EXIT_DIVERGED
from utils.retrieval import encoding

EPOCHS = 6
COMMON = ["--dataset", "synthface", *TINY_SYNTHFACE, "--len", "12", "--num", "2", "--words",
          "64", "--bs", "12", "--workers", "0", "--eval-every", "0", "--no-progress",
          "--device", "cpu", "--seed", "3", "--amp", "off"]
# One torch thread: faster on two shared cores, and the same reductions in every process.
ENV = {**{k: v for k, v in os.environ.items() if k != "OPQN_DEBUG"},
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RESUME_KEYS = ("config", "backbone", "quantizer", "criterion", "epoch", "optimizer",
               "scheduler", "rng", "best_loss")


pytestmark = pytest.mark.usefixtures("one_thread", "no_debug")


@pytest.fixture(scope="module")
def trained_run(tiny_data_dir, tmp_path_factory) -> Path:
    """A real 2-epoch training run (in-process); returns its last checkpoint."""
    import opqn_main

    root = tmp_path_factory.mktemp("trained")
    code = opqn_main.main([*COMMON, "--data-dir", str(tiny_data_dir), "--epochs", "2",
                           "--save", str(root / "run.tar"), "--log-dir", str(root / "log"),
                           "--out", str(root / "results")])
    assert code == 0
    return root / "run.last.tar"


# --------------------------------------------------------------------------- SIGKILL + resume


def _start(cwd: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    cwd.mkdir()
    out = open(cwd / "stdout.txt", "w")
    try:
        return subprocess.Popen([sys.executable, str(REPO / "opqn_main.py"), *COMMON,
                                 "--data-dir", str(data_dir), *extra],
                                cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    finally:
        out.close()  # the child holds its own copy


def _wait_for_epoch(proc: subprocess.Popen, path: Path, epoch: int, timeout: float) -> None:
    """Poll ``path`` (replaced atomically each epoch) until it holds ``epoch`` or later."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit {proc.returncode}) before epoch {epoch}")
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp != seen:
            seen = stamp
            if load_checkpoint(path)["epoch"] >= epoch:
                return
        time.sleep(0.01)
    pytest.fail(f"no checkpoint of epoch {epoch} after {timeout:.0f} s")


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_data_dir, tmp_path):
    from data.datasets import split_dirs
    from data.loaders import build_splits

    # Build the decoded-image cache first, so that the two concurrent runs only read it.
    build_splits(*split_dirs(tiny_data_dir, "synthface"), 32, cache=True, progress=False)
    args = ("--epochs", str(EPOCHS), "--save", "run.tar")
    victim = _start(tmp_path / "killed", tiny_data_dir, *args)
    reference = _start(tmp_path / "reference", tiny_data_dir, *args)  # runs alongside
    last = tmp_path / "killed" / "checkpoint" / "run.last.tar"
    try:
        _wait_for_epoch(victim, last, 2, timeout=240)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = int(load_checkpoint(last)["epoch"])
    assert 2 <= killed_at < EPOCHS, "the run finished before it could be killed"

    resumed = subprocess.run([sys.executable, str(REPO / "opqn_main.py"), *COMMON,
                              "--data-dir", str(tiny_data_dir), *args, "--resume"],
                             cwd=tmp_path / "killed", capture_output=True, text=True, env=ENV,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from epoch {killed_at}" in resumed.stdout
    assert f"epoch {killed_at}/{EPOCHS} " not in resumed.stdout  # finished epochs not redone
    assert f"epoch {EPOCHS}/{EPOCHS} " in resumed.stdout
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference" / "stdout.txt").read_text()

    got = load_checkpoint(last)
    want = load_checkpoint(tmp_path / "reference" / "checkpoint" / "run.last.tar")
    assert got["epoch"] == want["epoch"] == EPOCHS
    assert [h["epoch"] for h in got["history"]] == list(range(1, EPOCHS + 1))
    for key in ("loss", "ce_x", "ce_s", "entropy", "lr"):
        assert [h[key] for h in got["history"]] == pytest.approx(
            [h[key] for h in want["history"]], rel=1e-6), key
    assert (got["best_epoch"], got["best_loss"]) == (want["best_epoch"],
                                                     pytest.approx(want["best_loss"], rel=1e-6))
    for part in ("backbone", "quantizer", "criterion"):
        for name, tensor in want[part].items():
            torch.testing.assert_close(got[part][name], tensor, rtol=1e-5, atol=1e-6,
                                       msg=f"{part}.{name}")
    assert (tmp_path / "killed" / "results" / "run.json").is_file()


# --------------------------------------------------------------------------- weights_only


def test_training_checkpoint_loads_with_weights_only(trained_run):
    for path in (trained_run, trained_run.with_name("run.tar")):
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
        for key in RESUME_KEYS:
            assert key in checkpoint, key
        config = checkpoint["config"]
        assert (config["bits"], config["num_books"], config["num_words"]) == (12, 2, 64)
        for part in ("backbone", "quantizer", "criterion"):
            assert checkpoint[part] and all(isinstance(t, torch.Tensor)
                                            for t in checkpoint[part].values())
        assert {"state", "param_groups"} <= set(checkpoint["optimizer"])
        assert checkpoint["optimizer"]["state"]  # momentum buffers, needed to resume exactly
        assert "last_epoch" in checkpoint["scheduler"]
        assert isinstance(checkpoint["rng"]["torch"], torch.Tensor)
        assert isinstance(checkpoint["best_loss"], float) and math.isfinite(checkpoint["best_loss"])
        assert checkpoint["format"] == "opqn-checkpoint"
    assert torch.load(trained_run, weights_only=True)["epoch"] == 2


# --------------------------------------------------------------------------- NaN / inf stop


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_loss_stops_with_the_last_good_checkpoint(bad, tiny_data_dir, run_cli,
                                                            tmp_path, capsys, monkeypatch):
    original = OPQNLoss.forward
    calls = []

    def forward(self, *args):
        loss, parts = original(self, *args)
        calls.append(1)
        if len(calls) == 5:  # 36 images / 12 = 3 batches an epoch: the 2nd of epoch 2
            loss = loss * float(bad)
        return loss, parts

    monkeypatch.setattr(OPQNLoss, "forward", forward)
    argv = [*COMMON, "--data-dir", str(tiny_data_dir), "--epochs", "3", "--save", "run.tar"]
    assert run_cli(*argv) == EXIT_DIVERGED
    line = one_line_error(capsys, "training loss became", "at epoch 2",
                          str(Path("checkpoint") / "run.last.tar"))
    assert "nan" in line.lower() or "inf" in line.lower()
    checkpoint = load_checkpoint(tmp_path / "checkpoint" / "run.last.tar")
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["backbone"].values()
               if t.is_floating_point())
    assert load_checkpoint(tmp_path / "checkpoint" / "run.tar")["epoch"] == 1
    assert not (tmp_path / "results").exists()

    if bad == "nan":  # the run goes on from the good checkpoint once the cause is gone
        monkeypatch.setattr(OPQNLoss, "forward", original)
        assert run_cli(*argv, "--resume") == 0
        out, _ = capsys.readouterr()
        assert "resumed from epoch 1" in out
        assert load_checkpoint(tmp_path / "checkpoint" / "run.last.tar")["epoch"] == 3


def test_outputs_that_overflow_under_a_finite_loss_stop_as_diverged(tiny_data_dir, run_cli,
                                                                     tmp_path, capsys,
                                                                     monkeypatch):
    """A loss that explodes without reaching inf can leave a model whose outputs overflow:
    the monitoring evaluation finds it, and the run stops as diverged (exit 3), not as a
    broken run."""
    original = encoding.encode_queries

    def encode_queries(*args, **kwargs):
        tables, labels = original(*args, **kwargs)
        return tables * float("inf"), labels

    monkeypatch.setattr(encoding, "encode_queries", encode_queries)
    argv = [*COMMON, "--data-dir", str(tiny_data_dir), "--epochs", "3", "--eval-every", "2",
            "--save", "run.tar"]
    assert run_cli(*argv) == EXIT_DIVERGED
    one_line_error(capsys, "outputs became NaN or infinite at epoch 2",
                   str(Path("checkpoint") / "run.last.tar"))
    assert load_checkpoint(tmp_path / "checkpoint" / "run.last.tar")["epoch"] == 1
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- --resume refusals


def test_resume_without_a_last_checkpoint(run_cli, tmp_path, capsys):
    assert run_cli(*COMMON, "--data-dir", str(tmp_path / "data"), "--epochs", "2", "--save",
                   "run.tar", "--resume") == 2
    one_line_error(capsys, "--resume", "no last checkpoint",
                   str(Path("checkpoint") / "run.last.tar"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"garbage"], ids=["empty", "garbage"])
def test_resume_from_a_broken_last_checkpoint(content, run_cli, tmp_path, capsys):
    last = tmp_path / "checkpoint" / "run.last.tar"
    last.parent.mkdir()
    last.write_bytes(content)
    assert run_cli(*COMMON, "--data-dir", str(tmp_path / "data"), "--epochs", "2", "--save",
                   "run.tar", "--resume") == 1
    one_line_error(capsys, str(Path("checkpoint") / "run.last.tar"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no data, log, results


def test_resume_needs_the_training_state(trained_run, run_cli, tmp_path, capsys):
    checkpoint = load_checkpoint(trained_run)
    del checkpoint["format"], checkpoint["format_version"], checkpoint["optimizer"]
    from utils.checkpoints.store import save_checkpoint

    save_checkpoint(checkpoint, tmp_path / "checkpoint" / "run.last.tar")
    assert run_cli(*COMMON, "--data-dir", str(tmp_path / "data"), "--epochs", "3", "--save",
                   "run.tar", "--resume") == 1
    one_line_error(capsys, "lacks required keys", "optimizer")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("flags, fragments", [
    (["--len", "16", "--num", "2", "--words", "256"], ["--len 16", "--len 12"]),
    (["--len", "12", "--num", "3", "--words", "16"], ["--num 3", "--num 2"]),
    (["--width", "32"], ["width 32", "width 16"]),
    (["--feature-dim", "1024"], ["feature_dim 1024", "feature_dim 512"]),
], ids=["len", "num", "width", "feature-dim"])
def test_resume_refuses_a_different_model(flags, fragments, trained_run, run_cli, tmp_path,
                                          capsys):
    (tmp_path / "checkpoint").mkdir()
    shutil.copy(trained_run, tmp_path / "checkpoint" / "run.last.tar")
    assert run_cli(*COMMON, "--data-dir", str(tmp_path / "data"), "--epochs", "3", "--save",
                   "run.tar", *flags, "--resume") == 2
    one_line_error(capsys, "contradicts", *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# --------------------------------------------------------------------------- --resume settings


def _resume_copy(checkpoint: Path, tmp_path: Path, edit=None) -> None:
    """``checkpoint`` as ``tmp_path/checkpoint/run.last.tar``, changed by ``edit`` first."""
    from utils.checkpoints.store import save_checkpoint

    state = load_checkpoint(checkpoint)
    if edit is not None:
        edit(state)
    save_checkpoint(state, tmp_path / "checkpoint" / "run.last.tar")


@pytest.mark.parametrize("flags, fragments", [
    (["--weight-decay", "0.001"], ["weight_decay 0.001 of this run", "weight_decay 0.0005"]),
    (["--margin", "0.3"], ["margin 0.3 of this run", "margin 0.5"]),
    (["--lr", "0.05"], ["lr 0.05 of this run", "lr 0.1"]),
    (["--bs", "8"], ["batch_size 8 of this run", "batch_size 12"]),
    (["--seed", "4"], ["seed 4 of this run", "seed 3"]),
    (["--amp", "bf16"], ["amp bf16 of this run", "amp off"]),
], ids=["weight-decay", "margin", "lr", "bs", "seed", "amp"])
def test_resume_refuses_other_training_settings(flags, fragments, trained_run, run_cli,
                                                tmp_path, capsys):
    """Continuing the optimiser state under other flags would record a run that never
    happened: refused before any work, naming the setting and both values."""
    _resume_copy(trained_run, tmp_path)
    assert run_cli(*COMMON, "--data-dir", str(tmp_path / "data"), "--epochs", "3", "--save",
                   "run.tar", *flags, "--resume") == 2
    one_line_error(capsys, "--resume:", "contradicts checkpoint", "run.last.tar",
                   "resumes only with the settings it started with", *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_resume_refuses_another_method_option_and_continues_with_the_same(
        tiny_data_dir, run_cli, tmp_path, capsys):
    argv = [*COMMON, "--data-dir", str(tiny_data_dir), "--method", "dpq", "--save", "run.tar"]
    assert run_cli(*argv, "--epochs", "1") == 0
    capsys.readouterr()
    assert run_cli(*argv, "--epochs", "2", "--dpq-init", "normal", "--resume") == 2
    one_line_error(capsys, "--resume: dpq_init normal of this run contradicts checkpoint",
                   "which holds dpq_init xavier")
    assert load_checkpoint(tmp_path / "checkpoint" / "run.last.tar")["epoch"] == 1
    assert run_cli(*argv, "--epochs", "2", "--resume") == 0  # the same flags continue
    out, _ = capsys.readouterr()
    assert "resumed from epoch 1" in out
    assert load_checkpoint(tmp_path / "checkpoint" / "run.last.tar")["epoch"] == 2


def test_resume_with_the_same_settings_and_an_older_checkpoint(trained_run, run_cli, tmp_path,
                                                               capsys):
    """Settings a checkpoint was written without are not held against it (miu of the
    config reads as its default, the missing training settings are not compared)."""
    def older(state: dict) -> None:
        del state["config"]["miu"]
        for key in ("weight_decay", "amp", "precise_bn", "adam_betas", "amsgrad", "warmup"):
            del state["train_settings"][key]

    _resume_copy(trained_run, tmp_path, older)
    shutil.copy(trained_run.with_name("run.tar"), tmp_path / "checkpoint" / "run.tar")
    assert run_cli(*COMMON, "--data-dir", str(tmp_path / "data"), "--epochs", "3", "--save",
                   "run.tar", "--weight-decay", "0.001", "--resume") == 0
    out, _ = capsys.readouterr()
    assert "resumed from epoch 2" in out
    assert load_checkpoint(tmp_path / "checkpoint" / "run.last.tar")["epoch"] == 3
