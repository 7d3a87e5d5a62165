"""OPQN-l2q, the paper's ablation: OPQN with learned codewords.

Training is OPQN's exactly (same soft assignment, same loss, ``V_m`` Xavier as OPQN's). The
codewords start from a standard normal (``--l2q-init normal``, as the OPQN authors' own
learned-codeword layer) or Xavier uniform (``--l2q-init xavier``). They are no longer
orthonormal, so a query is scored by distance: ``-sum_m ||s_m - c_{m,code_m}||^2`` with
``s_m = C_m P_m`` and ``P_m`` from the normalised query, as in the authors' evaluator for
codewords without orthogonality.

Which sub-vector gives a query's ``P_m`` (``query_side``, flag ``--l2q-query``):

* ``raw`` (default): the query's sub-vector as it is, as training computes every ``P_m``.
  The softmax then sees the same scale in training and in search.
* ``normalized``: the L2-normalised sub-vector, as the authors' evaluator
  (``PqDistRet_Ortho_euclidean``). Training sees sub-vectors of norm about sqrt(d), so
  this softmax is sqrt(d) times flatter; with a short budget ``s_m`` stays near the mean
  codeword and every query ranks the gallery by the codeword norms (docs/methods.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pq_ops import decode_codes, neg_sq_distance_tables, soft_vectors
from .base import BOOK_INITS, QuantHead, code_dtype, init_books
from .opqn import OPQNLoss
from .registry import MethodSpec, param, register

QUERY_SIDES = ("raw", "normalized")


class L2QHead(QuantHead):
    """Trainable codebooks ``C`` and assignment matrices ``V``, both ``(M, d, K)``.

    Unlike OPQN, ``K > d`` is allowed (the codewords need not be orthonormal).
    """

    method = "l2q"
    faiss_metric = "l2"
    # Why the query side can be flat: the mean of max_k P_m over books and batch, with P_m
    # as a query gets it (query_side), and the spread of the codeword norms (sd / mean),
    # which the distance score ranks by when P_m is flat.
    DIAGNOSTICS = ("maxP_q", "norm_cv")

    def __init__(self, feature_dim: int, num_books: int, num_words: int,
                 word_init: str = "normal", assignment_init: str = "xavier",
                 query_side: str = "raw") -> None:
        super().__init__(feature_dim, num_books, num_words)
        if query_side not in QUERY_SIDES:
            raise ValueError(f"unknown query side {query_side!r}: choose "
                             f"{' or '.join(QUERY_SIDES)}")
        self.query_side = query_side
        self.codebooks = nn.Parameter(torch.empty(num_books, self.word_dim, num_words))
        self.assignment = nn.Parameter(torch.empty(num_books, self.word_dim, num_words))
        init_books(self.codebooks, word_init)
        init_books(self.assignment, assignment_init)

    def assignment_logits(self, sub: Tensor) -> Tensor:
        """``(B, M, d)`` -> ``(B, M, K)`` logits ``x_m^T V_m``."""
        return torch.einsum("bmd,mdk->bmk", sub, self.assignment.to(sub.dtype))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(sub, soft, probs)`` as :class:`models.methods.opqn.OPQNHead` (for the OPQN loss)."""
        sub = self.split(features)
        probs = torch.softmax(self.assignment_logits(sub), dim=-1)
        return sub, soft_vectors(self.codebooks, probs), probs

    @torch.no_grad()
    def query_probs(self, features: Tensor) -> Tensor:
        """``(Q, D)`` -> ``(Q, M, K)`` ``P_m = softmax(q_m^T V_m)``, with ``q_m`` the raw or
        the normalised sub-vector (:attr:`query_side`)."""
        sub = self.split(features).float()
        if self.query_side == "normalized":
            sub = F.normalize(sub, dim=-1)
        return torch.softmax(self.assignment_logits(sub), dim=-1)

    @torch.no_grad()
    def diagnostics(self, features: Tensor) -> dict[str, Tensor]:
        norms = self.codebooks.detach().float().norm(dim=1)  # (M, K)
        return {"maxP_q": self.query_probs(features).max(-1).values.mean(),
                "norm_cv": norms.std() / norms.mean()}

    @torch.no_grad()
    def encode(self, features: Tensor) -> Tensor:
        """``(N, D)`` -> ``(N, M)`` codes ``argmax_k x_m^T V_m``."""
        logits = self.assignment_logits(self.split(features).float())
        return logits.argmax(dim=-1).to(code_dtype(self.num_words))

    @torch.no_grad()
    def soft_queries(self, features: Tensor) -> Tensor:
        """``s_m = C_m P_m`` with ``P_m`` from :meth:`query_probs`: ``(Q, M, d)``."""
        return soft_vectors(self.codebooks.float(), self.query_probs(features))

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


@dataclass(frozen=True)
class L2QParams:
    l2q_init: str = param("normal", "initialisation of the learned codewords: normal "
                          "(standard normal, as the OPQN authors' learned-codeword layer) or "
                          "xavier (the project's earlier form); V_m is Xavier as OPQN's",
                          BOOK_INITS)
    l2q_query: str = param("raw", "the query sub-vector that gives P_m: raw (as training "
                           "computes P_m) or normalized (the authors' evaluator, "
                           "PqDistRet_Ortho_euclidean; flat after short training)", QUERY_SIDES)


METHOD = register(MethodSpec(
    name="l2q", title="OPQN-l2q", summary="OPQN with learned codewords (the paper's ablation)",
    build_head=lambda c: L2QHead(c.feature_dim, c.num_books, c.num_words,
                                 word_init=c.params.l2q_init, query_side=c.params.l2q_query),
    # OPQN's loss itself, so l2q inherits every change to it, the margin type included.
    build_loss=lambda c: OPQNLoss(c.num_classes, c.num_books, c.word_dim, c.margin, c.scale,
                                  c.miu, c.margin_type),
    params=L2QParams,
    # Checkpoints written before --l2q-query existed were scored with the normalised query.
    legacy_defaults={"l2q_query": "normalized"},
))
