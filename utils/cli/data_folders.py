"""The image folders a run reads: synthface generated when absent (never silently over
existing data), the split folders checked, and whether the uint8 cache is used."""
from __future__ import annotations

from pathlib import Path

from data.datasets import split_dirs
from utils.logger import get_logger

from .settings import DataSettings
from .validation import UsageError, check_split_dir


def prepare_folders(data: DataSettings, cross_train: bool) -> tuple[Path, Path]:
    """Generate synthface if needed, then check that the split folders exist; returns the
    (training or cross-training, test) folders."""
    if data.dataset == "synthface":
        from data.synthface import SynthfaceMismatch, use_synthface

        # Generated only when absent or asked for: never silently over the data a model
        # was trained on (-e refuses --regenerate-synthface in check_options).
        try:
            _root, what = use_synthface(
                data.data_dir, data.synthface_identities, data.synthface_images,
                regenerate=data.regenerate_synthface, progress=data.progress)
        except SynthfaceMismatch as exc:
            raise UsageError(str(exc)) from None
        get_logger().info(what)
    train_dir, test_dir = split_dirs(data.data_dir, data.dataset, cross_train)
    check_split_dir(train_dir, "training" if not cross_train else "cross-training")
    check_split_dir(test_dir, "test")
    return train_dir, test_dir
