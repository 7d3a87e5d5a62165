"""Tests for utils/checkpoints/store.py: weights_only round-trips, refusal of malicious pickles,
clear errors for broken files, and atomic saves that survive crashes and SIGKILL."""

from __future__ import annotations

import os
import pickle
import random
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.checkpoints import store as ckpt
from utils.checkpoints.store import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny_training_state() -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """A small model, SGD (momentum, as in the paper) after one step, and a StepLR."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.PReLU(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=35, gamma=0.5)
    model(torch.randn(8, 6)).pow(2).mean().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _assert_same(a, b, where="state"):
    """Deep equality for nested dict/list/tuple/tensor structures."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- round trip


def test_realistic_state_round_trips_with_weights_only(tmp_path):
    model, opt, sched = _tiny_training_state()
    state = {
        "epoch": 7,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "config": {"dataset": "facescrub", "len": 36, "num": 6, "words": 64, "margin": 0.5,
                   "lrs": [0.1, 0.05], "shape": (3, 32, 32), "resume": None, "cross": False},
        "rng": capture_rng_state(),
        "best_loss": float("inf"),
    }
    path = save_checkpoint(state, tmp_path / "sub" / "dir" / "model.tar")
    assert path == tmp_path / "sub" / "dir" / "model.tar"
    assert "format" not in state, "save must not modify the caller's dict"

    raw = torch.load(path, weights_only=True)  # the file itself is weights_only-safe
    loaded = load_checkpoint(path)
    _assert_same(raw, loaded)
    assert loaded["format"] == "opqn-checkpoint" and loaded["format_version"] == 1
    _assert_same({k: v for k, v in loaded.items() if not k.startswith("format")}, state)

    # The states load back into fresh objects.
    model2, opt2, sched2 = _tiny_training_state()
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    _assert_same(opt2.state_dict(), opt.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert _no_temp_files(path.parent)


def test_rng_state_restores_the_same_draws(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    # Leave cached gaussians behind so those parts of the state are exercised too.
    random.gauss(0, 1), np.random.randn()
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.tar")

    def draws():
        return ([random.random() for _ in range(3)], random.gauss(0, 1),
                np.random.rand(3).tolist(), float(np.random.randn()), torch.rand(3).tolist())

    expected = draws()
    draws()  # move every generator further on
    restore_rng_state(load_checkpoint(tmp_path / "rng.tar")["rng"])
    assert draws() == expected


def test_save_refuses_non_plain_objects(tmp_path):
    target = tmp_path / "bad.tar"
    cases = [
        ({"cfg": {"lrs": [0.1, np.float64(0.2)]}}, "state['cfg']['lrs'][1]"),
        ({"arr": np.zeros(3)}, "state['arr']"),
        ({"path": tmp_path}, "state['path']"),
        ({"ids": {1, 2}}, "state['ids']"),
        ({"model": nn.Linear(2, 2)}, "state['model']"),
        ({"fn": len}, "state['fn']"),
    ]
    for state, key_path in cases:
        with pytest.raises(TypeError) as info:
            save_checkpoint(state, target)
        assert key_path in str(info.value)
    with pytest.raises(TypeError, match="key"):
        save_checkpoint({"m": {(1, 2): 3}}, target)
    cyclic: dict = {}
    cyclic["self"] = cyclic
    with pytest.raises(TypeError, match="cycle"):
        save_checkpoint(cyclic, target)
    with pytest.raises(TypeError):
        save_checkpoint([1, 2], target)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint({"format": "something-else"}, target)
    assert not target.exists() and _no_temp_files(tmp_path)


# --------------------------------------------------------------------------- malicious


class _OpenOnLoad:
    """Unpickling this calls open(marker, 'w'), creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemOnLoad:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.mark.parametrize("payload", [_OpenOnLoad, _SystemOnLoad])
@pytest.mark.parametrize("writer", ["torch.save", "pickle-2", "pickle-default", "pickle-0"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, writer):
    marker = tmp_path / "PWNED"
    evil = {"model": {"weight": torch.ones(2)}, "format": "opqn-checkpoint", "x": payload(marker)}
    path = tmp_path / "evil.tar"
    if writer == "torch.save":
        torch.save(evil, path)
    else:
        protocol = {"pickle-2": 2, "pickle-0": 0, "pickle-default": pickle.DEFAULT_PROTOCOL}[writer]
        with open(path, "wb") as f:
            pickle.dump(evil, f, protocol=protocol)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"refused: {path} contains pickled Python objects that could run code")
    assert "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "make, imported",
    [
        (lambda: {"rng": np.random.get_state()}, "numpy"),  # np state saved as is
        (lambda: {"model": nn.Linear(2, 2)}, "torch.nn.modules.linear.Linear"),  # whole module
    ],
)
def test_innocent_non_plain_objects_are_refused_too(tmp_path, make, imported):
    # Typical mistakes rather than attacks: still refused, and the message names the import.
    torch.save(make(), tmp_path / "x.tar")
    with pytest.raises(CheckpointError, match=rf"^refused: .*\(it imports {imported}"):
        load_checkpoint(tmp_path / "x.tar")


def test_legacy_torch_format_still_loads(tmp_path):
    # Files from torch < 1.6 (or _use_new_zipfile_serialization=False) are plain pickles.
    torch.save({"w": torch.arange(3)}, tmp_path / "old.tar", _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(tmp_path / "old.tar", require_format=False)["w"], torch.arange(3))


# --------------------------------------------------------------------------- broken files


def _write_broken(kind: str, directory: Path) -> Path:
    path = directory / f"{kind}.tar"
    if kind == "missing":
        return path
    if kind == "empty":
        path.touch()
    elif kind in ("truncated", "bitflip"):
        good = save_checkpoint({"w": torch.arange(4096, dtype=torch.float32)}, directory / "good.tar")
        data = bytearray(good.read_bytes())
        if kind == "truncated":
            data = data[: len(data) // 2]
        else:  # flip a byte inside the tensor payload, which torch itself never checks
            with zipfile.ZipFile(good) as zf:
                info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
            name_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little")
            extra_len = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
            data[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "text":
        path.write_text("epoch 12, loss 0.345\nthis is a log, not a checkpoint\n")
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "not a model")
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"epoch": 3}))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("missing", "checkpoint not found"),
        ("empty", "empty"),
        ("truncated", "truncated or corrupt"),
        ("bitflip", "corrupt"),
        ("text", "not a PyTorch checkpoint"),
        ("png", "not a PyTorch checkpoint"),
        ("zip", "not a PyTorch checkpoint"),
        ("plain-pickle", "not a PyTorch checkpoint"),
    ],
)
def test_broken_files_give_one_line_errors_naming_the_path(tmp_path, kind, expected):
    path = _write_broken(kind, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message
    assert info.value.path == path


def test_schema_checks(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.tar")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(tmp_path / "list.tar")

    bare = nn.Linear(2, 2).state_dict()
    torch.save(bare, tmp_path / "bare.tar")
    with pytest.raises(CheckpointError, match="is not an OPQN checkpoint"):
        load_checkpoint(tmp_path / "bare.tar")
    _assert_same(dict(load_checkpoint(tmp_path / "bare.tar", require_format=False)), dict(bare))

    torch.save({"format": torch.ones(2)}, tmp_path / "odd.tar")
    with pytest.raises(CheckpointError, match="is not an OPQN checkpoint"):
        load_checkpoint(tmp_path / "odd.tar")

    torch.save({"format": "opqn-checkpoint", "format_version": 99}, tmp_path / "future.tar")
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(tmp_path / "future.tar")

    save_checkpoint({"epoch": 1}, tmp_path / "ok.tar")
    assert load_checkpoint(tmp_path / "ok.tar", required_keys=["epoch"])["epoch"] == 1
    with pytest.raises(CheckpointError, match="lacks required keys: model, optimizer"):
        load_checkpoint(tmp_path / "ok.tar", required_keys=["epoch", "model", "optimizer"])


# --------------------------------------------------------------------------- atomicity


def test_crash_during_torch_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"epoch": 1, "w": torch.ones(1000)}, tmp_path / "run.tar")
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial bytes of a checkpoint")  # leave a half-written file
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)

    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    assert _no_temp_files(tmp_path)


def test_crash_at_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"epoch": 1}, tmp_path / "run.tar")

    def failing_replace(src, dst):
        raise KeyboardInterrupt  # also an interrupt (not an Exception) must clean up

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert _no_temp_files(tmp_path)


_SAVER = textwrap.dedent(
    """
    import sys, torch
    from utils.checkpoints.store import save_checkpoint
    path = sys.argv[1]
    i = 0
    while True:
        i += 1
        # ~4 MB per save, so that a kill often lands in the middle of a write.
        save_checkpoint({"step": i, "w": torch.full((1_000_000,), float(i))}, path)
        print(i, flush=True)
    """
)


def test_sigkill_during_repeated_saves_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "live.tar"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = set()
    try:
        first = child.stdout.readline()  # blocks until one save has completed
        assert first.strip(), child.stderr.read()
        # While the child keeps overwriting the file, every read sees a complete version.
        # Kill at a random moment, but only once a few versions went by (slow, shared CI).
        start = time.monotonic()
        kill_at = start + random.uniform(0.2, 0.8)
        while (time.monotonic() < kill_at or len(seen) < 3) and time.monotonic() < start + 20:
            seen.add(load_checkpoint(path)["step"])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL, "the saver died on its own"
    assert len(seen) >= 3, "the child did not keep overwriting the file while we read it"
    loaded = load_checkpoint(path)  # the old or a new version, always complete
    assert torch.equal(loaded["w"], torch.full((1_000_000,), float(loaded["step"])))


# --------------------------------------------------------------------------- helpers


def test_checkpoint_path_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckdir = tmp_path / "checkpoint"
    ckdir.mkdir()
    (ckdir / "model1.tar").write_bytes(b"x")
    (ckdir / "plain").write_bytes(b"x")
    (tmp_path / "elsewhere.pt").write_bytes(b"x")

    assert checkpoint_path(str(tmp_path / "elsewhere.pt")) == tmp_path / "elsewhere.pt"  # existing path
    assert checkpoint_path("elsewhere.pt") == Path("elsewhere.pt")  # relative to cwd
    assert checkpoint_path("model1.tar") == Path("checkpoint/model1.tar")
    assert checkpoint_path("model1") == Path("checkpoint/model1.tar")  # .tar added
    assert checkpoint_path("plain", ckdir) == ckdir / "plain"
    with pytest.raises(CheckpointError, match="checkpoint not found: nope"):
        checkpoint_path("nope")
    assert checkpoint_path("nope", must_exist=False) == Path("checkpoint/nope")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checkpoint_loads_on_cpu_and_cuda_rng_round_trips(tmp_path):
    torch.cuda.manual_seed_all(5)
    state = {"w": torch.randn(4, device="cuda"), "rng": capture_rng_state()}
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
    save_checkpoint(state, tmp_path / "gpu.tar")
    expected = torch.rand(3, device="cuda").cpu()
    loaded = load_checkpoint(tmp_path / "gpu.tar")  # map_location defaults to CPU
    assert loaded["w"].device.type == "cpu"
    restore_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3, device="cuda").cpu(), expected)
    on_gpu = load_checkpoint(tmp_path / "gpu.tar", map_location="cuda")
    assert on_gpu["w"].is_cuda and on_gpu["rng"]["torch"].is_cuda
    restore_rng_state(on_gpu["rng"])  # states loaded onto the GPU still restore
    assert torch.equal(torch.rand(3, device="cuda").cpu(), expected)
