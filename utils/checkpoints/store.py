"""Safe, atomic checkpoints.

Two properties matter for week-long runs whose checkpoints get passed around:

* **A crash never costs the run.** ``save_checkpoint`` writes to a temporary file in the
  target directory, fsyncs it, atomically renames it over the target and fsyncs the
  directory. At every instant the target path holds either the previous complete
  checkpoint or the new complete one, never a half-written file.
* **A shared file cannot run code.** ``load_checkpoint`` only ever uses
  ``torch.load(..., weights_only=True)``, whose unpickler refuses arbitrary Python
  objects. To make that possible, ``save_checkpoint`` accepts only plain tensors and
  primitives, so everything it writes loads under ``weights_only=True``.

Every load failure (missing, empty, truncated, corrupt, foreign, malicious, wrong schema)
surfaces as one ``CheckpointError`` whose one-line message names the file and the problem.
"""

from __future__ import annotations

import logging
import os
import pickle
import pickletools
import random
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from utils.atomic_io import atomic_path
from utils.errors import CheckpointError

from .authors_format import (
    AUTHORS_FORMAT,
    convert_authors_checkpoint,
    is_authors_format,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "capture_rng_state",
    "checkpoint_path",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "opqn-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# Exact types only: subclasses such as numpy.float64 (a float) or IntEnum (an int) pickle
# as their own class and would be refused by the weights_only unpickler at load time.
_PRIMITIVES = (str, int, float, bool, type(None))
# OrderedDict and Parameter are what module.state_dict() / optimizers produce; both are on
# torch's weights_only allow-list.
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple)
_TENSORS = (torch.Tensor, nn.Parameter)

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # PROTO opcode: how every binary pickle (and legacy torch file) starts
# Diagnosis reads at most this much of a file that torch refused (foreign files can be huge).
_SCAN_LIMIT = 64 << 20


# --------------------------------------------------------------------------- saving


