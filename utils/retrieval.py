"""Memory-bounded retrieval evaluation and search over product-quantization codes (ADC).

A query is described by a score table ``tables[q]`` of shape ``(M, K)``: the score of every
codeword of every codebook (for OPQN the softmax probabilities ``P_m``).  Database item ``n``
is stored as ``M`` codeword indices ``codes[n]``, and its score for query ``q`` is

    score(q, n) = sum_m tables[q, m, codes[n, m]]

accumulated in ``m`` order in the tables' float dtype (half precision is promoted to float32).
Higher scores rank first.

Why this is fast: a trained model gives many items the same code, so the database is first
collapsed to its ``U`` distinct codes (``U`` is often much smaller than ``N``), and scores are
computed for codes, not items.  The metrics never sort the database either: for each query
only the score levels that hold relevant items matter, and the number of database items above
and inside each such level is obtained by bucketing all code scores against those few levels
(``searchsorted`` plus a count-weighted histogram).  ``utils.metrics`` turns those level counts
into tie-aware AP, precision/recall at k and PR curves in closed form.

Memory: queries and codes are processed in blocks whose working set stays under
``budget_bytes``; nothing of size ``Q x N`` (or ``Q x U``) is ever materialised.
Everything runs on the device of ``tables`` (CPU or CUDA).  On CPU, independent query
blocks run in ``torch.get_num_threads()`` Python threads (each with single-threaded torch
ops), and the budget is shared between them.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from utils.metrics import TIES_MODES, MetricAccumulator

__all__ = ["evaluate_adc", "search_adc", "DEFAULT_BUDGET_BYTES"]

DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024

# Estimated bytes of working memory per (query, code) element of a block: scores (4), the
# int64 bucket index (8), the gathered threshold and equality mask (4 + 1) and the
# book-sum temporary (4), rounded up.
_BYTES_PER_QU = 32
# Per (query, relevant pair) and per (query, relevant item) element: about a dozen int64 /
# float tensors of that shape live at once.
_BYTES_PER_QP = 160
_BYTES_PER_QR = 64
# On CPU, small blocks stay in cache and avoid the page-fault cost of huge fresh
# allocations; larger blocks do not run faster.
_CPU_QUERY_BLOCK = 256
_CPU_BLOCK_ELEMS = 1 << 18
_CPU_SEARCH_QUERY_BLOCK = 64
_MAX_CPU_WORKERS = 16


# --------------------------------------------------------------------------------------
# Parallelism
# --------------------------------------------------------------------------------------


def _cpu_threads() -> int:
    # Python threads share the GIL between ops; beyond ~16 the gain would be eaten by it.
    return max(1, min(torch.get_num_threads(), _MAX_CPU_WORKERS))


def _cpu_workers(device: torch.device, num_blocks: int) -> int:
    if device.type != "cpu":
        return 1
    return max(1, min(_cpu_threads(), num_blocks))


def _run_blocks(fn: Callable[[int], None], starts: Sequence[int], workers: int) -> None:
    """Run ``fn(start)`` for every block start.

    On CPU the blocks are spread over ``workers`` Python threads, each running its torch
    ops single-threaded.  The ops of one block are small (a cache-sized block), and torch's
    own intra-op threading would synchronise all cores after each of them; when cores are
    shared with other processes those barriers dominate the run time.  Independent blocks
    per thread scale without barriers.
    """
    if workers <= 1 or len(starts) <= 1:
        for start in starts:
            fn(start)
        return
    saved = torch.get_num_threads()

    def init() -> None:
        torch.set_num_threads(1)  # per-thread setting with the OpenMP backend

    try:
        with ThreadPoolExecutor(max_workers=workers, initializer=init) as pool:
            for fut in [pool.submit(fn, start) for start in starts]:
                fut.result()
    finally:
        # Backends whose thread setting is global would otherwise stay at 1.
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _prepare_tables(tables: Tensor) -> Tensor:
    if not isinstance(tables, Tensor) or tables.dim() != 3:
        raise ValueError(f"tables must be a (Q, M, K) tensor, got {getattr(tables, 'shape', type(tables))}")
    if not tables.is_floating_point():
        raise TypeError(f"tables must be floating point, got {tables.dtype}")
    if tables.dtype in (torch.float16, torch.bfloat16):
        tables = tables.float()  # half precision would create spurious score ties
    if tables.numel() and not bool(torch.isfinite(tables).all()):
        raise ValueError("tables contain NaN or infinite values")
    return tables


def _prepare_codes(codes: Tensor, m: int, k: int, device: torch.device) -> Tensor:
    if not isinstance(codes, Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be an (N, M) tensor, got {getattr(codes, 'shape', type(codes))}")
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


def _block_sizes(
    nq: int, u: int, fixed_per_query: int, budget_bytes: int, device: torch.device, cpu_query_block: int
) -> Tuple[int, int]:
    """Queries and codes per block so that the block's working set fits ``budget_bytes``.

    ``fixed_per_query`` is the memory a query needs regardless of the code block (its
    relevant pairs / items).  On CPU, blocks run in parallel threads, so the budget is split
    between them.  Returns ``(query_block, code_block)``.
    """
    if budget_bytes <= 0:
        raise ValueError("budget_bytes must be positive")
    if device.type == "cpu":
        budget_bytes = max(1, budget_bytes // _cpu_threads())
        # Enough blocks to keep every thread busy.
        qb = min(cpu_query_block, max(1, -(-nq // _cpu_threads())))
        elems = _CPU_BLOCK_ELEMS
    else:
        qb, elems = nq, budget_bytes // _BYTES_PER_QU
    # Leave room for code blocks of at least ~1k codes (or all codes if fewer).
    qb = max(1, min(qb, budget_bytes // (fixed_per_query + _BYTES_PER_QU * min(u, 1024))))
    room = max(0, budget_bytes - qb * fixed_per_query) // (qb * _BYTES_PER_QU)
    block_u = max(1, min(u, elems // qb, room))
    return qb, block_u


@dataclass
class _CodeGroups:
    """The database collapsed to its distinct codes.

    Attributes:
        codes_t: int64 ``(M, U)``, distinct codes (transposed so each book is contiguous).
        inv: int64 ``(N,)``, the distinct-code id of every item.
        cnt: int64 ``(U,)``, items per distinct code.
    """

    codes_t: Tensor
    inv: Tensor
    cnt: Tensor

    @property
    def num_unique(self) -> int:
        return int(self.cnt.numel())


def _group_codes(codes: Tensor, k: int) -> _CodeGroups:
    n, m = codes.shape
    bits = max(1, (k - 1).bit_length())
    codes_l = codes.to(torch.int64)
    if m * bits <= 62:
        # Pack each code into one int64 so a 1-D unique (a single sort) finds the groups.
        key = torch.zeros(n, dtype=torch.int64, device=codes.device)
        for j in range(m):
            key |= codes_l[:, j] << (j * bits)
        _, inv, cnt = torch.unique(key, return_inverse=True, return_counts=True)
    else:
        _, inv, cnt = torch.unique(codes_l, dim=0, return_inverse=True, return_counts=True)
    uniq = torch.empty(cnt.numel(), m, dtype=torch.int64, device=codes.device)
    uniq[inv] = codes_l  # every item writes its own (identical) code row
    return _CodeGroups(codes_t=uniq.t().contiguous(), inv=inv, cnt=cnt)


def _score_block(tab_mqk: Tensor, codes_t: Tensor) -> Tensor:
    """Scores ``(Qb, Ub)`` of a block: ``sum_m tab[m, q, codes_t[m, u]]`` in ``m`` order.

    ``tab_mqk`` is ``(M, Qb, K)`` contiguous; ``codes_t`` is int64 ``(M, Ub)``.
    """
    s = tab_mqk[0].index_select(1, codes_t[0])
    for j in range(1, codes_t.shape[0]):
        s += tab_mqk[j].index_select(1, codes_t[j])
    return s


def _score_pairs(tab_mqk: Tensor, pair_codes: Tensor) -> Tensor:
    """Scores of per-query code lists; ``pair_codes`` is int64 ``(M, Qb, P)``, returns ``(Qb, P)``.

    Uses the same operations in the same order as ``_score_block``, so a code gets a
    bit-identical score either way (the level logic relies on exact equality).
    """
    s = tab_mqk[0].gather(1, pair_codes[0])
    for j in range(1, pair_codes.shape[0]):
        s += tab_mqk[j].gather(1, pair_codes[j])
    return s


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@dataclass
class _LabelIndex:
    """Database items grouped by (class, distinct code).

    A *pair* is one (class, code) combination present in the database.  Pairs are sorted by
    class, then code id; ``pair_ptr[c]:pair_ptr[c+1]`` are the pairs of class ``c``.  *Slots*
    list the items sorted by pair, then index; ``slot_ptr[c]:slot_ptr[c+1]`` are the items of
    class ``c``.
    """

    classes: Tensor  # (C,) sorted distinct database labels
    class_size: Tensor  # (C,) items per class
    pair_ptr: Tensor  # (C+1,)
    pair_u: Tensor  # (P,) code id of each pair
    pair_n: Tensor  # (P,) items in each pair
    slot_ptr: Tensor  # (C+1,)
    slot_pair: Optional[Tensor] = None  # (N,) pair of each slot (stable mode)
    slot_pos: Optional[Tensor] = None  # (N,) position of the slot's item within its code group
    slot_item: Optional[Tensor] = None  # (N,) item index of each slot


def _index_labels(groups: _CodeGroups, db_labels: Tensor, stable: bool) -> _LabelIndex:
    u = groups.num_unique
    n = groups.inv.numel()
    dev = groups.inv.device
    classes, lab = torch.unique(db_labels, return_inverse=True)
    c = classes.numel()
    pair_key, pair_inv, pair_n = torch.unique(lab * u + groups.inv, return_inverse=True, return_counts=True)
    pair_c = pair_key // u
    pair_u = pair_key % u
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    pair_ptr = torch.cat([zero, torch.cumsum(torch.bincount(pair_c, minlength=c), 0)])
    class_size = torch.bincount(lab, minlength=c)
    slot_ptr = torch.cat([zero, torch.cumsum(class_size, 0)])
    idx = _LabelIndex(classes, class_size, pair_ptr, pair_u, pair_n, slot_ptr)
    if stable:
        ar = torch.arange(n, device=dev)
        # Rank of each item among the items with the same code, by index (stable sort keeps
        # index order inside a group).
        by_code = torch.sort(groups.inv, stable=True).indices
        grp_start = torch.cumsum(groups.cnt, 0) - groups.cnt
        pos_in_code = torch.empty(n, dtype=torch.int64, device=dev)
        pos_in_code[by_code] = ar - grp_start[groups.inv[by_code]]
        by_pair = torch.sort(pair_inv, stable=True).indices
        idx.slot_pair = pair_inv[by_pair]
        idx.slot_pos = pos_in_code[by_pair]
        idx.slot_item = by_pair
    return idx


def _level_counts(
    tab_mqk: Tensor,
    groups: _CodeGroups,
    thresholds: Tensor,
    block_u: int,
) -> Tensor:
    """Count-weighted histogram of all code scores against each query's sorted thresholds.

    Args:
        tab_mqk: ``(M, Qb, K)`` tables of a query block.
        thresholds: ``(Qb, P)`` ascending scores per query (duplicates allowed).
        block_u: number of codes scored at once.

    Returns:
        int64 ``(Qb, 2P + 2)``: entry ``2i + e`` counts the items with exactly ``i``
        thresholds strictly below their score, and ``e = 1`` when the score also equals
        threshold ``i`` (the start of a run of equal thresholds), else ``e = 0``.
    """
    qb, p = thresholds.shape
    hist = torch.zeros(qb, 2 * p + 2, dtype=torch.int64, device=thresholds.device)
    u = groups.num_unique
    for u0 in range(0, u, block_u):
        u1 = min(u, u0 + block_u)
        s = _score_block(tab_mqk, groups.codes_t[:, u0:u1])
        # One binary search; equality with the threshold it lands on is checked directly,
        # which is cheaper than a second (right-sided) search.
        b = torch.searchsorted(thresholds, s)
        eq = thresholds.gather(1, b.clamp_max(p - 1)) == s
        b.mul_(2).add_(eq)
        hist.scatter_add_(1, b, groups.cnt[u0:u1].expand(qb, -1))
        del s, b, eq
    return hist


def _chunk_levels(
    tab_mqk: Tensor,
    cls: Tensor,
    groups: _CodeGroups,
    lidx: _LabelIndex,
    ties: str,
    block_u: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Level rows ``(above, tied, rel)`` (see ``utils.metrics``) for a block of queries.

    ``cls`` holds the class id (index into ``lidx.classes``) of each query in the block.
    """
    dev = cls.device
    qb = cls.numel()
    n = groups.inv.numel()
    npairs = lidx.pair_u.numel()
    p_q = lidx.pair_ptr[cls + 1] - lidx.pair_ptr[cls]
    pmax = int(p_q.max().item())
    j = torch.arange(pmax, device=dev)
    valid = j < p_q.unsqueeze(1)
    pidx = (lidx.pair_ptr[cls].unsqueeze(1) + j).clamp_max(npairs - 1)
    pu = lidx.pair_u[pidx]
    pn = torch.where(valid, lidx.pair_n[pidx], torch.zeros_like(pidx))
    ps = _score_pairs(tab_mqk, groups.codes_t[:, pu])
    ps = torch.where(valid, ps, torch.full_like(ps, -math.inf))  # padding sorts first, never matches
    ts, perm = torch.sort(ps, dim=1)
    pn_s = pn.gather(1, perm)

    hist = _level_counts(tab_mqk, groups, ts.contiguous(), block_u)
    suffix = hist.flip(1).cumsum(1).flip(1)

    # Runs of equal thresholds are one level: find each position's run start and end.
    pos = j.expand(qb, pmax)
    new_run = torch.ones(qb, pmax, dtype=torch.bool, device=dev)
    new_run[:, 1:] = ts[:, 1:] != ts[:, :-1]
    run_end = torch.ones_like(new_run)
    run_end[:, :-1] = new_run[:, 1:]
    start = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(1).values
    end = torch.where(run_end, pos, torch.full_like(pos, pmax)).flip(1).cummin(1).values.flip(1)
    above = suffix.gather(1, 2 * (end + 1))  # items scoring strictly higher than the level
    tied = hist.gather(1, 2 * start + 1)  # items scoring exactly the level

    if ties == "expected":
        cpn = pn_s.cumsum(1)
        before = torch.where(start > 0, cpn.gather(1, (start - 1).clamp_min(0)), torch.zeros_like(cpn))
        rel_run = cpn.gather(1, end) - before
        rel = torch.where(new_run, rel_run, torch.zeros_like(rel_run))
        # Ascending score -> descending: ``above`` becomes non-decreasing and each level's
        # relevant count sits on its last entry, as utils.metrics expects.  Padding
        # (score -inf) ends up last with above == N.
        return above.flip(1), tied.clamp_min(1).flip(1), rel.flip(1)

    # ---- stable: every relevant item gets its exact rank -------------------------------
    valid_s = valid.gather(1, perm)
    u_s = pu.gather(1, perm)
    # A level holding only this code keeps the code's items in index order; if other codes
    # tie with it, items interleave by index and the query needs the exact fallback.
    multi = valid_s & (tied != groups.cnt[u_s])
    needs_fallback = multi.any(1)
    above_loc = torch.zeros_like(above).scatter_(1, perm, above)  # back to class pair order
    r_q = lidx.class_size[cls]
    rmax = int(r_q.max().item())
    i = torch.arange(rmax, device=dev)
    ivalid = i < r_q.unsqueeze(1)
    slot = (lidx.slot_ptr[cls].unsqueeze(1) + i).clamp_max(n - 1)
    p_loc = (lidx.slot_pair[slot] - lidx.pair_ptr[cls].unsqueeze(1)).clamp(0, max(pmax - 1, 0))
    rank0 = above_loc.gather(1, p_loc) + lidx.slot_pos[slot]
    rank0 = torch.where(ivalid, rank0, torch.full_like(rank0, n))
    if bool(needs_fallback.any()):
        for row in needs_fallback.nonzero().flatten().tolist():
            rank0[row] = n
            c = int(cls[row].item())
            items = lidx.slot_item[lidx.slot_ptr[c]:lidx.slot_ptr[c + 1]]
            rank0[row, : items.numel()] = _stable_ranks(tab_mqk[:, row : row + 1], groups, items, block_u)
    rank0 = torch.sort(rank0, dim=1).values
    rel = (rank0 < n).to(torch.int64)
    return rank0, torch.ones_like(rank0), rel


