"""OPQN-l2q, the paper's ablation: OPQN with learned (Xavier-initialised) codewords.

Training is OPQN's exactly (same soft assignment, same loss). The codewords are no longer
orthonormal, so a query is scored by distance: ``-sum_m ||s_m - c_{m,code_m}||^2`` with
``s_m = C_m P_m`` and ``P_m`` from the normalised query, as for OPQN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pq_ops import decode_codes, neg_sq_distance_tables, soft_vectors
from .base import QuantHead, code_dtype


class L2QHead(QuantHead):
    """Trainable codebooks ``C`` and assignment matrices ``V``, both ``(M, d, K)``.

    Unlike OPQN, ``K > d`` is allowed (the codewords need not be orthonormal).
    """

    method = "l2q"
    faiss_metric = "l2"

    def __init__(self, feature_dim: int, num_books: int, num_words: int) -> None:
        super().__init__(feature_dim, num_books, num_words)
        self.codebooks = nn.Parameter(torch.empty(num_books, self.word_dim, num_words))
        self.assignment = nn.Parameter(torch.empty(num_books, self.word_dim, num_words))
        for book in (*self.codebooks.data, *self.assignment.data):
            nn.init.xavier_uniform_(book)

    def assignment_logits(self, sub: Tensor) -> Tensor:
        """``(B, M, d)`` -> ``(B, M, K)`` logits ``x_m^T V_m``."""
        return torch.einsum("bmd,mdk->bmk", sub, self.assignment.to(sub.dtype))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(sub, soft, probs)`` as :class:`models.quantizer.OrthoPQ` (for the OPQN loss)."""
        sub = self.split(features)
        probs = torch.softmax(self.assignment_logits(sub), dim=-1)
        return sub, soft_vectors(self.codebooks, probs), probs

    @torch.no_grad()
    def encode(self, features: Tensor) -> Tensor:
        """``(N, D)`` -> ``(N, M)`` codes ``argmax_k x_m^T V_m``."""
        logits = self.assignment_logits(self.split(features).float())
        return logits.argmax(dim=-1).to(code_dtype(self.num_words))

    @torch.no_grad()
    def soft_queries(self, features: Tensor) -> Tensor:
        """``s_m = C_m P_m`` with ``P_m`` from the L2-normalised query: ``(Q, M, d)``."""
        sub = F.normalize(self.split(features).float(), dim=-1)
        return soft_vectors(self.codebooks.float(),
                            torch.softmax(self.assignment_logits(sub), dim=-1))

    @torch.no_grad()
    def query_tables(self, features: Tensor) -> Tensor:
        """``(Q, D)`` -> ``(Q, M, K)`` tables ``-||s_m - c_mk||^2``."""
        return neg_sq_distance_tables(self.soft_queries(features), self.codebooks.float())

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return decode_codes(self.codebooks.float(), codes)

    def faiss_centroids(self) -> Tensor:
        return self.codebooks.detach()

    @torch.no_grad()
    def faiss_queries(self, features: Tensor) -> Tensor:
        return self.soft_queries(features).flatten(1)