def _check_plain(obj: Any, key_path: str, active: set[int]) -> None:
    """Raise TypeError at the first value under ``obj`` that weights_only could not load."""
    kind = type(obj)
    if kind in _PRIMITIVES or kind in _TENSORS:
        return
    if kind in _MAPPINGS or kind in _SEQUENCES:
        if id(obj) in active:  # a cycle would recurse forever
            raise TypeError(f"checkpoint state has a reference cycle at {key_path}")
        active.add(id(obj))
        try:
            if kind in _MAPPINGS:
                for key, value in obj.items():
                    if type(key) not in _PRIMITIVES:
                        raise TypeError(
                            f"checkpoint state has a key of type {type(key).__name__} "
                            f"at {key_path}: keys must be str/int/float/bool/None"
                        )
                    _check_plain(value, f"{key_path}[{key!r}]", active)
            else:
                for i, value in enumerate(obj):
                    _check_plain(value, f"{key_path}[{i}]", active)
        finally:
            active.discard(id(obj))
        return
    raise TypeError(
        f"checkpoint state holds a {kind.__module__}.{kind.__qualname__} at {key_path}; "
        "only dict/list/tuple/str/int/float/bool/None/torch.Tensor are allowed "
        "(convert it, e.g. with .item(), list(...) or torch.as_tensor(...))"
    )


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Atomically write ``state`` to ``path`` so that it loads with ``weights_only=True``.

    ``state`` must be a dict holding, recursively, only dict/list/tuple/str/int/float/bool/
    None/torch.Tensor values (use :func:`capture_rng_state` for RNG states). The keys ``"format"`` and
    ``"format_version"`` are added to the written copy; ``state`` itself is not modified.

    The data goes to ``.<stem>.tmp-<pid><suffix>`` next to ``path`` (:mod:`utils.atomic_io`), is flushed and fsynced, then
    renamed over ``path`` with ``os.replace``, and the directory is fsynced. On any error
    the temporary file is removed and an existing checkpoint at ``path`` is left untouched.
    Parent directories are created.

    Returns the path written. Raises ``TypeError`` naming the key path of the first value
    that is not plain, and ``ValueError`` if ``state`` carries a conflicting format marker.
    """
    if type(state) not in _MAPPINGS:
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    for key, expected in (("format", CHECKPOINT_FORMAT), ("format_version", CHECKPOINT_FORMAT_VERSION)):
        if key in state and not (type(state[key]) is type(expected) and state[key] == expected):
            raise ValueError(f"checkpoint state key {key!r} is reserved (got {state[key]!r}, expected {expected!r})")
    _check_plain(state, "state", set())
    payload = dict(state)
    payload["format"] = CHECKPOINT_FORMAT
    payload["format_version"] = CHECKPOINT_FORMAT_VERSION

    path = Path(path)
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return path


# --------------------------------------------------------------------------- loading


def _pickle_globals(data: bytes) -> list[str] | None:
    """Globals a pickle imports, read with pickletools (parses only, executes nothing).

    Returns None when ``data`` does not start with one complete, well-formed pickle.
    """
    found: list[str] = []
    strings: list[str] = []  # string pushes: STACK_GLOBAL takes module and name from them
    memo: dict[int, str] = {}  # protocol 4 memoizes repeated module names
    memo_count = 0
    last: str | None = None  # the string on top of the stack, if any
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL":
                found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<stack global>")
            elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
                strings.append(arg)
                last = arg
                continue
            elif name == "MEMOIZE":
                if last is not None:
                    memo[memo_count] = last
                memo_count += 1
                continue
            elif name in ("PUT", "BINPUT", "LONG_BINPUT") and last is not None:
                memo[int(arg)] = last
                continue
            elif name in ("GET", "BINGET", "LONG_BINGET") and int(arg) in memo:
                strings.append(memo[int(arg)])
                last = memo[int(arg)]
                continue
            last = None
    except Exception:  # malformed / truncated / not a pickle at all
        return None
    return found


def _suspicious_globals(found: Iterable[str]) -> list[str]:
    """The globals that torch's weights_only unpickler would not import."""
    try:  # private, so fall back to a conservative rule if it moves
        from torch import _weights_only_unpickler

        allowed = set(_weights_only_unpickler._get_allowed_globals())
        return [g for g in found if g not in allowed]
    except Exception:
        return [g for g in found if not (g.startswith("torch._utils.") or g.endswith("Storage") or g == "collections.OrderedDict")]


def _refused(path: Path, what: str | None) -> CheckpointError:
    detail = f" (it imports {what})" if what else ""
    return CheckpointError(
        f"refused: {path} contains pickled Python objects that could run code; "
        f"only plain tensors and primitives are loaded{detail}",
        path,
    )


def _read_pickle_globals(path: Path, head: bytes) -> list[str] | None:
    """Globals imported by the file's (first) pickle: data.pkl for torch's zip format.

    Only used to explain a failure; it never decides whether anything gets unpickled.
    """
    try:
        if head.startswith(_ZIP_MAGIC):
            with zipfile.ZipFile(path) as zf:
                name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
                return _pickle_globals(zf.read(name))
        with open(path, "rb") as f:
            return _pickle_globals(f.read(_SCAN_LIMIT))
    except Exception:
        return None


