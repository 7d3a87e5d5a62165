"""Checkpoint files: safe save and load, the authors' released format, model loading.

Verbs: ``save_checkpoint``, ``load_checkpoint``, ``load_model``, ``convert_authors_checkpoint``;
``python -m utils.checkpoints.convert THEIRS.tar OURS.tar`` converts a file once.
"""
from utils.errors import CheckpointError

from .authors_format import convert_authors_checkpoint, is_authors_format
from .loading import load_model
from .store import (capture_rng_state, checkpoint_path, last_checkpoint_path, load_checkpoint,
                    restore_rng_state, save_checkpoint)

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_model",
           "checkpoint_path", "last_checkpoint_path", "capture_rng_state", "restore_rng_state",
           "convert_authors_checkpoint", "is_authors_format"]
