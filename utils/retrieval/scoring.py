"""The asymmetric score of product quantization: a query's tables against items' codes.

A query is described by its tables ``(M, K)``, the score of every codeword of every book (for
OPQN the probabilities ``P_m = softmax(q̂_mᵀ V_m)``); an item by its codes ``(M,)``. The score
of item n for query q is

    score(q, n) = sum_m tables[q, m, codes[n, m]]

summed in ``m`` order in float32 (half-precision tables are promoted, which keeps spurious
ties out). This module is the one place where that sum is written: :func:`score` for a
user's own tensors, and the same sum in the books-first layout that the ranking engine
(:mod:`utils.retrieval.adc`) runs on blocks, :func:`score_books_first` and
:func:`score_pairs`, which give bit-identical values for the same code.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["score", "score_books_first", "score_pairs", "check_tables", "check_codes",
           "NonFiniteTablesError"]


class NonFiniteTablesError(ValueError):
    """The tables hold NaN or infinite values: the model that made them has diverged."""


def check_tables(tables: Tensor) -> Tensor:
    """``tables`` ``(Q, M, K)`` as a finite float tensor (half precision promoted to float32);
    :class:`NonFiniteTablesError` when any value is not finite, ``ValueError``/``TypeError``
    for a wrong shape or type."""
    if not isinstance(tables, Tensor) or tables.dim() != 3:
        raise ValueError(f"tables must be a (Q, M, K) tensor, got "
                         f"{getattr(tables, 'shape', type(tables))}")
    if not tables.is_floating_point():
        raise TypeError(f"tables must be floating point, got {tables.dtype}")
    if tables.dtype in (torch.float16, torch.bfloat16):
        tables = tables.float()  # half precision would create spurious score ties
    if tables.numel() and not bool(torch.isfinite(tables).all()):
        raise NonFiniteTablesError("tables contain NaN or infinite values")
    return tables


def check_codes(codes: Tensor, m: int, k: int, device: torch.device) -> Tensor:
    """``codes`` ``(N, M)`` as integers in ``[0, K)`` on ``device``; errors name the fault."""
    if not isinstance(codes, Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be an (N, M) tensor, got "
                         f"{getattr(codes, 'shape', type(codes))}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.shape[1] != m:
        raise ValueError(f"codes have {codes.shape[1]} books but tables have M={m}")
    codes = codes.to(device)
    if codes.numel():
        lo, hi = int(codes.min().item()), int(codes.max().item())
        if lo < 0 or hi >= k:
            raise ValueError(f"code values must lie in [0, {k}), found [{lo}, {hi}]")
    return codes


def score(tables: Tensor, codes: Tensor) -> Tensor:
    """Every query's score of every item.

    Args:
        tables: float ``(Q, M, K)``; defines the device.
        codes: integer ``(N, M)``, values in ``[0, K)``.

    Returns:
        float ``(Q, N)``: ``sum_m tables[q, m, codes[n, m]]``. It holds Q x N values: for
        galleries too large for that, rank with :func:`utils.retrieval.adc.search_adc`, which
        computes the same sums block by block.
    """
    tables = check_tables(tables)
    _, m, k = tables.shape
    codes = check_codes(codes, m, k, tables.device)
    return score_books_first(tables.transpose(0, 1).contiguous(), codes.t().to(torch.int64))


def score_books_first(tab_mqk: Tensor, codes_t: Tensor) -> Tensor:
    """:func:`score` in the books-first layout: ``tab_mqk`` ``(M, Q, K)`` contiguous and
    ``codes_t`` int64 ``(M, U)`` give ``(Q, U)``, summed in ``m`` order."""
    s = tab_mqk[0].index_select(1, codes_t[0])
    for j in range(1, codes_t.shape[0]):
        s += tab_mqk[j].index_select(1, codes_t[j])
    return s


def score_pairs(tab_mqk: Tensor, pair_codes: Tensor) -> Tensor:
    """Scores of a list of codes per query: ``pair_codes`` int64 ``(M, Q, P)`` gives
    ``(Q, P)``, with the same operations in the same order as :func:`score_books_first`, so
    a code gets a bit-identical score either way (the engine's tie handling relies on it)."""
    s = tab_mqk[0].gather(1, pair_codes[0])
    for j in range(1, pair_codes.shape[0]):
        s += tab_mqk[j].gather(1, pair_codes[j])
    return s
