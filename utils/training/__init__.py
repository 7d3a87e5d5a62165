"""Training: the loop with monitoring and resumable checkpoints, the learning-rate schedules,
precise BN, and each method's optimiser defaults.

Verbs: ``train(config, settings, splits, device)``, ``build_criterion``, ``build_optimizer``.
"""
from .loop import (TrainingDiverged, TrainingInterrupted, TrainSettings, build_criterion,
                   build_optimizer, train)
from .methods import default_lr, default_optimizer
from .precise_bn import recompute_bn_statistics
from .schedules import build_scheduler

__all__ = ["train", "TrainSettings", "TrainingDiverged", "TrainingInterrupted",
           "build_criterion", "build_optimizer", "build_scheduler", "default_lr",
           "default_optimizer", "recompute_bn_statistics"]