def _precheck(path: Path) -> bytes:
    """Checks that need no unpickling; returns the file's first bytes."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}", path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory: {path}", path)
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}", path)

    if head.startswith(_ZIP_MAGIC):
        # torch's current format is a zip; a cut-off save loses the central directory.
        try:
            with zipfile.ZipFile(path) as zf:
                if not any(n.endswith("/data.pkl") and n.count("/") == 1 for n in zf.namelist()):
                    raise CheckpointError(f"not a PyTorch checkpoint: {path} (a zip archive without data.pkl)", path)
                # torch.load does not verify CRCs, so flipped bytes in tensor data would
                # otherwise load silently as wrong weights. Costs one extra read of the file.
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint is truncated or corrupt: {path} (incomplete zip archive: {e})", path) from None
        if bad is not None:
            raise CheckpointError(f"checkpoint is corrupt: {path} (checksum mismatch in {bad})", path)
    elif not head.startswith(_PICKLE_PROTO):
        # Neither torch's zip format nor a binary pickle (torch's legacy format). An ASCII
        # protocol-0 pickle could still be an attack: report that as a refusal.
        suspicious = _suspicious_globals(_read_pickle_globals(path, head) or [])
        if suspicious:
            raise _refused(path, suspicious[0])
        raise CheckpointError(f"not a PyTorch checkpoint: {path} (unrecognised file header {head[:4]!r})", path)
    return head


def _diagnose(path: Path, head: bytes, exc: Exception) -> CheckpointError:
    """Turn an exception from torch.load into a CheckpointError that says what is wrong."""
    # torch wraps the unpickler's own error in a long advisory (which even suggests
    # weights_only=False); the wrapped error is the one that says what happened.
    inner = exc.__context__ if isinstance(exc, pickle.UnpicklingError) and exc.__context__ else exc
    text = str(inner)
    # The weights_only unpickler names the global it refused to import.
    match = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, flags=re.IGNORECASE)
    if match:
        return _refused(path, match.group(1))
    # Otherwise look for globals ourselves: e.g. a raw protocol-4 pickle is refused for
    # its FRAME opcode before torch ever reaches the global inside it.
    found = _read_pickle_globals(path, head)
    suspicious = _suspicious_globals(found or [])
    if suspicious:
        return _refused(path, suspicious[0])
    if head.startswith(_PICKLE_PROTO):
        # A bare pickle file, or torch's legacy (pre-1.6) format cut short.
        reason = "unreadable pickle data" if found is None else "a pickle that is not a torch checkpoint"
        return CheckpointError(f"not a PyTorch checkpoint, or truncated: {path} ({reason})", path)
    lines = text.strip().splitlines()
    reason = lines[0][:200] if lines else type(inner).__name__
    return CheckpointError(f"checkpoint is truncated or corrupt: {path} ({reason})", path)


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    require_format: bool = True,
    required_keys: Iterable[str] = (),
) -> dict:
    """Load a checkpoint with ``torch.load(..., weights_only=True)``; nothing in it can run.

    ``map_location`` defaults to CPU so that GPU checkpoints open anywhere. With
    ``require_format`` (the default) the file must have been written by
    :func:`save_checkpoint` (``format == "opqn-checkpoint"`` and a ``format_version`` this
    code understands); pass ``False`` to load any plain dict, e.g. a bare state_dict.
    ``required_keys`` are checked to be present.

    Raises ``CheckpointError`` with a one-line message for a missing, empty, truncated,
    corrupt or foreign file, a file with pickled Python objects (refused, never executed),
    a file that is not a dict, and a schema mismatch.
    """
    path = Path(path)
    # Check the device first, so that e.g. "cuda" on a CPU-only machine is not reported as
    # a broken file.
    device = torch.device(map_location)
    if device.type != "cpu":
        torch.empty(0, device=device)
    head = _precheck(path)
    try:
        with warnings.catch_warnings():
            # Foreign pickles make torch warn about their protocol; our error says more.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise _diagnose(path, head, e) from None

    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint is not a dict: {path} (holds a {type(obj).__name__})", path)
    if require_format:
        fmt = obj.get("format")
        if fmt is None:
            # The authors' released files (docs/paper.md) are converted on the fly.
            if is_authors_format(obj):
                obj = convert_authors_checkpoint(obj, path)
                logging.getLogger("opqn").info("%s: converted the %s to this project's format "
                                               "(stage conv biases folded into BatchNorm)",
                                               path, AUTHORS_FORMAT)
                fmt, obj["format"], obj["format_version"] = (CHECKPOINT_FORMAT, CHECKPOINT_FORMAT,
                                                             CHECKPOINT_FORMAT_VERSION)
        if not (isinstance(fmt, str) and fmt == CHECKPOINT_FORMAT):  # may be anything, e.g. a tensor
            keys = ", ".join(repr(k) if not isinstance(k, str) else k for k in list(obj)[:12])
            more = f" (+{len(obj) - 12} more)" if len(obj) > 12 else ""
            raise CheckpointError(
                f"{path} is not an OPQN checkpoint: it fits neither this project's format (no "
                f"format={CHECKPOINT_FORMAT!r} marker) nor the authors' ('backbone' state_dict + "
                f"'mlp' tensor); its keys: {keys or 'none'}{more}", path)
        version = obj.get("format_version")
        if type(version) is not int or not 1 <= version <= CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has unsupported format_version {version!r} "
                f"(this code reads 1..{CHECKPOINT_FORMAT_VERSION})",
                path,
            )
    missing = [k for k in required_keys if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks required keys: {', '.join(map(str, missing))}", path)
    return obj


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """Snapshot the Python, NumPy (legacy global), torch CPU and CUDA RNGs as plain data.

    Tuples/arrays are converted to tensors and primitives so the result passes
    :func:`save_checkpoint` and loads with ``weights_only=True``. NumPy ``Generator``
    objects created with ``np.random.default_rng`` are not global and are not captured.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict = {
        "python": {
            "version": int(py_version),
            # 624 uint32 words + position; int64 holds them exactly.
            "state": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
        "numpy": {
            "bit_generator": str(np_name),
            "state": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():  # Apple GPUs draw dropout masks from their own RNG
        state["mps"] = torch.mps.get_rng_state().cpu()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore RNG states captured by :func:`capture_rng_state` (parts absent are skipped).

    Works with a state loaded to any device (tensors are moved back to CPU). CUDA states
    are restored for as many devices as both the state and this machine have; a mismatch
    only warns, since resuming a GPU run on other hardware is legitimate.
    """
    if "python" in state:
        py = state["python"]
        words = torch.as_tensor(py["state"]).cpu().tolist()
        random.setstate((int(py["version"]), tuple(int(w) for w in words), py["gauss_next"]))
    if "numpy" in state:
        npst = state["numpy"]
        keys = np.asarray(torch.as_tensor(npst["state"]).cpu().numpy(), dtype=np.uint32)
        np.random.set_state(
            (npst["bit_generator"], keys, int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"]))
        )
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))
    mps = getattr(torch.backends, "mps", None)
    if "mps" in state and mps is not None and mps.is_available():
        torch.mps.set_rng_state(torch.as_tensor(state["mps"]).cpu().to(torch.uint8))
    cuda_states = state.get("cuda")
    if cuda_states:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count != len(cuda_states):
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(cuda_states)} device(s), this machine has "
                f"{count}; restoring {min(count, len(cuda_states))}",
                stacklevel=2,
            )
        for i in range(min(count, len(cuda_states))):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_states[i]).cpu().to(torch.uint8), i)


# --------------------------------------------------------------------------- helpers


def last_checkpoint_path(best: str | os.PathLike) -> Path:
    """The last-epoch checkpoint that training writes beside ``best`` (its ``--save``):
    ``<stem>.last<suffix>``, ``.tar`` when ``best`` has no suffix."""
    best = Path(best)
    return best.with_name(f"{best.stem}.last{best.suffix or '.tar'}")


def checkpoint_path(
    name_or_path: str | os.PathLike,
    checkpoint_dir: str | os.PathLike = "checkpoint",
    *,
    must_exist: bool = True,
) -> Path:
    """Resolve a ``--load`` value to a checkpoint file.

    Tried in order: the value as a path; ``checkpoint_dir/value``; then both with ``.tar``
    appended (the original code's naming). If none exists, raises ``CheckpointError``
    listing what was tried, or with ``must_exist=False`` returns ``checkpoint_dir/value``.
    """
    raw = Path(name_or_path)
    candidates = [raw, Path(checkpoint_dir) / raw]
    if raw.suffix != ".tar":
        candidates += [c.with_name(c.name + ".tar") for c in candidates]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if not must_exist:
        return Path(checkpoint_dir) / raw
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))  # ordered, de-duplicated
    raise CheckpointError(f"checkpoint not found: {name_or_path} (tried {tried})", raw)
