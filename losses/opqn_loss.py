"""The OPQN loss: subspace-wise additive-margin cosine loss on original and soft-quantized
sub-vectors, plus entropy minimisation of the soft assignment (docs/paper.md, "Loss")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .margins import MARGIN_TYPES, apply_margin, uninformed_cross_entropy


def margin_cosine_logits(sub: Tensor, class_weights: Tensor, labels: Tensor, margin: float,
                         scale: float, margin_type: str = "cosface") -> Tensor:
    """Scaled margin cosine logits, per subspace (the margin is one of losses.margins).

    Args:
        sub: ``(B, M, d)`` sub-vectors.
        class_weights: ``(M, C, d)`` class weights W_m.
        labels: ``(B,)`` int64 targets.
    Returns:
        ``(B, M, C)`` logits ``scale * margin(cos)``, cosines clamped to [-1, 1]; for the
        paper's ``cosface`` that is ``scale * (cos - margin * onehot)``.
    """
    cos = torch.einsum("bmd,mcd->bmc", F.normalize(sub, dim=-1),
                       F.normalize(class_weights, dim=-1)).clamp(-1.0, 1.0)
    onehot = F.one_hot(labels, cos.shape[-1]).to(cos.dtype).unsqueeze(1)
    return scale * apply_margin(cos, onehot, margin, margin_type)


def assignment_entropy(probs: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean entropy of ``(B, M, K)`` probabilities over batch and books (a scalar)."""
    return -(probs * torch.log(probs.clamp_min(eps))).sum(-1).mean()


class OPQNLoss(nn.Module):
    """``L = 1/2 [mean_m CE(x_m) + mean_m CE(s_m)] + miu * mean H(p_m)``.

    Holds the class weights W_m ``(M, num_classes, d)``, shared by x_m and s_m.

    Args:
        num_classes: number of training identities.
        num_books: M.
        word_dim: d = D / M.
        margin: margin at the target class (0.5): a cosine for ``cosface``, radians for
            ``arcface``.
        scale: logit scale s (20 for 32x32 inputs, 40 for 112x112).
        miu: entropy weight mu (0.1).
        margin_type: ``cosface`` (the paper's additive cosine margin) or ``arcface``
            (additive angular margin), applied to x_m and s_m alike.
    """

    PARTS = ("ce_x", "ce_s", "entropy")  # keys of the parts dict returned by forward

    def __init__(self, num_classes: int, num_books: int, word_dim: int, margin: float = 0.5,
                 scale: float = 20.0, miu: float = 0.1, margin_type: str = "cosface") -> None:
        super().__init__()
        if margin_type not in MARGIN_TYPES:
            raise ValueError(f"unknown margin type {margin_type!r}: choose one of "
                             f"{', '.join(MARGIN_TYPES)}")
        self.num_classes, self.num_books, self.word_dim = num_classes, num_books, word_dim
        self.margin, self.scale, self.miu = margin, scale, miu
        self.margin_type = margin_type
        self.class_weights = nn.Parameter(torch.empty(num_books, num_classes, word_dim))
        for book in self.class_weights.data:
            nn.init.xavier_uniform_(book)

    def chance_levels(self) -> dict[str, float]:
        """The identity cross-entropy parts and their value for a model that knows nothing
        (every cosine 0; the margin makes it far above log C)."""
        level = uninformed_cross_entropy(self.num_classes, self.scale, self.margin,
                                         self.margin_type)
        return {"ce_x": level, "ce_s": level}

    def _book_ce(self, sub: Tensor, labels: Tensor) -> Tensor:
        logits = margin_cosine_logits(sub, self.class_weights, labels, self.margin, self.scale,
                                      self.margin_type)
        # CE per book, averaged over the batch, then over the books.
        return F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(self.num_books))

    def forward(self, sub: Tensor, soft: Tensor, probs: Tensor,
                labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """
        Args:
            sub: ``(B, M, d)`` original sub-vectors x_m.
            soft: ``(B, M, d)`` soft-quantized sub-vectors s_m.
            probs: ``(B, M, K)`` soft assignments p_m.
            labels: ``(B,)`` int64 identity labels.
        Returns:
            The scalar loss and its detached parts ``{"ce_x", "ce_s", "entropy"}``.
        """
        sub, soft, probs = sub.float(), soft.float(), probs.float()
        ce_x = self._book_ce(sub, labels)
        ce_s = self._book_ce(soft, labels)
        entropy = assignment_entropy(probs)
        loss = 0.5 * (ce_x + ce_s) + self.miu * entropy
        parts = {"ce_x": ce_x.detach(), "ce_s": ce_s.detach(), "entropy": entropy.detach()}
        return loss, parts
