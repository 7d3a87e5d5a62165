"""One training run's configuration, resolved once: the dataset's preset, then the method's
defaults (its :class:`models.methods.MethodSpec`), then the flags.

:class:`ModelSettings` and :class:`TrainingOptions` hold what the user asked for, with
``None`` meaning "not given"; :func:`resolve_training` turns them into a
:class:`TrainingConfig`, the model configuration and the training settings that
:func:`utils.training.train` receives, every default filled in. The command line, ``--resume``
checks and the comparison tool all resolve through it, so they cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from data.datasets import DatasetPreset
from models import (DEFAULT_BACKBONE, DEFAULT_METHOD, NetConfig, choose_feature_dim, get_method,
                    parse_backbone_args)
from utils.errors import UsageError

from .loop import TrainSettings
from .precise_bn import DEFAULT_PRECISE_BN_IMAGES


@dataclass(frozen=True)
class ModelSettings:
    """The model to train as given: method and its hyper-parameters, backbone, margin."""

    method: str | None = None  # None: OPQN (and, with -e, "whatever the checkpoint holds")
    method_fields: dict[str, Any] = field(default_factory=dict)  # --<method>-* flags
    backbone: str | None = None  # None: sphere20
    backbone_args: tuple[str, ...] = ()  # KEY=VALUE strings, parsed by models.registry
    pretrained: bool = False
    width: int | None = None
    feature_dim: int | None = None
    margin: float = 0.5
    margin_type: str | None = None  # None: cosface
    scale: float | None = None
    miu: float = 0.1

    @property
    def method_name(self) -> str:
        return self.method or DEFAULT_METHOD


@dataclass(frozen=True)
class TrainingOptions:
    """How to train, as given (:class:`utils.training.TrainSettings` is what the loop takes)."""

    epochs: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    adam_betas: tuple[float, float] | None = None
    amsgrad: bool | None = None
    batch_size: int | None = None
    seed: int = 0
    eval_every: int = 5
    resume: bool = False
    schedule: str | None = None  # None: step
    warmup: int | None = None
    amp: str = "auto"
    precise_bn: int = DEFAULT_PRECISE_BN_IMAGES  # the one default, as train()'s


@dataclass(frozen=True)
class TrainingConfig:
    """Everything one training run uses: ``model`` (stored in its checkpoints) and
    ``settings`` (the optimiser, schedule, batch, precision, precise BN and paths)."""

    model: NetConfig
    settings: TrainSettings


def _given(value, default):
    """A flag's value where it was given (None: not given), else the default."""
    return default if value is None else value


def resolve_optimizer(training: TrainingOptions, method: str, input_size: int) -> dict:
    """``optimizer``, ``lr``, ``weight_decay``, ``adam_betas`` and ``amsgrad`` of a run of
    ``method``: the flags where given, else the method's defaults (its MethodSpec)."""
    spec = get_method(method)
    optimizer = training.optimizer or spec.optimizer_for(input_size)
    adam = spec.adam_form()
    return {"optimizer": optimizer, "lr": training.lr or spec.default_lr(optimizer),
            "weight_decay": _given(training.weight_decay, spec.default_weight_decay(optimizer)),
            "adam_betas": tuple(training.adam_betas or adam.betas),
            "amsgrad": _given(training.amsgrad, adam.amsgrad)}


def resolve_feature_dim(model: ModelSettings, num_books: int, num_words: int,
                        input_size: int) -> int:
    """D: the hash length itself for a hashing method, else ``--feature-dim`` or the
    paper's choice (:func:`models.choose_feature_dim`)."""
    if get_method(model.method_name).hashing:
        return num_books  # one book of 2 words per bit: the feature is the hash layer
    return model.feature_dim or choose_feature_dim(num_books, num_words, input_size)


def resolve_schedule(training: TrainingOptions, epochs: int) -> tuple[str, int]:
    """``(schedule, warmup epochs)``; a UsageError for a warmup the schedule cannot take."""
    schedule, warmup = training.schedule or "step", training.warmup or 0
    if warmup and schedule != "cosine":
        raise UsageError("--warmup works with --schedule cosine")
    if warmup >= epochs:
        raise UsageError(f"--warmup {warmup} must be smaller than the {epochs} epochs")
    return schedule, warmup


def resolve_training(model: ModelSettings, training: TrainingOptions, preset: DatasetPreset,
                     *, num_books: int, num_words: int, num_classes: int, source: str,
                     best_path: Path, last_path: Path, workers: int = 2,
                     progress: bool = True, resume: bool | None = None) -> TrainingConfig:
    """The configuration of one model of ``num_books`` x ``num_words``, trained on
    ``source`` (the dataset name stored in the checkpoint) with ``num_classes`` identities
    (0 while the data is unread: :func:`with_classes` sets it later).

    Each value is the flag's where given, else the method's default, else the preset's.
    """
    method = model.method_name
    epochs = training.epochs or preset.epochs
    schedule, warmup = resolve_schedule(training, epochs)
    config = NetConfig(
        num_books=num_books, num_words=num_words,
        feature_dim=resolve_feature_dim(model, num_books, num_words, preset.input_size),
        num_classes=num_classes, input_size=preset.input_size,
        width=model.width or preset.width, margin=model.margin,
        scale=model.scale or preset.scale, miu=model.miu, dataset=source,
        backbone=model.backbone or DEFAULT_BACKBONE,
        backbone_args=parse_backbone_args(list(model.backbone_args) or None),
        pretrained=model.pretrained, margin_type=model.margin_type or "cosface",
        method=method, params=dict(model.method_fields))
    settings = TrainSettings(
        epochs=epochs, lr_step=preset.lr_step,
        **resolve_optimizer(training, method, preset.input_size),
        batch_size=training.batch_size or preset.batch_size, workers=workers,
        seed=training.seed, eval_every=training.eval_every, best_path=Path(best_path),
        last_path=Path(last_path), resume=training.resume if resume is None else resume,
        progress=progress, schedule=schedule, warmup=warmup, amp=training.amp,
        precise_bn=training.precise_bn)
    return TrainingConfig(config, settings)


def with_classes(resolved: TrainingConfig, num_classes: int, resume: bool) -> TrainingConfig:
    """``resolved`` once the data is read: its class count, and whether it resumes."""
    return TrainingConfig(replace(resolved.model, num_classes=num_classes),
                          replace(resolved.settings, resume=resume))
