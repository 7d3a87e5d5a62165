"""DCDH (Zhang, Zhe, Chen & Yan, Pattern Recognition 2021): binary hashing of L bits.

The backbone outputs L real values ``h``; the code is ``sign(h)``. Ranking is by Hamming
distance. The ADC engine serves it as L books of 2 words: a query's table holds 1 at the
word equal to its own bit and 0 at the other, so the score is ``L - Hamming``.

The loss: ``L = dual class-wise loss + w_c * centre separation + eta * quantization``:

* dual class-wise: ``-log( exp(-sigma/2 ||h - c_y||^2) / sum_j exp(-sigma/2 ||h - c_j||^2) )``
  with learnable centres ``c_j`` (batch mean);
* centre separation: mean over pairs ``i != j`` of ``softplus(L/2 * cos(c_i, c_j))``;
* quantization: ``||h - B||^2 / batch`` with ``B = sign(Y W + eta h)`` and
  ``W = pinv(Y^T Y) Y^T sign(h)`` from the batch's one-hot labels ``Y`` (no gradient through B),
  computed as per-class batch means of ``sign(h)`` since ``Y^T Y`` is diagonal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import QuantHead
from .registry import AdamForm, MethodSpec, param, register


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


def sign_pm(x: Tensor) -> Tensor:
    """``sign`` with values in {-1, +1} (0 maps to +1, as the codes do)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def discrete_targets(h: Tensor, labels: Tensor, num_classes: int, eta: float) -> Tensor:
    """``B = sign(Y W + eta h)``, ``W = pinv(Y^T Y) Y^T sign(h)``: ``(B, L)`` in {-1, +1}.

    ``Y^T Y`` is diagonal (the per-class counts in the batch), so ``W`` holds each present
    class's batch mean of ``sign(h)`` (zero rows for absent classes, which ``Y W`` never
    reads) and ``Y W`` gives each sample its class's mean. Computed over the classes
    present in the batch only: O(B L) memory, no ``C x C`` or ``B x C`` matrix, so it
    scales to any ``num_classes`` (kept in the signature; the labels are checked against
    it by the class loss's cross-entropy).
    """
    signs = sign_pm(h)
    present, inverse = torch.unique(labels, return_inverse=True)
    sums = signs.new_zeros(present.shape[0], h.shape[1]).index_add_(0, inverse, signs)
    counts = torch.bincount(inverse, minlength=present.shape[0]).to(h.dtype)
    # Sums of +-1 and the counts are exact integers: the mean is the exact quotient.
    means = sums / counts[:, None]
    return sign_pm(means[inverse] + eta * h)


class DCDHLoss(nn.Module):
    """Holds the class centres ``(classes, L)``."""

    PARTS = ("class", "center", "quant")  # keys of the parts dict returned by forward

    def __init__(self, num_classes: int, bits: int, sigma: float = 0.25, eta: float = 0.01,
                 center_weight: float = 0.1) -> None:
        super().__init__()
        self.num_classes, self.bits = num_classes, bits
        self.sigma, self.eta, self.center_weight = sigma, eta, center_weight
        # Standard normal, as the DCDH authors' centres (torch.randn).
        self.centers = nn.Parameter(torch.randn(num_classes, bits))

    def chance_levels(self) -> dict[str, float]:
        """The identity cross-entropy part and its value for a model that knows nothing
        (log C: every centre at the same distance)."""
        return {"class": math.log(self.num_classes)}

    def forward(self, h: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """
        Args:
            h: ``(B, L)`` real-valued hash layer; labels: ``(B,)`` int64.
        Returns:
            The scalar loss and its parts ``{"class", "center", "quant"}``.
        """
        h = h.float()
        logits = -0.5 * self.sigma * torch.cdist(h, self.centers).pow(2)
        class_loss = F.cross_entropy(logits, labels)
        c = F.normalize(self.centers, dim=1)
        cos = c @ c.T
        off = ~torch.eye(self.num_classes, dtype=torch.bool, device=h.device)
        center = F.softplus(0.5 * self.bits * cos[off]).mean() if self.num_classes > 1 \
            else torch.zeros((), device=h.device)
        with torch.no_grad():
            target = discrete_targets(h, labels, self.num_classes, self.eta)
        quant = (h - target).pow(2).sum() / h.shape[0]
        loss = class_loss + self.center_weight * center + self.eta * quant
        return loss, {"class": class_loss.detach(), "center": center.detach(),
                      "quant": quant.detach()}


@dataclass(frozen=True)
class DCDHParams:
    dcdh_sigma: float = param(0.25, "Gaussian similarity width sigma (0.25)")
    dcdh_eta: float = param(0.01, "quantization weight eta (0.01)")
    dcdh_center_weight: float = param(0.1, "weight of the centre separation term (0.1)")


METHOD = register(MethodSpec(
    name="dcdh", title="DCDH",
    summary="Zhang et al., PR 2021, binary hashing: --len bits, no --num/--words",
    build_head=lambda c: DCDHHead(c.feature_dim, c.num_books, c.num_words),
    build_loss=lambda c: DCDHLoss(c.num_classes, c.feature_dim, c.params.dcdh_sigma,
                                  c.params.dcdh_eta, c.params.dcdh_center_weight),
    params=DCDHParams, hashing=True,
    # Its authors: Adam with amsgrad, lr 0.005, weight decay 1e-4, on the 32x32 sets (we use
    # amsgrad for the centres too); SGD on the 112x112 protocols.
    optimizer="adam", optimizer_112="sgd", sgd_lr=0.01,
    adam=AdamForm(lr=0.005, weight_decay=1e-4, amsgrad=True),
    bf16="bf16",  # bf16 cost it nothing on an AMX CPU (docs/training.md)
))
