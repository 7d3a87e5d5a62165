"""The verbs every quantization head offers; training, evaluation, search and the faiss
export use only these, never a method's internals."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def code_dtype(num_words: int) -> torch.dtype:
    """Smallest integer dtype that holds codes ``0..num_words-1`` (uint8 when K <= 256)."""
    if num_words <= 256:
        return torch.uint8
    if num_words <= 2**15:
        return torch.int16
    return torch.int32


BOOK_INITS = ("normal", "xavier")


def init_books(books: Tensor, how: str) -> None:
    """Initialise ``(M, d, K)`` books in place: ``normal`` draws every entry from N(0, 1)
    (``torch.randn``, as the OPQN authors' learned-codeword layers), ``xavier`` is Xavier
    uniform per ``(d, K)`` book (bound ``sqrt(6 / (d + K))``, about 10x smaller)."""
    if how not in BOOK_INITS:
        raise ValueError(f"unknown initialisation {how!r}: choose {' or '.join(BOOK_INITS)}")
    with torch.no_grad():
        if how == "normal":
            books.normal_(0.0, 1.0)
        else:
            for book in books:
                nn.init.xavier_uniform_(book)


def code_bits(num_books: int, num_words: int) -> int:
    """Code length L = M * log2(K) in bits."""
    return int(num_books * math.log2(num_words))


class QuantHead(nn.Module):
    """Base of the quantization heads.

    A head turns backbone features ``(B, D)`` into:

    * ``forward(features)``: a tuple of training tensors, consumed as
      ``criterion(*head(features), labels)`` by the method's loss;
    * ``encode(features)``: database codes ``(N, M)`` (uint8 when K <= 256);
    * ``query_tables(features)``: float32 ADC tables ``(Q, M, K)``; the score of an item is
      ``sum_m tables[q, m, codes[n, m]]``, higher is better;
    * ``diagnostics(features)``: detached scalars named by ``DIAGNOSTICS`` for the log;
    * ``faiss_metric``: ``"ip"``, ``"l2"``, ``"hamming"`` or None, with
      ``faiss_centroids()`` ``(M, d', K)`` and ``faiss_queries(features)`` ``(Q, M*d')``
      such that a faiss index over the centroids scores like the engine.
    """

    method: str = ""
    faiss_metric: str | None = None
    # Names of the scalars diagnostics() returns; the training log shows their epoch means.
    DIAGNOSTICS: tuple[str, ...] = ()

    def __init__(self, feature_dim: int, num_books: int, num_words: int) -> None:
        super().__init__()
        if num_books < 1 or feature_dim % num_books:
            raise ValueError(
                f"feature_dim={feature_dim} must be divisible by num_books={num_books}")
        self.feature_dim = feature_dim
        self.num_books = num_books
        self.num_words = num_words
        self.word_dim = feature_dim // num_books

    @property
    def bits(self) -> int:
        return code_bits(self.num_books, self.num_words)

    def split(self, features: Tensor) -> Tensor:
        """``(B, D)`` -> ``(B, M, d)`` sub-vectors."""
        return features.reshape(features.shape[0], self.num_books, self.word_dim)

    def diagnostics(self, features: Tensor) -> dict[str, Tensor]:
        """Detached scalars about the head on a training batch ``(B, D)``, keyed by
        :attr:`DIAGNOSTICS` (none by default)."""
        return {}

    def encode(self, features: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def query_tables(self, features: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def lookup_tables(self, features: Tensor) -> Tensor:
        """Alias of :meth:`query_tables` (the name the OPQN code used first)."""
        return self.query_tables(features)

    def faiss_centroids(self) -> Tensor:
        raise NotImplementedError(f"{self.method}: no faiss export")

    def faiss_queries(self, features: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.method}: no faiss export")
