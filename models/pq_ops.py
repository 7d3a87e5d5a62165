"""Small operations shared by the quantization heads (one place for each)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def split_books(features: Tensor, num_books: int) -> Tensor:
    """``(B, D)`` -> ``(B, M, d)`` sub-vectors, ``d = D / M``."""
    return features.reshape(features.shape[0], num_books, features.shape[1] // num_books)


def intra_normalize(sub: Tensor, eps: float = 1e-12) -> Tensor:
    """L2-normalise every sub-vector of ``(B, M, d)`` (GPQ's intra-normalisation)."""
    return F.normalize(sub, dim=-1, eps=eps)


def soft_vectors(books: Tensor, weights: Tensor) -> Tensor:
    """``sum_k weights[b, m, k] * books[m, :, k]``: ``(M, d, K)``, ``(B, M, K)`` -> ``(B, M, d)``."""
    return torch.einsum("mdk,bmk->bmd", books.to(weights.dtype), weights)


def neg_sq_distance_tables(sub: Tensor, books: Tensor) -> Tensor:
    """ADC tables of ``-||sub_m - c_mk||^2``: ``(Q, M, d)``, ``(M, d, K)`` -> ``(Q, M, K)``.

    Summed over ``m`` at an item's codes this is ``-||s - decode(codes)||^2``.
    """
    books = books.to(sub.dtype)
    cross = torch.einsum("qmd,mdk->qmk", sub, books)
    return -(sub.pow(2).sum(-1, keepdim=True) - 2 * cross + books.pow(2).sum(1).unsqueeze(0))


def decode_codes(books: Tensor, codes: Tensor) -> Tensor:
    """Codes ``(N, M)`` -> concatenated codewords ``(N, M * d)`` of ``books`` ``(M, d, K)``."""
    words = books.permute(0, 2, 1)  # (M, K, d)
    index = codes.long()
    return torch.cat([words[m, index[:, m]] for m in range(books.shape[0])], dim=1)
