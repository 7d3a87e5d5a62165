"""The GPQ loss (Jang & Cho, CVPR 2020), supervised form.

``L = N-pair PQ loss + lambda_2 * CE (+ lambda_1 * subspace minimax entropy, optional)``.

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.pq_ops import intra_normalize

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
