"""GPQ (Jang & Cho, CVPR 2020), supervised form.

Features and codewords are intra-normalised (every sub-vector has unit norm). The soft
assignment is ``softmax(-alpha (1 - cos(x_m, z_mk)))`` and the soft descriptor
``sum_k a_k z_mk``, intra-normalised. Codes: the codeword of highest cosine per subspace.
Query score: ``sum_m cos(q_m, z_{m,code_m})``, an inner product of intra-normalised vectors.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..pq_ops import intra_normalize, soft_vectors
from .base import QuantHead, code_dtype


class GPQHead(QuantHead):
    """Trainable codewords ``Z`` ``(M, d, K)``, used intra-normalised."""

    method = "gpq"
    faiss_metric = "ip"

    def __init__(self, feature_dim: int, num_books: int, num_words: int,
                 alpha: float = 20.0) -> None:
        super().__init__(feature_dim, num_books, num_words)
        self.alpha = alpha
        # Xavier uniform over the whole (K, D) codeword matrix, as the authors' TensorFlow
        # variable Z (bound sqrt(6 / (K + D))); only the directions matter in the forward.
        bound = (6.0 / (num_words + feature_dim)) ** 0.5
        self.codewords = nn.Parameter(
            torch.empty(num_books, self.word_dim, num_words).uniform_(-bound, bound))

    def normalized_codewords(self) -> Tensor:
        """``(M, d, K)`` codewords, each of unit norm."""
        return nn.functional.normalize(self.codewords, dim=1)

    def cosines(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, D)`` -> intra-normalised sub-vectors ``(B, M, d)`` and cosines ``(B, M, K)``."""
        sub = intra_normalize(self.split(features))
        words = self.normalized_codewords().to(sub.dtype)
        return sub, torch.einsum("bmd,mdk->bmk", sub, words)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, D)`` -> ``(feature, descriptor)``: both intra-normalised ``(B, D)``."""
        sub, cos = self.cosines(features)
        weights = torch.softmax(-self.alpha * (1.0 - cos), dim=-1)
        desc = intra_normalize(soft_vectors(self.normalized_codewords(), weights))
        return sub.flatten(1), desc.flatten(1)

    @torch.no_grad()
    def encode(self, features: Tensor) -> Tensor:
        return self.cosines(features.float())[1].argmax(dim=-1).to(code_dtype(self.num_words))

    @torch.no_grad()
    def query_tables(self, features: Tensor) -> Tensor:
        """``(Q, D)`` -> ``(Q, M, K)`` cosines of each query sub-vector to each codeword."""
        return self.cosines(features.float())[1]

    def faiss_centroids(self) -> Tensor:
        return self.normalized_codewords().detach()

    @torch.no_grad()
    def faiss_queries(self, features: Tensor) -> Tensor:
        return intra_normalize(self.split(features.float())).flatten(1)
