"""Fixed orthonormal codebooks built from the DCT-II basis (docs/paper.md, "Model")."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def dct_matrix(size: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal DCT-II matrix ``C`` of shape ``(size, size)``.

    ``C[j, k] = sqrt(2/size) * cos(pi * (j + 1/2) * k / size)``, with column 0 further
    divided by ``sqrt(2)`` so that ``C.T @ C = I``.
    """
    if size < 1:
        raise ValueError(f"DCT size must be positive, got {size}")
    j = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    matrix = math.sqrt(2.0 / size) * torch.cos(math.pi * (j + 0.5) * k / size)
    matrix[:, 0] /= math.sqrt(2.0)
    return matrix.to(dtype)


def orthonormal_codebooks(num_books: int, num_words: int, word_dim: int) -> Tensor:
    """The OPQN codebooks: a float32 tensor of shape ``(num_books, word_dim, num_words)``.

    Book 1 holds the first ``num_words`` columns of the DCT matrix ``C``; book ``m`` is
    ``C`` times book ``m-1``, i.e. the first ``num_words`` columns of ``C**m``. Column ``k``
    of book ``m`` is codeword ``k``. Every book has orthonormal columns, which needs
    ``num_words <= word_dim``.
    """
    if num_books < 1:
        raise ValueError(f"num_books must be positive, got {num_books}")
    if num_words < 1:
        raise ValueError(f"num_words must be positive, got {num_words}")
    if num_words > word_dim:
        raise ValueError(
            f"num_words={num_words} exceeds the sub-vector dimension word_dim={word_dim}: "
            f"at most {word_dim} orthonormal codewords fit; raise the feature dimension to "
            f"at least num_books*num_words"
        )
    dct = dct_matrix(word_dim)
    books = torch.empty(num_books, word_dim, num_words, dtype=torch.float64)
    books[0] = dct[:, :num_words]
    for m in range(1, num_books):
        books[m] = dct @ books[m - 1]
    return books.to(torch.float32)
