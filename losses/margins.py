"""Margins at the target class of cosine logits: CosFace (the paper's) and ArcFace.

Both take cosines ``cos θ`` of shape ``(..., C)`` clamped to [-1, 1] and a one-hot target
mask of the same (broadcastable) shape, and return the target-adjusted cosines; the caller
multiplies by the scale s. Non-target classes are left unchanged.

* ``cosface`` (additive cosine margin, used by OPQN's paper): ``cos θ - m``.
* ``arcface`` (additive angular margin): ``cos(θ + m)`` while ``θ + m <= π``. Beyond that
  (``θ > π - m``, i.e. ``cos θ < cos(π - m)``) cos(θ + m) would rise again and reward a
  worse angle, so the usual insightface fallback ``cos θ - m·sin(π - m)`` (= ``cos θ -
  m·sin m``) takes over: a CosFace-style penalty that keeps the target logit decreasing in
  θ over all of [0, π] (at θ = π - m it steps down by cos m + m·sin m - 1, about 0.12
  for m = 0.5, never up).
  ``m`` is in radians; 0.5 is the common ArcFace value.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

MARGIN_TYPES = ("cosface", "arcface")


def cosface_margin(cos: Tensor, onehot: Tensor, margin: float) -> Tensor:
    """``cos - margin`` at the target class (CosFace / AM-softmax)."""
    return cos - margin * onehot


def arcface_margin(cos: Tensor, onehot: Tensor, margin: float) -> Tensor:
    """``cos(θ + margin)`` at the target class, with the fallback ``cos θ - margin·sin m``
    where ``θ > π - margin`` (see the module docstring)."""
    sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-12))  # θ in [0, π]: sin θ >= 0
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    shifted = cos * cos_m - sin * sin_m  # cos(θ + m)
    threshold = math.cos(math.pi - margin)
    fallback = cos - margin * math.sin(math.pi - margin)
    target = torch.where(cos > threshold, shifted, fallback)
    return torch.where(onehot.bool(), target, cos)


_MARGINS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "cosface": cosface_margin,
    "arcface": arcface_margin,
}


def apply_margin(cos: Tensor, onehot: Tensor, margin: float,
                 margin_type: str = "cosface") -> Tensor:
    """Apply the ``margin_type`` margin at the target class of ``cos`` ``(..., C)``.

    ``onehot`` is a 0/1 mask broadcastable to ``cos``. Returns a tensor of ``cos``'s shape.
    """
    try:
        fn = _MARGINS[margin_type]
    except KeyError:
        raise ValueError(f"unknown margin type {margin_type!r}: choose one of "
                         f"{', '.join(MARGIN_TYPES)}") from None
    return fn(cos, onehot, margin)


def uninformed_cross_entropy(num_classes: int, scale: float = 1.0, margin: float = 0.0,
                             margin_type: str = "cosface") -> float:
    """The cross-entropy of a classifier that knows nothing: every cosine 0, the target's
    with the margin applied, times ``scale``. ``log C`` without a margin; with CosFace
    ``s·m + log(C − 1 + e^(−s·m))``, about 10 nats above ``log C`` at s = 20, m = 0.5.
    The level a "did not train" check must compare a margin loss with."""
    zero = torch.zeros(1)
    target = scale * apply_margin(zero, torch.ones(1), margin, margin_type).item()
    return math.log(math.exp(target) + num_classes - 1) - target

