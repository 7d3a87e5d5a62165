"""The DPQ loss (Klein & Wolf, CVPR 2019), as the OPQN authors ran DPQ as a baseline
(``dpq_layer.py`` and the training loop of ``dpq.py``).

``L = CE(W s) + CE(W h) + alpha * (1/B) sum_b (1/2 ||s_b - c_y||^2 + 1/2 ||h_b - c_y||^2)
+ beta_1 * gini_diversity + beta_2 * gini_sharpness``:

* one linear classifier ``W`` without bias over the concatenated D-vector (no margin), for
  the soft and the hard vector, and a joint centre loss with learnable class centres ``c_y``;
* ``gini_diversity = sum_m sum_k (mean_b p_mbk)^2``: small when the batch spreads over all
  codewords of each book;
* ``gini_sharpness = -(1/B) sum_{m,b,k} p_mbk^2``: small when each assignment is one-hot
  (summed over the books, not averaged, as the authors did).

Defaults: alpha 0.25, beta_1 1, beta_2 0.01 (the authors').
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gini_terms(probs: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, M, K)`` soft assignments -> ``(gini_diversity, gini_sharpness)`` scalars."""
    diversity = probs.mean(0).pow(2).sum()
    sharpness = -probs.pow(2).sum() / probs.shape[0]
    return diversity, sharpness


class DPQLoss(nn.Module):
    """Holds the classifier ``W`` (Linear D -> classes, no bias) and the centres
    ``(classes, D)``, both Xavier-initialised as in the authors' code."""

    PARTS = ("ce_soft", "ce_hard", "center", "gini_div", "gini_sharp")  # keys of the parts

    def __init__(self, num_classes: int, feature_dim: int, alpha: float = 0.25,
                 gini_diversity: float = 1.0, gini_sharpness: float = 0.01) -> None:
        super().__init__()
        self.alpha = alpha
        self.gini_diversity, self.gini_sharpness = gini_diversity, gini_sharpness
        self.classifier = nn.Linear(feature_dim, num_classes, bias=False)
        self.centers = nn.Parameter(torch.empty(num_classes, feature_dim))
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.xavier_uniform_(self.centers)

    def chance_levels(self) -> dict[str, float]:
        """The identity cross-entropy parts and their value for a model that knows nothing
        (log C; the centre term is no cross-entropy)."""
        chance = math.log(self.classifier.out_features)
        return {"ce_soft": chance, "ce_hard": chance}

    def forward(self, soft: Tensor, hard: Tensor, probs: Tensor,
                labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """
        Args:
            soft: ``(B, D)`` soft-quantized vectors; hard: ``(B, D)`` hard ones.
            probs: ``(B, M, K)`` soft assignments p_m.
            labels: ``(B,)`` int64.
        Returns:
            The scalar loss and its detached parts (:attr:`PARTS`).
        """
        soft, hard, probs = soft.float(), hard.float(), probs.float()
        ce_soft = F.cross_entropy(self.classifier(soft), labels)
        ce_hard = F.cross_entropy(self.classifier(hard), labels)
        centers = self.centers[labels]
        center = 0.5 * ((soft - centers).pow(2).sum() + (hard - centers).pow(2).sum()) \
            / labels.shape[0]
        diversity, sharpness = gini_terms(probs)
        loss = (ce_soft + ce_hard + self.alpha * center + self.gini_diversity * diversity
                + self.gini_sharpness * sharpness)
        return loss, {"ce_soft": ce_soft.detach(), "ce_hard": ce_hard.detach(),
                      "center": center.detach(), "gini_div": diversity.detach(),
                      "gini_sharp": sharpness.detach()}
