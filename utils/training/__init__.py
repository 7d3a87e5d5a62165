"""Training: the loop with monitoring and resumable checkpoints, the learning-rate schedules,
and precise BN (each method's optimiser defaults are in its spec, models.methods).

Verbs: ``train(config, settings, splits, device)``, ``build_criterion``, ``build_optimizer``.
"""
from .loop import (TrainingDiverged, TrainingInterrupted, TrainSettings, build_criterion,
                   build_optimizer, train)
from .precise_bn import recompute_bn_statistics
from .schedules import build_scheduler

__all__ = ["train", "TrainSettings", "TrainingDiverged", "TrainingInterrupted",
           "build_criterion", "build_optimizer", "build_scheduler", "recompute_bn_statistics"]
