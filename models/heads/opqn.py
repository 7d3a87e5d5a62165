"""The OPQN quantization head: fixed orthonormal codewords and trainable soft assignment."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..codebooks import orthonormal_codebooks
from .base import QuantHead, code_bits, code_dtype

__all__ = ["OrthoPQ", "code_bits", "code_dtype"]


class OrthoPQ(QuantHead):
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
