"""Memory-bounded retrieval evaluation over product-quantization codes (ADC): mAP,
precision and recall at k and PR curves without sorting the database. Top-k search is
:func:`utils.retrieval.topk.search_adc` (also importable from here); the block machinery
both share is :mod:`utils.retrieval.blocks`.

A query is described by a score table ``tables[q]`` of shape ``(M, K)``: the score of every
codeword of every codebook (for OPQN the softmax probabilities ``P_m``).  Database item ``n``
is stored as ``M`` codeword indices ``codes[n]``, and its score for query ``q`` is
:func:`utils.retrieval.scoring.score`, ``sum_m tables[q, m, codes[n, m]]``, the one place
where that sum is written. Higher scores rank first.

How the metrics avoid sorting the database.  The database is first collapsed to its ``U``
distinct codes (a trained model gives many items the same code, so ``U`` is often much
smaller than ``N``), and scores are computed for codes, not items.  For one query only the
score *levels* that hold relevant items matter (the "thresholds"), and per level the number
of database items strictly above it and exactly at it.  Those counts come from one linear
pass over the code scores:

1. every score is mapped to a bucket by a function that never decreases with the score:
   its linear position between the query's lowest and highest threshold, in
   ``_NUM_BUCKETS`` steps, plus one bucket below and one above (rounded float operations are
   monotone, so equal scores share a bucket and a higher bucket means a higher score);
2. a count-weighted histogram of the buckets counts every item;
3. only the codes that fall into a bucket holding a threshold (a handful of buckets) are
   placed exactly among the thresholds (a ``searchsorted`` over few values).

Items in other buckets are above or below a threshold by their bucket alone.  No sort and no
binary search runs per item, so the cost stays near the ``Q x U x M`` table look-ups even
when every code is distinct.  ``utils.retrieval.metrics`` turns the level counts into tie-aware AP,
precision/recall at k and PR curves in closed form.  With ``ties="stable"`` an item's rank
inside a level is its index order among the items of that level, found by sorting only the
items of levels where several codes tie.

Memory: queries and codes are processed in blocks whose working set stays near
``budget_bytes``; nothing of size ``Q x N`` (or ``Q x U``) is ever materialised.  Blocks have
a floor (``_MIN_BLOCK_U`` codes, one query), so a tiny budget costs memory, never a Python
loop over single codes.  Everything runs on the device of ``tables`` (CPU or CUDA).  On CPU,
independent query blocks run in ``torch.get_num_threads()`` Python threads (each with
single-threaded torch ops), and the budget is shared between them.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .blocks import DEFAULT_BUDGET_BYTES, CodeGroups, block_sizes, cpu_workers, group_codes, run_blocks
from .metrics import TIES_MODES, MetricAccumulator, tie_runs
from .scoring import check_codes, check_tables, score_books_first, score_pairs
from .topk import search_adc

__all__ = ["evaluate_adc", "search_adc", "DEFAULT_BUDGET_BYTES"]


# Per (query, relevant pair): about a dozen int64 / float tensors of that shape live at
# once, plus the pair's M code indices and M gathered table values.
_BYTES_PER_QP = 160
_BYTES_PER_QP_BOOK = 12
# Per (query, relevant item) in stable mode.
_BYTES_PER_QR = 64
# Buckets of the per-query histogram (between the lowest and the highest threshold).  More
# buckets leave fewer codes to place exactly; 4096 keeps the histogram in cache.
_NUM_BUCKETS = 4096
# On CPU, evaluation blocks of this many queries stay in cache.
_CPU_QUERY_BLOCK = 64


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


def _index_labels(groups: CodeGroups, db_labels: Tensor, stable: bool) -> _LabelIndex:
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
        # Rank of each item among the items with the same code, by index.
        pos_in_code = torch.empty(n, dtype=torch.int64, device=dev)
        pos_in_code[groups.by_code] = ar - groups.first[groups.inv[groups.by_code]]
        by_pair = torch.sort(pair_inv, stable=True).indices
        idx.slot_pair = pair_inv[by_pair]
        idx.slot_pos = pos_in_code[by_pair]
        idx.slot_item = by_pair
    return idx


@dataclass
class _LevelScan:
    """What one pass over all codes tells about a query block's thresholds.

    ``above`` / ``tied``: int64 ``(Qb, P)``, for every sorted threshold the items scoring
    strictly higher, and (at the first threshold of a run of equal ones) the items scoring
    exactly the same.  ``eq_q``, ``eq_pos``, ``eq_u``: the codes scoring exactly a
    threshold (query row, run start, code id); only kept for ``ties="stable"``.
    """

    above: Tensor
    tied: Tensor
    eq_q: Optional[Tensor] = None
    eq_pos: Optional[Tensor] = None
    eq_u: Optional[Tensor] = None


def _scan_levels(
    tab_mqk: Tensor,
    groups: CodeGroups,
    thresholds: Tensor,
    valid: Tensor,
    block_u: int,
    keep_equal: bool,
) -> _LevelScan:
    """Counts of items above / at each threshold by a bucket histogram (see module doc).

    Args:
        tab_mqk: ``(M, Qb, K)`` tables of a query block.
        thresholds: ``(Qb, P)`` ascending scores per query; invalid entries (``valid`` False)
            are -inf padding at the start of the row.
        valid: bool ``(Qb, P)``.
        block_u: number of codes scored at once.
        keep_equal: also return the codes that score exactly a threshold.
    """
    qb, p = thresholds.shape
    dev = thresholds.device
    nb = _NUM_BUCKETS
    first_valid = (~valid).sum(1, keepdim=True).clamp_max(p - 1)
    lo = thresholds.gather(1, first_valid)  # (Qb, 1) lowest valid threshold
    span = thresholds[:, -1:] - lo
    finite_max = torch.finfo(thresholds.dtype).max
    scale = torch.where(span > 0, (nb / span).clamp_max(finite_max), torch.ones_like(span))

    def bucket(x: Tensor) -> Tensor:
        # A non-decreasing function of the score (every rounded float op here is monotone),
        # which is all the counting needs: 0 below the lowest threshold, nb + 1 at or above
        # the highest, else 1 + the score's linear position between them.
        y = x - lo
        y.mul_(scale).floor_().clamp_(-1, nb).add_(1)
        return y.to(torch.int64)

    tb = torch.where(valid, bucket(thresholds), torch.zeros_like(thresholds, dtype=torch.int64))
    marked = torch.zeros(qb, nb + 2, dtype=torch.bool, device=dev)
    marked.scatter_(1, tb, valid)
    hist = torch.zeros(qb, nb + 2, dtype=torch.int64, device=dev)
    fine = torch.zeros(qb, 2 * p + 2, dtype=torch.int64, device=dev)
    eq_parts: List[Tuple[Tensor, Tensor, Tensor]] = []
    u = groups.num_unique
    for u0 in range(0, u, block_u):
        u1 = min(u, u0 + block_u)
        s = score_books_first(tab_mqk, groups.codes_t[:, u0:u1])
        b = bucket(s)
        cnt = groups.cnt[u0:u1]
        hist.scatter_add_(1, b, cnt.expand(qb, -1))
        cand = marked.gather(1, b)
        del b
        rows, cols = cand.nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        # Place the candidates exactly among their row's thresholds: pad them into a
        # (Qb, max candidates per row) block for one batched searchsorted.
        per_row = torch.bincount(rows, minlength=qb)
        row_first = torch.cumsum(per_row, 0) - per_row
        col = torch.arange(rows.numel(), device=dev) - row_first[rows]
        width = int(per_row.max().item())
        vals = torch.full((qb, width), math.inf, dtype=s.dtype, device=dev)
        vals[rows, col] = s[rows, cols]
        pos = torch.searchsorted(thresholds, vals)[rows, col]  # thresholds strictly below
        eq = thresholds[rows, pos.clamp_max(p - 1)] == s[rows, cols]
        fine.index_put_((rows, 2 * pos + eq.to(torch.int64)), cnt[cols], accumulate=True)
        if keep_equal and bool(eq.any()):
            eq_parts.append((rows[eq], pos[eq], cols[eq] + u0))
    # Items of marked buckets were placed exactly; the histogram keeps the others.
    hist.masked_fill_(marked, 0)
    # Strictly above bucket b: suffix sum from b + 1.
    hist_above = torch.zeros_like(hist)
    hist_above[:, :-1] = hist.flip(1).cumsum(1).flip(1)[:, 1:]
    fine_suffix = fine.flip(1).cumsum(1).flip(1)
    ar = torch.arange(p, device=dev)
    # Above threshold i: unmarked buckets above its bucket, plus placed items with more
    # than i thresholds strictly below them.
    above = hist_above.gather(1, tb) + fine_suffix[:, 2 * ar + 2]
    tied = fine[:, 2 * ar + 1]
    scan = _LevelScan(above, tied)
    if keep_equal:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        parts = list(zip(*eq_parts)) if eq_parts else [[empty], [empty], [empty]]
        scan.eq_q, scan.eq_pos, scan.eq_u = (torch.cat(list(x)) for x in parts)
    return scan


def _chunk_levels(
    tab_mqk: Tensor,
    cls: Tensor,
    groups: CodeGroups,
    lidx: _LabelIndex,
    ties: str,
    block_u: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Level rows ``(above, tied, rel)`` (see ``utils.retrieval.metrics``) for a block of queries.

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
    ps = score_pairs(tab_mqk, groups.codes_t[:, pu])
    ps = torch.where(valid, ps, torch.full_like(ps, -math.inf))  # padding sorts first, never matches
    ts, perm = torch.sort(ps, dim=1)
    pn_s = pn.gather(1, perm)
    valid_s = valid.gather(1, perm)

    stable = ties == "stable"
    scan = _scan_levels(tab_mqk, groups, ts, valid_s, block_u, keep_equal=stable)
    # Runs of equal thresholds are one level.
    new_run, _, start, end = tie_runs(ts)
    above = scan.above.gather(1, end)  # items scoring strictly higher than the level
    above = torch.where(valid_s, above, torch.full_like(above, n))
    tied = scan.tied.gather(1, start)  # items scoring exactly the level

    if not stable:
        cpn = pn_s.cumsum(1)
        before = torch.where(start > 0, cpn.gather(1, (start - 1).clamp_min(0)), torch.zeros_like(cpn))
        rel_run = cpn.gather(1, end) - before
        rel = torch.where(new_run, rel_run, torch.zeros_like(rel_run))
        # Ascending score -> descending: ``above`` becomes non-decreasing and each level's
        # relevant count sits on its last entry, as utils.retrieval.metrics expects.  Padding
        # (score -inf) ends up last with above == N.
        return above.flip(1), tied.clamp_min(1).flip(1), rel.flip(1)

    # ---- stable: every relevant item gets its exact rank -------------------------------
    # rank = items above its level + items of its level with a lower index.  A level that
    # holds a single code keeps the code's items in index order (``slot_pos``); where other
    # codes tie with it, the items of the level are sorted by index.
    u_s = pu.gather(1, perm)
    multi_s = valid_s & (tied != groups.cnt[u_s])
    back = torch.empty_like(perm).scatter_(1, perm, j.expand(qb, pmax).contiguous())  # pair -> sorted
    r_q = lidx.class_size[cls]
    rmax = int(r_q.max().item())
    i = torch.arange(rmax, device=dev)
    ivalid = i < r_q.unsqueeze(1)
    slot = (lidx.slot_ptr[cls].unsqueeze(1) + i).clamp_max(n - 1)
    p_loc = (lidx.slot_pair[slot] - lidx.pair_ptr[cls].unsqueeze(1)).clamp(0, max(pmax - 1, 0))
    p_sorted = back.gather(1, p_loc)
    within = lidx.slot_pos[slot]
    in_multi = ivalid & multi_s.gather(1, p_sorted)
    if bool(in_multi.any()):
        lvl = start.gather(1, p_sorted)  # run start identifies the level
        # Codes at multi-code levels, expanded to their items, sorted by (query, level, index).
        eq_q, eq_pos, eq_u = scan.eq_q, scan.eq_pos, scan.eq_u
        keep = multi_s[eq_q, eq_pos]
        eq_q, eq_pos, eq_u = eq_q[keep], eq_pos[keep], eq_u[keep]
        sizes = groups.cnt[eq_u]
        owner = torch.repeat_interleave(torch.arange(eq_u.numel(), device=dev), sizes)
        offset = torch.arange(owner.numel(), device=dev) - (torch.cumsum(sizes, 0) - sizes)[owner]
        items = groups.by_code[groups.first[eq_u][owner] + offset]
        seg = eq_q[owner] * pmax + eq_pos[owner]
        keys = torch.sort(seg * n + items).values
        rq = torch.arange(qb, device=dev).unsqueeze(1).expand(qb, rmax)
        sel_seg = (rq * pmax + lvl)[in_multi]
        item_r = lidx.slot_item[slot][in_multi]
        at = torch.searchsorted(keys, sel_seg * n + item_r)
        seg_first = torch.searchsorted(keys, sel_seg * n)
        within = within.clone()
        within[in_multi] = at - seg_first
    rank0 = scan.above.gather(1, end).gather(1, p_sorted) + within
    rank0 = torch.where(ivalid, rank0, torch.full_like(rank0, n))
    rank0 = torch.sort(rank0, dim=1).values
    rel = (rank0 < n).to(torch.int64)
    return rank0, torch.ones_like(rank0), rel


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
    tables = check_tables(tables)
    q, m, kw = tables.shape
    dev = tables.device
    codes = check_codes(codes, m, kw, dev)
    n = codes.shape[0]
    if n == 0:
        raise ValueError("the database is empty")
    query_labels = torch.as_tensor(query_labels).to(dev).reshape(-1).to(torch.int64)
    db_labels = torch.as_tensor(db_labels).to(dev).reshape(-1).to(torch.int64)
    if query_labels.numel() != q or db_labels.numel() != n:
        raise ValueError(
            f"label sizes ({query_labels.numel()}, {db_labels.numel()}) do not match Q={q}, N={n}"
        )

    groups = group_codes(codes, kw)
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
    # Per query: its relevant pairs (with their M codes), stable-mode items, its tables and
    # its histograms.
    fixed = (pmax * (_BYTES_PER_QP + _BYTES_PER_QP_BOOK * m) + rmax * _BYTES_PER_QR
             + 8 * m * kw + 9 * (_NUM_BUCKETS + 2))
    qb, block_u = block_sizes(nq, groups.num_unique, fixed, budget_bytes, dev, _CPU_QUERY_BLOCK)
    lock = threading.Lock()

    def run(q0: int) -> None:
        rows = qsel[q0 : q0 + qb]
        c = cls[q0 : q0 + qb]
        tab_mqk = tables.index_select(0, rows).permute(1, 0, 2).contiguous()
        above, tied, rel = _chunk_levels(tab_mqk, c, groups, lidx, ties, block_u)
        with lock:
            acc.add(above, tied, rel, lidx.class_size[c])

    starts = list(range(0, nq, qb))
    run_blocks(run, starts, cpu_workers(dev, len(starts)))
    return acc.result(ties=ties, num_queries=q, skipped=skipped)
