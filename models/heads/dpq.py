"""DPQ (Klein & Wolf, CVPR 2019) as the OPQN authors ran it as a baseline (their
``dpq_layer.py``).

Trainable ``V_m`` and codebooks ``C_m``. The codewords are drawn from a standard normal, as
the authors'. ``V_m`` is Xavier uniform by default, and standard normal with ``--dpq-init
normal`` (the authors', who left ``xavier_uniform_`` for it commented out): with
standard-normal ``V_m`` the logits ``x_m V_m`` of the BatchNorm-ed features have sd about
sqrt(d), the softmax starts saturated, and within our budgets DPQ never leaves chance
(docs/methods.md).

Soft assignment
``p_m = softmax(x_m V_m)`` on the un-normalised sub-vector, soft sub-vector ``s_m = C_m p_m``
and hard sub-vector ``h_m`` = the codeword at ``argmax p_m``. The argmax passes no gradient
to ``p_m``: the hard branch's terms train the codewords, the classifier and the centres,
never ``V_m`` or the backbone. Queries are scored by ``-sum_m ||s_m(q) - c_{m,code_m}||^2``
with ``s_m(q)`` from the un-normalised query (l2q's ``raw`` query side).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pq_ops import soft_vectors
from .l2q import L2QHead


class DPQHead(L2QHead):
    """Same parameters as :class:`L2QHead`; differs in initialisation, training outputs and
    query side."""

    method = "dpq"
    faiss_metric = "l2"
    DIAGNOSTICS = ()  # l2q's are about its normalised query side, which DPQ does not have

    def __init__(self, feature_dim: int, num_books: int, num_words: int,
                 assignment_init: str = "xavier") -> None:
        super().__init__(feature_dim, num_books, num_words, word_init="normal",
                         assignment_init=assignment_init, query_side="raw")

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
