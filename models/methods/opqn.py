"""OPQN (the paper's method): fixed orthonormal codewords, a trainable soft assignment, and
a subspace-wise margin loss on the original and the soft-quantized sub-vectors with an
entropy term (docs/paper.md, "Method" and "Loss")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.margins import MARGIN_TYPES, apply_margin, uninformed_cross_entropy

from ..codebooks import orthonormal_codebooks
from .base import QuantHead, code_dtype
from .registry import MethodSpec, register


class OPQNHead(QuantHead):
    """Product quantizer with fixed orthonormal codebooks ``C_m`` and trainable ``V_m``.

    ``x`` of shape ``(B, D)`` is split into ``M`` sub-vectors ``x_m`` of dimension
    ``d = D / M``. Each subspace has a trainable matrix ``V_m`` of shape ``(d, K)``:
    ``p_m = softmax(x_m^T V_m)`` is the soft assignment and ``s_m = C_m p_m`` the
    soft-quantized sub-vector. The codebooks are a buffer: they are never trained.

    Attributes:
        codebooks: ``(M, d, K)`` float32 buffer, column ``k`` of book ``m`` is codeword k.
        assignment: ``(M, d, K)`` parameter, the matrices ``V_m``.
    """

    method = "opqn"
    faiss_metric = "ip"  # orthonormal codewords: the ADC score is an inner product

    def __init__(self, feature_dim: int, num_books: int, num_words: int) -> None:
        super().__init__(feature_dim, num_books, num_words)
        self.register_buffer("codebooks",
                             orthonormal_codebooks(num_books, num_words, self.word_dim))
        self.assignment = nn.Parameter(torch.empty(num_books, self.word_dim, num_words))
        for book in self.assignment.data:
            nn.init.xavier_uniform_(book)

    def assignment_logits(self, sub: Tensor) -> Tensor:
        """``(B, M, d)`` sub-vectors -> ``(B, M, K)`` logits ``x_m^T V_m``."""
        return torch.einsum("bmd,mdk->bmk", sub, self.assignment.to(sub.dtype))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Soft quantization for training.

        Args:
            features: ``(B, D)`` backbone output x (not normalised, as in the paper).
        Returns:
            ``(sub, soft, probs)``: sub-vectors x_m ``(B, M, d)``, soft-quantized
            sub-vectors s_m ``(B, M, d)`` and assignment probabilities p_m ``(B, M, K)``.
        """
        sub = self.split(features)
        probs = torch.softmax(self.assignment_logits(sub), dim=-1)
        soft = torch.einsum("mdk,bmk->bmd", self.codebooks.to(probs.dtype), probs)
        return sub, soft, probs

    @torch.no_grad()
    def encode(self, features: Tensor) -> Tensor:
        """Hard codes for the database: ``(B, D)`` -> ``(B, M)`` integer codes.

        ``code_m = argmax_k x_m^T V_m`` (normalising x_m would not change it). The dtype is
        uint8 when K <= 256.
        """
        logits = self.assignment_logits(self.split(features).float())
        return logits.argmax(dim=-1).to(code_dtype(self.num_words))

    @torch.no_grad()
    def query_tables(self, features: Tensor) -> Tensor:
        """Asymmetric query tables: ``(Q, D)`` -> ``(Q, M, K)`` float32 probabilities.

        ``P_m = softmax(q_m_hat^T V_m)`` with the sub-vector L2-normalised first. Training
        applies the softmax to un-normalised sub-vectors; querying normalises them, as the
        authors' code did. The score of a database item is ``sum_m P_m[code_m]``.
        """
        sub = F.normalize(self.split(features).float(), dim=-1)
        return torch.softmax(self.assignment_logits(sub), dim=-1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes ``(N, M)`` -> reconstructed vectors ``(N, D)`` (concatenated codewords)."""
        words = self.codebooks.permute(0, 2, 1)  # (M, K, d)
        index = codes.long()
        parts = [words[m, index[:, m]] for m in range(self.num_books)]
        return torch.cat(parts, dim=1)

    def soft_quantize_tables(self, tables: Tensor) -> Tensor:
        """Query tables ``(Q, M, K)`` -> soft-quantized query vectors ``(Q, D)``.

        Because the codewords are orthonormal, the inner product of this vector with an
        item's decoded codes equals ``sum_m tables[m, code_m]``.
        """
        soft = torch.einsum("mdk,qmk->qmd", self.codebooks.to(tables.dtype), tables)
        return soft.reshape(tables.shape[0], self.feature_dim)

    def faiss_centroids(self) -> Tensor:
        """The codewords ``(M, d, K)``: an inner-product IndexPQ over them scores like ADC."""
        return self.codebooks

    @torch.no_grad()
    def faiss_queries(self, features: Tensor) -> Tensor:
        """Soft-quantized query vectors ``(Q, D)`` (inner products = ADC scores)."""
        return self.soft_quantize_tables(self.query_tables(features))


OrthoPQ = OPQNHead  # its earlier name


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


METHOD = register(MethodSpec(
    name="opqn", title="OPQN", summary="the paper's method (default)",
    build_head=lambda c: OPQNHead(c.feature_dim, c.num_books, c.num_words),
    build_loss=lambda c: OPQNLoss(c.num_classes, c.num_books, c.word_dim, c.margin, c.scale,
                                  c.miu, c.margin_type),
    orthonormal=True,
    # bf16 held OPQN's mAP over 3 seeds on synthface and digits, and on an AMX CPU, where
    # it lost 10 points without precise BN (docs/training.md, "Mixed precision").
    bf16="bf16_with_precise_bn",
))
