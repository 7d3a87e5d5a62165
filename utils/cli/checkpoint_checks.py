"""Checks that a checkpoint is what a run needs, made before any work: the keys it holds,
its configuration against the command line (-e, --resume, --search), and that its weights
build the model its configuration describes."""
from __future__ import annotations

from pathlib import Path

import torch

from models import DEFAULT_BACKBONE, DEFAULT_METHOD, RetrievalNet, NetConfig, method_names
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


def checked_model(checkpoint: dict, path: Path) -> RetrievalNet:
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
    stored_method = config.get("method", DEFAULT_METHOD)
    if method and method != stored_method:
        raise UsageError(f"--method {method} contradicts checkpoint {path}, which holds "
                         f"a {stored_method} model (-e reads the method from the checkpoint)")


# Config fields that --resume does not compare: the code length (--len/--num/--words are
# checked by reconcile_spec with their own message; bits follows from them) and the class
# count, which the data decides (the restored class head checks it).
UNCOMPARED_CONFIG = ("num_books", "num_words", "bits", "num_classes")
CONVERTED_CONFIG = {"feature_dim", "width", "input_size", "method", "backbone",
                    "backbone_args", "margin_type"}
# Training settings a run resumes only with (epochs apart: see check_resumable). Paths,
# workers, progress, eval_every, monitor_k and resume itself are bookkeeping.
RESUMED_SETTINGS = ("optimizer", "lr", "momentum", "weight_decay", "adam_betas", "amsgrad",
                    "batch_size", "seed", "amp", "precise_bn", "lr_step", "lr_decay",
                    "schedule", "warmup")
ADAM_ONLY = ("adam_betas", "amsgrad")
# What checkpoints written before a setting was stored trained with, where that is certain.
# Other settings a checkpoint lacks are not compared: it cannot be refused for a record it
# never had the chance to write.
HISTORICAL_SETTINGS = {"schedule": "step", "warmup": 0}


def _comparable(value):
    """Tuples as lists (a checkpoint may hold either), so that equal settings compare equal."""
    if isinstance(value, (tuple, list)):
        return [_comparable(v) for v in value]
    return value


def _refuse_difference(key: str, value, stored, path: Path, why: str) -> None:
    if _comparable(value) != _comparable(stored):
        raise UsageError(f"--resume: {key} {value} of this run contradicts checkpoint {path}, "
                         f"which holds {key} {stored} ({why})")


def check_resumable(spec: CodeSpec, expected: dict, path: Path,
                    expected_settings: dict | None = None) -> None:
    """--resume must continue the same run: its last checkpoint is complete, and its model
    configuration (``expected``: ``NetConfig.to_dict()`` of this run) and training
    settings (``expected_settings``: ``TrainSettings.to_dict()``) agree with this run's."""
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
    # Fields absent from older checkpoints read as NetConfig.from_dict reads them: the
    # defaults (OPQN, sphere20, cosface), then the method's legacy ones.
    stored_method = config.get("method", DEFAULT_METHOD)
    if stored_method not in method_names():
        raise CheckpointError(f"checkpoint {path} holds a model of unknown method "
                              f"{stored_method!r}", path)
    defaults = NetConfig.stored_defaults(stored_method)
    # A converted file holds weights but no run: a run resumed from it starts its training
    # anew, so only what shapes those weights must agree (and it has no settings to check).
    compared = CONVERTED_CONFIG if converted else set(expected) - set(UNCOMPARED_CONFIG)
    for key, value in expected.items():
        if key in compared:
            _refuse_difference(key, value, config.get(key, defaults.get(key)), path,
                               "a run resumes only with the settings it started with")
    if expected_settings and not converted:
        _check_resumed_settings(expected_settings, checkpoint, path)
    checked_model(checkpoint, path)


def _check_resumed_settings(expected: dict, checkpoint: dict, path: Path) -> None:
    """This run's training settings against those the checkpoint was trained with."""
    stored = {**HISTORICAL_SETTINGS, **(checkpoint.get("train_settings") or {})}
    schedule = stored["schedule"]
    # Under the step schedule a run may be given more epochs; a cosine schedule's length
    # shapes every epoch's lr, so it resumes only with its own.
    keys = RESUMED_SETTINGS + (("epochs",) if schedule == "cosine" else ())
    if expected.get("optimizer") != "adam":  # SGD never reads them
        keys = tuple(k for k in keys if k not in ADAM_ONLY)
    for key in keys:
        if key in stored and key in expected:
            why = (f"a {schedule} schedule resumes only with its own settings"
                   if key in ("schedule", "warmup", "epochs")
                   else "a run resumes only with the settings it started with")
            _refuse_difference(key, expected[key], stored[key], path, why)

