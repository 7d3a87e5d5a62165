"""The losses, one module per method, behind :func:`build_loss` keyed by method name, and
the target-class margins (CosFace, ArcFace) that OPQN's loss applies.

Every loss is called as ``criterion(*head(features), labels) -> (loss, parts)``, where
``parts`` is a dict of detached scalars whose keys are fixed per loss.
"""
from .dcdh_loss import DCDHLoss
from .dpq_loss import DPQLoss
from .gpq_loss import GPQLoss
from .margins import (MARGIN_TYPES, apply_margin, arcface_margin, cosface_margin,
                      uninformed_cross_entropy)
from .opqn_loss import OPQNLoss, assignment_entropy, margin_cosine_logits


def build_loss(config):
    """The loss of ``config.method`` (an :class:`models.OPQNConfig`).

    ``l2q`` uses OPQN's loss itself (same module), so it inherits every change to it,
    the margin type included.
    """
    method = getattr(config, "method", "opqn")
    if method in ("opqn", "l2q"):
        return OPQNLoss(config.num_classes, config.num_books, config.word_dim, config.margin,
                        config.scale, config.miu, getattr(config, "margin_type", "cosface"))
    if method == "dpq":
        return DPQLoss(config.num_classes, config.feature_dim, config.dpq_alpha,
                       config.dpq_gini_diversity, config.dpq_gini_sharpness)
    if method == "gpq":
        return GPQLoss(config.num_classes, config.num_books, config.feature_dim,
                       config.gpq_beta, config.gpq_lambda_ce, config.gpq_lambda_entropy)
    if method == "dcdh":
        return DCDHLoss(config.num_classes, config.feature_dim, config.dcdh_sigma,
                        config.dcdh_eta, config.dcdh_center_weight)
    raise ValueError(f"unknown method {method!r}")


def chance_levels(config) -> dict[str, float]:
    """``{part: value}`` of the loss parts of ``config.method`` that are cross-entropies
    over the identities, each at the value a model that knows nothing gets (log C, or far
    above it under a margin): what a "did not train" check compares with."""
    return build_loss(config).chance_levels()


__all__ = ["OPQNLoss", "DPQLoss", "GPQLoss", "DCDHLoss", "build_loss", "chance_levels",
           "uninformed_cross_entropy", "assignment_entropy",
           "margin_cosine_logits", "MARGIN_TYPES", "apply_margin", "arcface_margin",
           "cosface_margin"]
