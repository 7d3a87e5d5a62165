"""Quantization heads, one module per method, behind a registry keyed by method name."""
from __future__ import annotations

from typing import Callable

from .base import QuantHead, code_dtype
from .dcdh import DCDHHead
from .dpq import DPQHead
from .gpq import GPQHead
from .l2q import L2QHead
from .opqn import OrthoPQ

METHODS = ("opqn", "l2q", "dpq", "gpq", "dcdh")
# Methods whose codewords are orthonormal, hence K <= d.
ORTHONORMAL_METHODS = ("opqn",)
# Binary hashing methods: --len bits, no --num/--words.
HASHING_METHODS = ("dcdh",)


HEADS: dict[str, Callable[..., QuantHead]] = {
    "opqn": lambda c: OrthoPQ(c.feature_dim, c.num_books, c.num_words),
    "l2q": lambda c: L2QHead(c.feature_dim, c.num_books, c.num_words,
                             word_init=getattr(c, "l2q_init", "normal"),
                             query_side=getattr(c, "l2q_query", "raw")),
    "dpq": lambda c: DPQHead(c.feature_dim, c.num_books, c.num_words,
                             assignment_init=getattr(c, "dpq_init", "xavier")),
    "gpq": lambda c: GPQHead(c.feature_dim, c.num_books, c.num_words, alpha=c.gpq_alpha),
    "dcdh": lambda c: DCDHHead(c.feature_dim, c.num_books, c.num_words),
}


def build_head(config) -> QuantHead:
    """The quantization head of ``config.method`` (an :class:`models.OPQNConfig`)."""
    method = getattr(config, "method", "opqn")
    if method not in HEADS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return HEADS[method](config)


__all__ = ["QuantHead", "code_dtype", "METHODS", "ORTHONORMAL_METHODS", "HASHING_METHODS",
           "HEADS", "build_head", "OrthoPQ", "L2QHead", "DPQHead", "GPQHead", "DCDHHead"]
