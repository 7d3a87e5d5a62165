"""Learning-rate schedules by name: the paper's step halving and cosine decay with warmup.

Both are epoch-based ``torch.optim.lr_scheduler`` objects stepped once after every epoch.
Their state_dict is plain data (it goes into checkpoints), and the cosine one computes the
learning rate in closed form from the epoch count, so a resumed run gets exactly the
learning rates of an uninterrupted one.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, StepLR

SCHEDULES = ("step", "cosine")


def cosine_factor(epoch: int, epochs: int, warmup: int = 0) -> float:
    """Multiplier of the base lr during epoch ``epoch`` (0-based) of ``epochs``.

    * Warmup epochs ``e < warmup`` ramp linearly: ``(e + 1) / (warmup + 1)``.
    * Then ``½·(1 + cos(π·(e − warmup) / (epochs − 1 − warmup)))``: 1 at the first epoch
      after the warmup, falling to exactly 0 at the last epoch (``e == epochs − 1``), which
      therefore only refreshes the BatchNorm statistics: "decays to 0 over ``--epochs``"
      taken literally, so the logged lr of the last epoch is 0.
    """
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    span = max(1, epochs - 1 - warmup)
    progress = min(1.0, (epoch - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int,
                    lr_step: int, lr_decay: float = 0.5, warmup: int = 0) -> LRScheduler:
    """The epoch scheduler named ``schedule``.

    ``step``: multiply the lr by ``lr_decay`` every ``lr_step`` epochs (the paper's halving;
    ``warmup`` must be 0). ``cosine``: :func:`cosine_factor` over ``epochs``.
    """
    if schedule == "step":
        if warmup:
            raise ValueError("--warmup works with --schedule cosine")
        return StepLR(optimizer, lr_step, lr_decay)
    if schedule == "cosine":
        if not 0 <= warmup < epochs:
            raise ValueError(f"--warmup {warmup} must be smaller than --epochs {epochs}")
        return LambdaLR(optimizer, lambda epoch: cosine_factor(epoch, epochs, warmup))
    raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def describe_schedule(schedule: str, lr: float, lr_step: int, warmup: int = 0) -> str:
    """One phrase for the log: ``lr 0.1 halved every 35`` or ``lr 0.1 cosine to 0 ...``."""
    if schedule == "cosine":
        return f"lr {lr:.4g} cosine to 0" + (f" after {warmup} warmup epochs" if warmup else "")
    return f"lr {lr:.4g} halved every {lr_step}"
