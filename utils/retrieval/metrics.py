"""Tie-aware retrieval metrics (AP, precision@k, recall@k, PR curves).

Every metric here is computed from a compact *level* description of each query's ranking
instead of a full sorted list.  A level is a group of database items that share one score
(a tie group).  For one query the levels are stored in a row of three integer tensors:

``above[j]``
    number of database items ranked strictly above level ``j`` (higher score);
``tied[j]``
    number of items in level ``j`` (>= 1);
``rel[j]``
    number of relevant items in level ``j``.

Rows are padded to a common length ``L``.  Invariants expected by the functions below:
``above`` is non-decreasing along a row; entries with the same ``above`` belong to the same
level, and only the *last* of them may carry a non-zero ``rel`` (the others are zero-rel
placeholders); padding entries have ``above = N`` (the database size), ``tied = 1`` and
``rel = 0``.  ``levels_from_scores`` builds such rows from a dense score matrix and
``utils.retrieval.adc`` builds them from product-quantization codes without ever sorting the
database.

Ties are handled by definition, in one of two ways:

* ``"expected"``: the metric's exact expectation when the items of every tie group are put
  in uniformly random order (McSherry & Najork, ECIR 2008).  For a level with ``t`` items,
  ``r`` of them relevant, ``a`` items above it and ``b`` relevant items above it, linearity of
  expectation gives the AP contribution

      (r / t) * sum_{j=1..t} (b + 1 + (j - 1)(r - 1)/(t - 1)) / (a + j)

  (the item at in-level position ``j`` is relevant with probability ``r/t``, and given that,
  the other ``j - 1`` items before it hold ``(j-1)(r-1)/(t-1)`` relevant items on average).
  The sum has a closed form in harmonic numbers, so the cost is O(1) per level.  The
  expected number of relevant items in the top ``k`` is ``b + r * (k - a) / t`` when the
  cut-off falls inside the level.
* ``"stable"``: ties broken by database index, lower index first.  Every item is then its
  own level (``tied = 1``), and the same formulas give the usual tie-oblivious metrics.

Queries with no relevant item have undefined AP/recall: per-query functions return 0 for
them, and ``summarize`` leaves them out of the means (and counts them), so no NaN appears.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

TIES_MODES = ("expected", "stable")

__all__ = [
    "TIES_MODES",
    "tie_runs",
    "harmonic_numbers",
    "ap_from_levels",
    "relevant_at_cutoffs_from_levels",
    "levels_from_scores",
    "average_precision",
    "precision_at_k",
    "recall_at_k",
    "pr_cutoffs",
    "retrieval_metrics",
]


def _check_ties(ties: str) -> None:
    if ties not in TIES_MODES:
        raise ValueError(f"ties must be one of {TIES_MODES}, got {ties!r}")


def tie_runs(sorted_values: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Runs of equal values along dim 1 of a row-sorted ``(Q, L)`` tensor.

    Used wherever tied scores become one level (here and in ``utils.retrieval.adc``).

    Returns:
        ``(new_run, run_end, start, end)``: bool ``(Q, L)`` flags for the first and the last
        entry of each run, and int64 ``(Q, L)`` the first and the last (inclusive) position
        of the run each entry belongs to.
    """
    q, length = sorted_values.shape
    dev = sorted_values.device
    pos = torch.arange(length, device=dev, dtype=torch.int64).expand(q, length)
    new_run = torch.ones(q, length, dtype=torch.bool, device=dev)
    new_run[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    run_end = torch.ones_like(new_run)
    run_end[:, :-1] = new_run[:, 1:]
    start = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(dim=1).values
    # Last position of each run, propagated backwards from the run's last entry.
    end = torch.where(run_end, pos, torch.full_like(pos, length)).flip(1).cummin(dim=1).values.flip(1)
    return new_run, run_end, start, end


def harmonic_numbers(n: int, device: Union[torch.device, str, None] = None) -> Tensor:
    """Harmonic numbers ``H[i] = sum_{x=1..i} 1/x`` for ``i = 0..n``.

    Returns a float64 tensor of shape ``(n + 1,)`` with ``H[0] = 0``.
    """
    h = torch.zeros(n + 1, dtype=torch.float64, device=device)
    if n > 0:
        h[1:] = torch.cumsum(1.0 / torch.arange(1, n + 1, dtype=torch.float64, device=device), 0)
    return h


def ap_from_levels(
    above: Tensor,
    tied: Tensor,
    rel: Tensor,
    num_relevant: Tensor,
    harmonic: Optional[Tensor] = None,
) -> Tensor:
    """Average precision of each query from its levels (tie-aware, closed form).

    Args:
        above, tied, rel: int64 tensors ``(Q, L)`` describing each query's levels (see the
            module docstring for the layout and invariants).
        num_relevant: ``(Q,)`` integer tensor, relevant items of each query in the database.
        harmonic: optional precomputed ``harmonic_numbers(n)`` with ``n >= max(above+tied)``.

    Returns:
        float64 tensor ``(Q,)``; 0 for queries with ``num_relevant == 0``.
    """
    a = above.to(torch.float64)
    t = tied.to(torch.float64)
    r = rel.to(torch.float64)
    # Relevant items in earlier levels (exclusive prefix sum along the row).
    b = torch.cumsum(r, dim=1) - r
    end = (above + tied).to(torch.int64)
    if harmonic is None:
        harmonic = harmonic_numbers(int(end.max().item()) if end.numel() else 0, device=above.device)
    h_diff = harmonic[end] - harmonic[above.to(torch.int64)]  # sum_{j=1..t} 1/(a+j)
    # Slope of the expected relevant count before an in-level position; 0 for singletons.
    slope = torch.where(t > 1, (r - 1.0) / (t - 1.0).clamp_min(1.0), torch.zeros_like(r))
    # sum_j (b + 1 + slope*(j-1)) / (a+j) = (b + 1 - slope*(a+1)) * h_diff + slope * t
    contrib = (r / t) * ((b + 1.0 - slope * (a + 1.0)) * h_diff + slope * t)
    contrib = torch.where(r > 0, contrib, torch.zeros_like(contrib))
    total = contrib.sum(dim=1)
    nrel = num_relevant.to(torch.float64)
    return torch.where(nrel > 0, total / nrel.clamp_min(1.0), torch.zeros_like(total))


def relevant_at_cutoffs_from_levels(above: Tensor, tied: Tensor, rel: Tensor, cutoffs: Tensor) -> Tensor:
    """Expected number of relevant items in the top ``k`` for each cut-off ``k``.

    Args:
        above, tied, rel: int64 tensors ``(Q, L)`` describing each query's levels.
        cutoffs: int64 tensor ``(C,)`` of cut-offs, each ``>= 1``.

    Returns:
        float64 tensor ``(Q, C)``.
    """
    q, length = above.shape
    if length == 0:
        return torch.zeros(q, cutoffs.numel(), dtype=torch.float64, device=above.device)
    above = above.contiguous()
    k = cutoffs.to(device=above.device, dtype=above.dtype).reshape(1, -1).expand(q, -1).contiguous()
    # Last entry whose level starts before position k, i.e. above < k.
    pos = torch.searchsorted(above, k, right=False) - 1
    has = pos >= 0
    pos = pos.clamp_min(0)
    r = rel.to(torch.float64)
    b = torch.cumsum(r, dim=1) - r
    a_j = above.gather(1, pos).to(torch.float64)
    t_j = tied.gather(1, pos).to(torch.float64)
    r_j = r.gather(1, pos)
    b_j = b.gather(1, pos)
    frac = ((k.to(torch.float64) - a_j) / t_j).clamp(0.0, 1.0)
    out = b_j + r_j * frac
    return torch.where(has, out, torch.zeros_like(out))


def levels_from_scores(scores: Tensor, relevance: Tensor, ties: str = "expected") -> Tuple[Tensor, Tensor, Tensor]:
    """Build the level rows from a dense score matrix (higher score ranks first).

    Args:
        scores: float tensor ``(Q, N)``.
        relevance: bool (or 0/1) tensor ``(Q, N)``.
        ties: ``"expected"`` or ``"stable"`` (ties broken by column index, lower first).

    Returns:
        ``(above, tied, rel)``, int64 tensors of shape ``(Q, N)`` (one entry per rank position).
    """
    _check_ties(ties)
    if scores.shape != relevance.shape or scores.dim() != 2:
        raise ValueError(f"scores and relevance must both be (Q, N); got {tuple(scores.shape)} and {tuple(relevance.shape)}")
    q, n = scores.shape
    dev = scores.device
    # A stable descending sort keeps equal scores in index order (needed for "stable").
    s_sorted, order = torch.sort(scores, dim=1, descending=True, stable=True)
    rel_sorted = relevance.to(torch.int64).gather(1, order)
    pos = torch.arange(n, device=dev, dtype=torch.int64).expand(q, n)
    if ties == "stable":
        return pos.contiguous(), torch.ones(q, n, dtype=torch.int64, device=dev), rel_sorted
    # Runs of equal scores form the levels.
    _, run_end, start, end = tie_runs(s_sorted)
    tied = end + 1 - start
    crel = torch.cumsum(rel_sorted, dim=1)
    crel_before_start = torch.where(start > 0, crel.gather(1, (start - 1).clamp_min(0)), torch.zeros_like(start))
    rel_level = torch.where(run_end, crel - crel_before_start, torch.zeros_like(crel))
    return start, tied, rel_level


def _dense_setup(scores: Tensor, relevance: Tensor, ties: str):
    above, tied, rel = levels_from_scores(scores, relevance, ties)
    nrel = relevance.to(torch.int64).sum(dim=1)
    return above, tied, rel, nrel


def average_precision(scores: Tensor, relevance: Tensor, ties: str = "expected") -> Tensor:
    """Per-query average precision over the whole ranking.

    Args:
        scores: float tensor ``(Q, N)``, higher ranks first.
        relevance: bool tensor ``(Q, N)``.
        ties: ``"expected"`` (exact expectation over random tie orders) or ``"stable"``.

    Returns:
        float64 tensor ``(Q,)``; 0 for queries without any relevant item.
    """
    above, tied, rel, nrel = _dense_setup(scores, relevance, ties)
    return ap_from_levels(above, tied, rel, nrel)


def precision_at_k(scores: Tensor, relevance: Tensor, k: int, ties: str = "expected") -> Tensor:
    """Per-query precision at ``k`` (``k`` is capped at ``N``). Returns float64 ``(Q,)``."""
    if k < 1:
        raise ValueError("k must be >= 1")
    above, tied, rel, _ = _dense_setup(scores, relevance, ties)
    kk = min(k, scores.shape[1])
    cut = torch.tensor([kk], device=scores.device)
    return relevant_at_cutoffs_from_levels(above, tied, rel, cut)[:, 0] / kk


def recall_at_k(scores: Tensor, relevance: Tensor, k: int, ties: str = "expected") -> Tensor:
    """Per-query recall at ``k``; 0 for queries without relevant items. Returns float64 ``(Q,)``."""
    if k < 1:
        raise ValueError("k must be >= 1")
    above, tied, rel, nrel = _dense_setup(scores, relevance, ties)
    cut = torch.tensor([min(k, scores.shape[1])], device=scores.device)
    got = relevant_at_cutoffs_from_levels(above, tied, rel, cut)[:, 0]
    n = nrel.to(torch.float64)
    return torch.where(n > 0, got / n.clamp_min(1.0), torch.zeros_like(got))


def pr_cutoffs(num_database: int, num_points: int = 100) -> Tensor:
    """Cut-offs for a PR curve spanning ``1..N``: half log-spaced, half linear, deduplicated.

    Returns a sorted int64 tensor ``(C,)`` with ``C <= num_points``, always containing 1 and N.
    """
    n = int(num_database)
    if n < 1:
        raise ValueError("num_database must be >= 1")
    half = max(num_points // 2, 2)
    log_pts = torch.logspace(0.0, torch.log10(torch.tensor(float(n))).item(), half, dtype=torch.float64)
    lin_pts = torch.linspace(1.0, float(n), max(num_points - half, 2), dtype=torch.float64)
    pts = torch.cat([log_pts, lin_pts]).round().clamp(1, n).to(torch.int64)
    return torch.unique(torch.cat([pts, torch.tensor([1, n])]))


def retrieval_metrics(
    scores: Tensor,
    relevance: Tensor,
    k: int = 5,
    ties: str = "expected",
    pr_points: int = 100,
) -> Dict[str, object]:
    """mAP, precision/recall at ``k`` and a PR curve from a dense score matrix.

    Args:
        scores: float tensor ``(Q, N)``, higher ranks first.
        relevance: bool tensor ``(Q, N)``.
        k: cut-off for precision/recall (capped at ``N``).
        ties: ``"expected"`` or ``"stable"``.
        pr_points: approximate number of PR-curve points.

    Returns:
        The same dict layout as ``utils.retrieval.adc.evaluate_adc`` (plain Python numbers).
    """
    above, tied, rel, nrel = _dense_setup(scores, relevance, ties)
    q, n = scores.shape
    acc = MetricAccumulator(n, k, pr_points, scores.device)
    acc.add(above, tied, rel, nrel)
    return acc.result(ties=ties, num_queries=q, skipped=int((nrel == 0).sum().item()))


class MetricAccumulator:
    """Accumulates per-query metrics from level rows, chunk by chunk, into mean values.

    Args:
        num_database: ``N``, size of the ranked database.
        k: precision/recall cut-off (capped at ``N``).
        pr_points: approximate number of PR-curve cut-offs.
        device: device of the level tensors that will be added.
    """

    def __init__(self, num_database: int, k: int, pr_points: int, device) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        self.n = int(num_database)
        self.k = int(k)
        self.k_eff = min(self.k, self.n)
        self.cutoffs = pr_cutoffs(self.n, pr_points).to(device)
        self.all_cuts = torch.cat([self.cutoffs, torch.tensor([self.k_eff], device=device)])
        self.harmonic = harmonic_numbers(self.n + 1, device=device)
        self.count = 0
        self.sum_ap = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_p = torch.zeros(self.all_cuts.numel(), dtype=torch.float64, device=device)
        self.sum_r = torch.zeros_like(self.sum_p)

    def add(self, above: Tensor, tied: Tensor, rel: Tensor, num_relevant: Tensor) -> None:
        """Add a chunk of queries; rows with ``num_relevant == 0`` are ignored."""
        keep = num_relevant > 0
        if not bool(keep.all()):
            above, tied, rel, num_relevant = above[keep], tied[keep], rel[keep], num_relevant[keep]
        if num_relevant.numel() == 0:
            return
        self.count += int(num_relevant.numel())
        self.sum_ap += ap_from_levels(above, tied, rel, num_relevant, self.harmonic).sum()
        got = relevant_at_cutoffs_from_levels(above, tied, rel, self.all_cuts)
        self.sum_p += (got / self.all_cuts.to(torch.float64)).sum(0)
        self.sum_r += (got / num_relevant.to(torch.float64).unsqueeze(1)).sum(0)

    def result(self, ties: str, num_queries: int, skipped: int) -> Dict[str, object]:
        """The mean metrics as a JSON-serialisable dict.

        When no query has a relevant database item the means are undefined: ``mAP``,
        ``precision_at_k``, ``recall_at_k`` and the PR curve are ``None`` and
        ``undefined_reason`` says why (a 0.0 would read like a real score).
        """
        undefined = self.count == 0
        c = max(self.count, 1)
        p = (self.sum_p / c).tolist()
        r = (self.sum_r / c).tolist()
        extra: Dict[str, object] = {}
        if undefined:
            p = r = [None] * len(p)
            extra["undefined_reason"] = (
                f"no query has a relevant database item (0 of {num_queries} queries can be "
                f"evaluated): mAP, precision and recall are undefined")
        return {
            "mAP": None if undefined else float(self.sum_ap.item() / c),
            "k": self.k,
            "precision_at_k": p[-1],
            "recall_at_k": r[-1],
            "pr_curve": {"precision": p[:-1], "recall": r[:-1], "cutoffs": self.cutoffs.tolist()},
            **extra,
            "ties": ties,
            "num_queries": int(num_queries),
            "num_evaluated": int(self.count),
            "skipped_queries": int(skipped),
            "num_database": self.n,
        }
