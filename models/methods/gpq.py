"""GPQ (Jang & Cho, CVPR 2020), supervised form.

Features and codewords are intra-normalised (every sub-vector has unit norm). The soft
assignment is ``softmax(-alpha (1 - cos(x_m, z_mk)))`` and the soft descriptor
``sum_k a_k z_mk``, intra-normalised. Codes: the codeword of highest cosine per subspace.
Query score: ``sum_m cos(q_m, z_{m,code_m})``, an inner product of intra-normalised vectors.

The loss: ``L = N-pair PQ loss + lambda_2 * CE (+ lambda_1 * subspace minimax entropy, optional)``.

* N-pair PQ loss: logits ``M * x_hat . q_hat^T`` over the batch, where ``x_hat`` and
  ``q_hat`` are the (intra-normalised) feature and soft descriptor scaled to unit norm;
  targets are the rows of the label-similarity matrix, normalised to sum 1; plus
  ``0.002 / 4 * (mean ||x||^2 + mean ||q||^2)``.
* CE: cosine classifier against learnable class prototypes ``P`` (intra-normalised), as in
  the authors' code: ``logits = beta^2 * mean_m cos(x_m, P_m)``, the mean over subspaces
  of ``(beta x_m) . (beta P_m)``, so the largest logit is ``beta^2`` (16).
* The entropy term (for unlabelled data; off by default) applies gradient reversal to the
  features and takes the negative entropy of the prototype softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pq_ops import intra_normalize, soft_vectors
from .base import QuantHead, code_dtype
from .registry import AdamForm, MethodSpec, param, register


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

L2_REG = 0.002


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad


class GPQLoss(nn.Module):
    """Holds the class prototypes ``(classes, D)``."""

    PARTS = ("npair", "ce", "entropy")  # keys of the parts dict returned by forward

    def __init__(self, num_classes: int, num_books: int, feature_dim: int, beta: float = 4.0,
                 lambda_ce: float = 0.1, lambda_entropy: float = 0.0) -> None:
        super().__init__()
        self.num_books, self.beta = num_books, beta
        self.lambda_ce, self.lambda_entropy = lambda_ce, lambda_entropy
        self.prototypes = nn.Parameter(torch.empty(num_classes, feature_dim))
        nn.init.xavier_uniform_(self.prototypes)

    def chance_levels(self) -> dict[str, float]:
        """The identity cross-entropy part and its value for a model that knows nothing
        (log C; the N-pair term is a cross-entropy over the batch, not the identities)."""
        return {"ce": math.log(self.prototypes.shape[0])}

    def _prototypes(self) -> Tensor:
        p = self.prototypes
        return intra_normalize(p.reshape(p.shape[0], self.num_books, -1)).flatten(1)

    def class_logits(self, feature: Tensor) -> Tensor:
        """``(B, D)`` intra-normalised features -> ``(B, classes)`` logits
        ``beta^2 * mean_m cos(x_m, P_m)``: the D-vector product of intra-normalised vectors
        is the sum of the M cosines, hence the division by M."""
        return (self.beta * feature) @ (self.beta * self._prototypes()).T / self.num_books

    def forward(self, feature: Tensor, descriptor: Tensor,
                labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """
        Args:
            feature: ``(B, D)`` intra-normalised features; descriptor: ``(B, D)``
                intra-normalised soft descriptors; labels: ``(B,)`` int64.
        Returns:
            The scalar loss and its parts ``{"npair", "ce", "entropy"}``.
        """
        feature, descriptor = feature.float(), descriptor.float()
        reg = L2_REG / 4 * (feature.pow(2).sum(1).mean() + descriptor.pow(2).sum(1).mean())
        logits = self.num_books * F.normalize(feature, dim=1) @ F.normalize(descriptor, dim=1).T
        same = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()
        targets = same / same.sum(1, keepdim=True)
        npair = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean() + reg
        ce = F.cross_entropy(self.class_logits(feature), labels)
        loss = npair + self.lambda_ce * ce
        entropy = torch.zeros((), device=feature.device)
        if self.lambda_entropy > 0:
            probs = torch.softmax(self.class_logits(_ReverseGrad.apply(feature)), dim=1)
            entropy = (probs * torch.log(probs + 1e-5)).sum(1).mean()
            loss = loss + self.lambda_entropy * entropy
        return loss, {"npair": npair.detach(), "ce": ce.detach(), "entropy": entropy.detach()}


@dataclass(frozen=True)
class GPQParams:
    gpq_alpha: float = param(20.0, "soft-assignment temperature alpha (20)")
    gpq_beta: float = param(4.0, "cosine-classifier scale beta (4)")
    gpq_lambda_ce: float = param(0.1, "weight lambda_2 of the classification loss (0.1)")
    gpq_lambda_entropy: float = param(0.0, "weight lambda_1 of the subspace minimax entropy "
                                      "(0 = off; the paper's 0.1 is for unlabelled data)")


METHOD = register(MethodSpec(
    name="gpq", title="GPQ", summary="Jang & Cho, CVPR 2020, supervised",
    build_head=lambda c: GPQHead(c.feature_dim, c.num_books, c.num_words,
                                 alpha=c.params.gpq_alpha),
    build_loss=lambda c: GPQLoss(c.num_classes, c.num_books, c.feature_dim, c.params.gpq_beta,
                                 c.params.gpq_lambda_ce, c.params.gpq_lambda_entropy),
    params=GPQParams,
    # The GPQ authors' train.py: Adam, lr 2e-4, beta1 0.5, no weight decay.
    optimizer="adam", adam=AdamForm(lr=2e-4, weight_decay=0.0, betas=(0.5, 0.999)),
    bf16="bf16",  # bf16 cost it nothing on an AMX CPU (docs/training.md)
))