def _stable_ranks(tab_m1k: Tensor, groups: _CodeGroups, items: Tensor, block_u: int) -> Tensor:
    """Exact 0-based ranks of ``items`` for one query, ties broken by index (O(N log N))."""
    u = groups.num_unique
    code_scores = torch.cat(
        [_score_block(tab_m1k, groups.codes_t[:, u0 : min(u, u0 + block_u)])[0] for u0 in range(0, u, block_u)]
    )
    item_scores = code_scores[groups.inv]
    order = torch.sort(item_scores, descending=True, stable=True).indices
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(order.numel(), device=order.device)
    return rank_of[items]


def evaluate_adc(
    tables: Tensor,
    codes: Tensor,
    query_labels: Tensor,
    db_labels: Tensor,
    k: int = 5,
    ties: str = "expected",
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    pr_points: int = 100,
) -> Dict[str, object]:
    """Retrieval metrics of ADC scoring over the whole database, tie-aware and memory-bounded.

    Args:
        tables: float tensor ``(Q, M, K)``, per-query score of each codeword of each book
            (for OPQN the softmax probabilities ``P_m``).  Defines the device.
        codes: integer tensor ``(N, M)`` (uint8 when ``K <= 256``; int64 accepted), values in
            ``[0, K)``.
        query_labels: integer tensor ``(Q,)``.
        db_labels: integer tensor ``(N,)``.  An item is relevant to a query when labels match.
        k: cut-off for precision/recall at k (capped at ``N``).
        ties: ``"expected"`` (default; exact expectation over random orders of tied items) or
            ``"stable"`` (ties broken by database index, lower index first).
        budget_bytes: approximate cap on the working memory of one block.
        pr_points: approximate number of PR-curve cut-offs (log and linear spaced over 1..N).

    Returns:
        A JSON-serialisable dict: ``mAP``, ``precision_at_k``, ``recall_at_k``, ``k``,
        ``pr_curve`` (``precision``, ``recall``, ``cutoffs`` lists; means over queries of
        precision and recall at each cut-off), ``skipped_queries`` (queries whose label has
        no database item; excluded from every mean), ``num_evaluated``, ``ties``,
        ``num_queries``, ``num_database``.  Means are 0.0 when no query can be evaluated.
    """
    if ties not in TIES_MODES:
        raise ValueError(f"ties must be one of {TIES_MODES}, got {ties!r}")
    tables = _prepare_tables(tables)
    q, m, kw = tables.shape
    dev = tables.device
    codes = _prepare_codes(codes, m, kw, dev)
    n = codes.shape[0]
    if n == 0:
        raise ValueError("the database is empty")
    query_labels = torch.as_tensor(query_labels).to(dev).reshape(-1).to(torch.int64)
    db_labels = torch.as_tensor(db_labels).to(dev).reshape(-1).to(torch.int64)
    if query_labels.numel() != q or db_labels.numel() != n:
        raise ValueError(
            f"label sizes ({query_labels.numel()}, {db_labels.numel()}) do not match Q={q}, N={n}"
        )

    groups = _group_codes(codes, kw)
    lidx = _index_labels(groups, db_labels, stable=(ties == "stable"))
    acc = MetricAccumulator(n, k, pr_points, dev)

    # Map query labels to class ids; labels absent from the database are skipped.
    cls = torch.searchsorted(lidx.classes, query_labels).clamp_max(lidx.classes.numel() - 1)
    present = lidx.classes[cls] == query_labels
    skipped = int((~present).sum().item())
    qsel = present.nonzero().flatten()
    cls = cls[qsel]
    if qsel.numel() == 0:
        return acc.result(ties=ties, num_queries=q, skipped=skipped)

    pmax = int((lidx.pair_ptr[1:] - lidx.pair_ptr[:-1]).max().item())
    rmax = int(lidx.class_size.max().item()) if ties == "stable" else 0
    nq = int(qsel.numel())
    qb, block_u = _block_sizes(
        nq, groups.num_unique, pmax * _BYTES_PER_QP + rmax * _BYTES_PER_QR, budget_bytes, dev, _CPU_QUERY_BLOCK
    )
    lock = threading.Lock()

    def run(q0: int) -> None:
        rows = qsel[q0 : q0 + qb]
        c = cls[q0 : q0 + qb]
        tab_mqk = tables.index_select(0, rows).permute(1, 0, 2).contiguous()
        above, tied, rel = _chunk_levels(tab_mqk, c, groups, lidx, ties, block_u)
        with lock:
            acc.add(above, tied, rel, lidx.class_size[c])

    starts = list(range(0, nq, qb))
    _run_blocks(run, starts, _cpu_workers(dev, len(starts)))
    return acc.result(ties=ties, num_queries=q, skipped=skipped)


