"""What the methods' losses share: the target-class margins (CosFace, ArcFace) and the
cross-entropy of a classifier that knows nothing.

Each method's own loss lives in its method module, beside its head
(``models/methods/<method>.py``), and :func:`models.methods.build_loss` builds it by name.
Every loss is called as ``criterion(*head(features), labels) -> (loss, parts)``, where
``parts`` is a dict of detached scalars whose keys are fixed per loss.
"""
from .margins import (MARGIN_TYPES, apply_margin, arcface_margin, cosface_margin,
                      uninformed_cross_entropy)

__all__ = ["uninformed_cross_entropy", "MARGIN_TYPES", "apply_margin", "arcface_margin",
           "cosface_margin"]
