"""DCDH (Zhang, Zhe, Chen & Yan, Pattern Recognition 2021): binary hashing of L bits.

The backbone outputs L real values ``h``; the code is ``sign(h)``. Ranking is by Hamming
distance. The ADC engine serves it as L books of 2 words: a query's table holds 1 at the
word equal to its own bit and 0 at the other, so the score is ``L - Hamming``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import QuantHead


class DCDHHead(QuantHead):
    """No parameters: ``feature_dim`` = L, ``num_books`` = L, ``num_words`` = 2."""

    method = "dcdh"
    faiss_metric = "hamming"

    def __init__(self, feature_dim: int, num_books: int, num_words: int = 2) -> None:
        if num_words != 2 or num_books != feature_dim:
            raise ValueError(f"dcdh needs num_words=2 and num_books=feature_dim=L, got "
                             f"{num_books}x{num_words} with D={feature_dim}")
        super().__init__(feature_dim, num_books, num_words)

    def forward(self, features: Tensor) -> tuple[Tensor]:
        """``(B, L)`` -> ``(h,)``: the real-valued hash layer, for the DCDH loss."""
        return (features,)

    @torch.no_grad()
    def encode(self, features: Tensor) -> Tensor:
        """``(N, L)`` -> ``(N, L)`` uint8 bits: 1 where ``h >= 0`` (sign(0) counts as +1)."""
        return (features >= 0).to(torch.uint8)

    @torch.no_grad()
    def query_tables(self, features: Tensor) -> Tensor:
        """``(Q, L)`` -> ``(Q, L, 2)``: one-hot of the query's own bits (1 = bit matches)."""
        return F.one_hot(self.encode(features).long(), 2).float()

    def faiss_centroids(self) -> Tensor:
        raise NotImplementedError("dcdh codes are binary: use faiss.IndexBinaryFlat")

    @torch.no_grad()
    def faiss_queries(self, features: Tensor) -> Tensor:
        """The query's bits ``(Q, L)`` uint8 (packed by the faiss export)."""
        return self.encode(features)
