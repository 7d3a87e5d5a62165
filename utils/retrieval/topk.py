"""Top-k search over product-quantization codes: :func:`search_adc`, memory-bounded, on the
distinct codes of the gallery (:mod:`utils.retrieval.blocks`), with the scores of
:mod:`utils.retrieval.scoring`."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .blocks import DEFAULT_BUDGET_BYTES, block_sizes, cpu_workers, group_codes, run_blocks
from .scoring import check_codes, check_tables, score_books_first

__all__ = ["search_adc"]

# On CPU, search blocks of this many queries stay in cache.
CPU_SEARCH_QUERY_BLOCK = 64


def search_adc(
    tables: Tensor,
    codes: Tensor,
    topk: int,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> Tuple[Tensor, Tensor]:
    """Top-``k`` database items of each query under ADC scoring.

    Args:
        tables: float tensor ``(Q, M, K)``; defines the device.
        codes: integer tensor ``(N, M)``, values in ``[0, K)``.
        topk: number of results per query.
        budget_bytes: approximate cap on the working memory of one block.

    Returns:
        ``(scores, indices)``: float ``(Q, topk)`` in descending order and int64 ``(Q, topk)``.
        Items sharing a code are returned by ascending index; the order between different
        codes with exactly equal scores is unspecified.  When ``topk > N`` the tail is padded
        with score ``-inf`` and index ``-1`` (as faiss does).
    """
    if topk < 1:
        raise ValueError("topk must be >= 1")
    tables = check_tables(tables)
    q, m, kw = tables.shape
    dev = tables.device
    codes = check_codes(codes, m, kw, dev)
    n = codes.shape[0]
    out_s = torch.full((q, topk), -math.inf, dtype=tables.dtype, device=dev)
    out_i = torch.full((q, topk), -1, dtype=torch.int64, device=dev)
    if n == 0 or q == 0:
        return out_s, out_i
    groups = group_codes(codes, kw)
    u = groups.num_unique
    kk = min(topk, n)
    g = min(kk, u)  # each code holds >= 1 item, so the best g codes cover the top kk items
    # Whole rows of code scores per block when the budget allows: one top-k per row is much
    # cheaper than merging many partial top-k lists.  Per query: the running best g codes
    # (scores and ids, twice while merging), the output rows and the tables.
    per_query = 48 * g + 16 * kk + 8 * m * kw
    qb, block_u = block_sizes(q, u, per_query, budget_bytes, dev, CPU_SEARCH_QUERY_BLOCK,
                               whole_rows=True)
    pos = torch.arange(kk, device=dev)

    def run(q0: int) -> None:
        tab_mqk = tables[q0 : q0 + qb].permute(1, 0, 2).contiguous()
        nb = tab_mqk.shape[1]
        best_s: Optional[Tensor] = None
        best_u: Optional[Tensor] = None
        for u0 in range(0, u, block_u):
            u1 = min(u, u0 + block_u)
            s = score_books_first(tab_mqk, groups.codes_t[:, u0:u1])
            ts, tu = torch.topk(s, min(g, u1 - u0), dim=1)
            tu += u0
            if best_s is not None:
                # Merge with the running best codes of earlier code blocks.
                cand = torch.cat([best_s, ts], 1)
                ts, sel = torch.topk(cand, min(g, cand.shape[1]), dim=1)
                tu = torch.cat([best_u, tu], 1).gather(1, sel)
            best_s, best_u = ts, tu
        assert best_s is not None and best_u is not None
        # Expand codes to items: result position j falls in the code whose cumulative item
        # count first exceeds j.
        cum = groups.cnt[best_u].cumsum(1)
        slot = torch.searchsorted(cum, pos.expand(nb, kk).contiguous(), right=True)
        within = pos - (cum.gather(1, slot) - groups.cnt[best_u.gather(1, slot)])
        code = best_u.gather(1, slot)
        out_i[q0 : q0 + nb, :kk] = groups.by_code[groups.first[code] + within]
        out_s[q0 : q0 + nb, :kk] = best_s.gather(1, slot)

    starts = list(range(0, q, qb))
    run_blocks(run, starts, cpu_workers(dev, len(starts)))
    return out_s, out_i
