"""Checks that a checkpoint is what a run needs, made before any work: the keys it holds,
its configuration against the command line (-e, --resume, --search), and that its weights
build the model its configuration describes."""
from __future__ import annotations

from pathlib import Path

import torch

from models import DEFAULT_BACKBONE, OPQN, OPQNConfig
from utils.checkpoints.loading import load_model
from utils.checkpoints.store import CheckpointError, load_checkpoint
from utils.training.loop import CRITERION_KEY, criterion_state

from .validation import CodeSpec, UsageError

REQUIRED_KEYS = ("config", "backbone", "quantizer")
RESUME_KEYS = REQUIRED_KEYS + ("epoch", "best_loss", "best_epoch", "history",
                               "optimizer", "scheduler", "rng")


def reconcile_spec(spec: CodeSpec, config: dict, path: Path) -> None:
    """--len/--num/--words may be omitted with -e, but must not contradict the checkpoint."""
    stored = {"--len": config.get("bits"), "--num": config.get("num_books"),
              "--words": config.get("num_words")}
    given = {"--len": spec.bits, "--num": spec.num_books, "--words": spec.num_words}
    for flag, value in given.items():
        if value is not None and value != stored[flag]:
            raise UsageError(f"{flag} {value} contradicts checkpoint {path}, which holds "
                             f"{flag} {stored[flag]} ({stored['--len']}-bit, "
                             f"{stored['--num']}x{stored['--words']})")


def checked_config(checkpoint: dict, path: Path) -> dict:
    """The checkpoint's config dict; a CheckpointError when it is not one."""
    config = checkpoint["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path} has no valid config (it holds a "
                              f"{type(config).__name__})", path)
    return config


def checked_model(checkpoint: dict, path: Path) -> OPQN:
    """The checkpoint's model, built on the CPU: its config and weights must agree."""
    try:
        return load_model(checkpoint, torch.device("cpu"))
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}", path) from None
    except Exception as exc:  # a config with missing or nonsensical values
        raise CheckpointError(f"checkpoint {path} holds an invalid model configuration "
                              f"({type(exc).__name__}: {exc})", path) from None


def check_evaluation_choice(config: dict, path: Path, backbone: str | None,
                            method: str | None) -> None:
    """-e reads backbone and method from the checkpoint: flags given must agree with it."""
    stored_backbone = config.get("backbone", DEFAULT_BACKBONE)
    if backbone and backbone != stored_backbone:
        raise UsageError(f"--backbone {backbone} contradicts checkpoint {path}, which "
                         f"holds backbone {stored_backbone}")
    stored_method = config.get("method", "opqn")
    if method and method != stored_method:
        raise UsageError(f"--method {method} contradicts checkpoint {path}, which holds "
                         f"a {stored_method} model (-e reads the method from the checkpoint)")


def check_resumable(spec: CodeSpec, expected: dict, path: Path,
                    expected_schedule: dict | None = None) -> None:
    """--resume must continue the same model: its last checkpoint is complete and agrees."""
    checkpoint = load_checkpoint(path, map_location="cpu", required_keys=REQUIRED_KEYS)
    # A converted authors' file has no training state: resuming it starts a new class head.
    converted = "converted_from" in checkpoint
    needed = REQUIRED_KEYS + ("epoch",) if converted else RESUME_KEYS
    missing = [key for key in needed if key not in checkpoint]
    if not converted and criterion_state(checkpoint) is None:
        missing.append(CRITERION_KEY)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks required keys: {', '.join(missing)}",
                              path)
    config = checked_config(checkpoint, path)
    reconcile_spec(spec, config, path)
    # Fields absent from older checkpoints take their defaults (opqn, sphere20, cosface).
    defaults = OPQNConfig(1, 2, 2, 1).to_dict()
    for key, value in expected.items():
        stored = config.get(key, defaults.get(key))
        if stored != value:
            raise UsageError(f"--resume: {key} {value} of this run contradicts checkpoint "
                             f"{path}, which holds {key} {stored}")
    stored_settings = checkpoint.get("train_settings") or {}
    if expected_schedule:
        schedule = stored_settings.get("schedule", "step")
        keys = ("schedule", "warmup") + (("epochs",) if schedule == "cosine" else ())
        for key in keys:
            value = expected_schedule[key]
            stored = stored_settings.get(key, {"schedule": "step", "warmup": 0}.get(key))
            if stored != value:
                raise UsageError(f"--resume: {key} {value} of this run contradicts checkpoint "
                                 f"{path}, which holds {key} {stored} (a {schedule} schedule "
                                 f"resumes only with its own settings)")
    checked_model(checkpoint, path)
