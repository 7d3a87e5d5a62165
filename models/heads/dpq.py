"""DPQ (Klein & Wolf, CVPR 2019) as the OPQN authors ran it as a baseline (their
``dpq_layer.py``).

Trainable ``V_m`` and codebooks ``C_m``, both drawn from a standard normal;
``p_m = softmax(x_m V_m)`` on the un-normalised sub-vector, soft sub-vector ``s_m = C_m p_m``
and hard sub-vector ``h_m`` = the codeword at ``argmax p_m``. The argmax passes no gradient
to ``p_m``: the hard branch's terms train the codewords, the classifier and the centres,
never ``V_m`` or the backbone. Queries are scored by ``-sum_m ||s_m(q) - c_{m,code_m}||^2`` with ``s_m(q)`` from the
un-normalised query.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pq_ops import neg_sq_distance_tables, soft_vectors
from .l2q import L2QHead


class DPQHead(L2QHead):
    """Same parameters as :class:`L2QHead`; differs in initialisation, training outputs and
    query side."""

    method = "dpq"
    faiss_metric = "l2"
    DIAGNOSTICS = ()  # l2q's are about its normalised query side, which DPQ does not have

    def __init__(self, feature_dim: int, num_books: int, num_words: int) -> None:
        super().__init__(feature_dim, num_books, num_words, word_init="normal",
                         assignment_init="normal")

    def diagnostics(self, features: Tensor) -> dict[str, Tensor]:
        return {}

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, D)`` -> ``(soft, hard, probs)``: soft and hard ``(B, D)`` concatenated
        sub-vectors, probs ``(B, M, K)`` (for the Gini terms)."""
        probs = torch.softmax(self.assignment_logits(self.split(features)), dim=-1)
        soft = soft_vectors(self.codebooks, probs)
        # one_hot of an argmax carries no gradient: only the codewords learn from h.
        onehot = F.one_hot(probs.argmax(dim=-1), self.num_words).to(probs.dtype)
        hard = soft_vectors(self.codebooks, onehot)
        return soft.flatten(1), hard.flatten(1), probs

    @torch.no_grad()
    def soft_queries(self, features: Tensor) -> Tensor:
        """``s_m = C_m p_m`` from the un-normalised query: ``(Q, M, d)``."""
        probs = torch.softmax(self.assignment_logits(self.split(features).float()), dim=-1)
        return soft_vectors(self.codebooks.float(), probs)

    @torch.no_grad()
    def query_tables(self, features: Tensor) -> Tensor:
        return neg_sq_distance_tables(self.soft_queries(features), self.codebooks.float())