# --------------------------------------------------------------------------------------
# Top-k search
# --------------------------------------------------------------------------------------


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
    tables = _prepare_tables(tables)
    q, m, kw = tables.shape
    dev = tables.device
    codes = _prepare_codes(codes, m, kw, dev)
    n = codes.shape[0]
    out_s = torch.full((q, topk), -math.inf, dtype=tables.dtype, device=dev)
    out_i = torch.full((q, topk), -1, dtype=torch.int64, device=dev)
    if n == 0 or q == 0:
        return out_s, out_i
    groups = _group_codes(codes, kw)
    u = groups.num_unique
    # Items of each code, by ascending index (stable sort of the code ids).
    by_code = torch.sort(groups.inv, stable=True).indices
    grp_start = torch.cumsum(groups.cnt, 0) - groups.cnt
    kk = min(topk, n)
    g = min(kk, u)  # each code holds >= 1 item, so the best g codes cover the top kk items

    # Whole rows of code scores per block when the budget allows: one top-k per row is much
    # cheaper than merging many partial top-k lists.
    per_query = 8 * g * 16
    if dev.type == "cpu":
        budget_bytes = max(1, budget_bytes // _cpu_threads())
        qb = max(1, min(_CPU_SEARCH_QUERY_BLOCK, -(-q // _cpu_threads())))
    else:
        qb = q
    qb = max(1, min(qb, budget_bytes // (per_query + _BYTES_PER_QU * min(u, 1024))))
    block_u = max(1, min(u, (budget_bytes - qb * per_query) // (qb * _BYTES_PER_QU)))
    pos = torch.arange(kk, device=dev)

    def run(q0: int) -> None:
        tab_mqk = tables[q0 : q0 + qb].permute(1, 0, 2).contiguous()
        nb = tab_mqk.shape[1]
        best_s: Optional[Tensor] = None
        best_u: Optional[Tensor] = None
        for u0 in range(0, u, block_u):
            u1 = min(u, u0 + block_u)
            s = _score_block(tab_mqk, groups.codes_t[:, u0:u1])
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
        out_i[q0 : q0 + nb, :kk] = by_code[grp_start[code] + within]
        out_s[q0 : q0 + nb, :kk] = best_s.gather(1, slot)

    starts = list(range(0, q, qb))
    _run_blocks(run, starts, _cpu_workers(dev, len(starts)))
    return out_s, out_i
