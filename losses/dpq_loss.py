"""The DPQ loss (Klein & Wolf, CVPR 2019), as the OPQN authors ran DPQ as a baseline.

``L = CE(W s) + CE(W h) + alpha * (1/B) sum_b (1/2 ||s_b - c_y||^2 + 1/2 ||h_b - c_y||^2)``:
one linear classifier ``W`` over the concatenated D-vector (no margin) for the soft and the
hard vector, and a joint centre loss with learnable class centres ``c_y``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DPQLoss(nn.Module):
    """Holds the classifier ``W`` (Linear D -> classes) and the centres ``(classes, D)``."""

    PARTS = ("ce_soft", "ce_hard", "center")  # keys of the parts dict returned by forward

    def __init__(self, num_classes: int, feature_dim: int, alpha: float = 0.25) -> None:
        super().__init__()
        self.alpha = alpha
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.centers = nn.Parameter(torch.empty(num_classes, feature_dim))
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        nn.init.xavier_uniform_(self.centers)

    def forward(self, soft: Tensor, hard: Tensor,
                labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """
        Args:
            soft: ``(B, D)`` soft-quantized vectors; hard: ``(B, D)`` hard (straight-through).
            labels: ``(B,)`` int64.
        Returns:
            The scalar loss and its detached parts ``{"ce_soft", "ce_hard", "center"}``.
        """
        soft, hard = soft.float(), hard.float()
        ce_soft = F.cross_entropy(self.classifier(soft), labels)
        ce_hard = F.cross_entropy(self.classifier(hard), labels)
        centers = self.centers[labels]
        center = 0.5 * ((soft - centers).pow(2).sum() + (hard - centers).pow(2).sum()) \
            / labels.shape[0]
        loss = ce_soft + ce_hard + self.alpha * center
        return loss, {"ce_soft": ce_soft.detach(), "ce_hard": ce_hard.detach(),
                      "center": center.detach()}
