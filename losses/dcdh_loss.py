"""The DCDH loss (Zhang, Zhe, Chen & Yan, Pattern Recognition 2021).

``L = dual class-wise loss + w_c * centre separation + eta * quantization``:

* dual class-wise: ``-log( exp(-sigma/2 ||h - c_y||^2) / sum_j exp(-sigma/2 ||h - c_j||^2) )``
  with learnable centres ``c_j`` (batch mean);
* centre separation: mean over pairs ``i != j`` of ``softplus(L/2 * cos(c_i, c_j))``;
* quantization: ``||h - B||^2 / batch`` with ``B = sign(Y W + eta h)`` and
  ``W = pinv(Y^T Y) Y^T sign(h)`` from the batch's one-hot labels ``Y`` (no gradient through B),
  computed as per-class batch means of ``sign(h)`` since ``Y^T Y`` is diagonal.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
