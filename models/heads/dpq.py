"""DPQ (Klein & Wolf, CVPR 2019) as the OPQN authors ran it as a baseline.

Trainable ``V_m`` and codebooks ``C_m``; ``p_m = softmax(x_m V_m)`` on the un-normalised
sub-vector, soft sub-vector ``s_m = C_m p_m`` and hard sub-vector ``h_m`` = the codeword at
``argmax p_m`` with a straight-through gradient. Queries are scored by
``-sum_m ||s_m(q) - c_{m,code_m}||^2`` with ``s_m(q)`` from the un-normalised query.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..pq_ops import neg_sq_distance_tables, soft_vectors, straight_through_onehot
from .l2q import L2QHead


class DPQHead(L2QHead):
    """Same parameters as :class:`L2QHead`; differs in training outputs and query side."""

    method = "dpq"
    faiss_metric = "l2"

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, D)`` -> ``(soft, hard)``, both ``(B, D)`` concatenated sub-vectors."""
        probs = torch.softmax(self.assignment_logits(self.split(features)), dim=-1)
        soft = soft_vectors(self.codebooks, probs)
        hard = soft_vectors(self.codebooks, straight_through_onehot(probs))
        return soft.flatten(1), hard.flatten(1)

    @torch.no_grad()
    def soft_queries(self, features: Tensor) -> Tensor:
        """``s_m = C_m p_m`` from the un-normalised query: ``(Q, M, d)``."""
        probs = torch.softmax(self.assignment_logits(self.split(features).float()), dim=-1)
        return soft_vectors(self.codebooks.float(), probs)

    @torch.no_grad()
    def query_tables(self, features: Tensor) -> Tensor:
        return neg_sq_distance_tables(self.soft_queries(features), self.codebooks.float())
