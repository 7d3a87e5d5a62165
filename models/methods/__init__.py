"""The methods: OPQN and the methods the paper compares it with, one module each, behind a
registry keyed by method name (:mod:`models.methods.registry`).

Each module holds a method's head, its loss, its hyper-parameters and its training
defaults, and registers itself when imported below. To add a method, write its module the
same way and add it to the import line.
"""
from __future__ import annotations

from torch import nn

from . import opqn, l2q, dpq, gpq, dcdh  # noqa: F401,E401 (each registers itself; opqn first)
from .base import QuantHead, code_bits, code_dtype
from .dcdh import DCDHHead, DCDHLoss
from .dpq import DPQHead, DPQLoss
from .gpq import GPQHead, GPQLoss
from .l2q import L2QHead
from .opqn import OPQNHead, OPQNLoss, OrthoPQ, assignment_entropy, margin_cosine_logits
from .registry import (DEFAULT_METHOD, AdamForm, MethodSpec, get_method, hashing_methods,
                       method_names, orthonormal_methods, param, register, unregister)


def build_head(config) -> QuantHead:
    """The quantization head of ``config.method`` (an :class:`models.NetConfig`)."""
    return get_method(config.method).build_head(config)


def build_loss(config) -> nn.Module:
    """The loss of ``config.method``, called as ``loss(*head(features), labels)``."""
    return get_method(config.method).build_loss(config)


def chance_levels(config) -> dict[str, float]:
    """``{part: value}`` of the loss parts of ``config.method`` that are cross-entropies
    over the identities, each at the value a model that knows nothing gets (log C, or far
    above it under a margin): what a "did not train" check compares with."""
    return build_loss(config).chance_levels()


__all__ = ["DEFAULT_METHOD", "AdamForm", "MethodSpec", "QuantHead", "build_head", "build_loss",
           "chance_levels", "code_bits", "code_dtype", "get_method", "hashing_methods",
           "method_names", "orthonormal_methods", "param", "register", "unregister",
           "OPQNHead", "OrthoPQ", "OPQNLoss", "L2QHead", "DPQHead", "DPQLoss", "GPQHead",
           "GPQLoss", "DCDHHead", "DCDHLoss", "assignment_entropy", "margin_cosine_logits"]
