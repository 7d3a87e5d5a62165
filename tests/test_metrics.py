"""Tests of the tie-aware metric helpers in utils.retrieval.metrics against brute-force references."""
import itertools
import math

import numpy as np
import pytest
import torch


from utils.retrieval.metrics import (  # noqa: E402
    ap_from_levels,
    average_precision,
    harmonic_numbers,
    levels_from_scores,
    pr_cutoffs,
    precision_at_k,
    recall_at_k,
    relevant_at_cutoffs_from_levels,
    retrieval_metrics,
)


# ----------------------------------------------------------------------------- references


def ranked_metrics(order_rel: np.ndarray, k: int):
    """AP, P@k, R@k of one fully ordered relevance list (brute force)."""
    hits = np.nonzero(order_rel)[0] + 1  # 1-based ranks of relevant items
    nrel = len(hits)
    ap = float(np.mean(np.arange(1, nrel + 1) / hits)) if nrel else 0.0
    topk = int(order_rel[:k].sum())
    return ap, topk / min(k, len(order_rel)), (topk / nrel if nrel else 0.0)


def stable_reference(scores: np.ndarray, rel: np.ndarray, k: int):
    """Ties broken by index, lower first."""
    out = []
    for s, r in zip(scores, rel):
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        out.append(ranked_metrics(r[order], k))
    return np.array(out)


def enumerate_reference(scores: np.ndarray, rel: np.ndarray, k: int):
    """Exact expectation over all orders of tied items (tiny inputs only)."""
    out = []
    for s, r in zip(scores, rel):
        vals = sorted(set(s.tolist()), reverse=True)
        groups = [np.nonzero(s == v)[0] for v in vals]
        total = np.zeros(3)
        count = 0
        for perms in itertools.product(*[itertools.permutations(g) for g in groups]):
            order = np.concatenate([np.array(p) for p in perms])
            total += ranked_metrics(r[order], k)
            count += 1
        out.append(total / count)
    return np.array(out)


def monte_carlo_reference(scores: np.ndarray, rel: np.ndarray, k: int, trials: int, seed: int = 0):
    """Mean and standard error over random tie orders."""
    rng = np.random.default_rng(seed)
    means, ses = [], []
    for s, r in zip(scores, rel):
        samples = []
        for _ in range(trials):
            order = np.lexsort((rng.random(len(s)), -s))  # by score desc, random among ties
            samples.append(ranked_metrics(r[order], k))
        samples = np.array(samples)
        means.append(samples.mean(0))
        ses.append(samples.std(0, ddof=1) / math.sqrt(trials))
    return np.array(means), np.array(ses)


def random_case(q, n, levels, p_rel, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (q, n), generator=g).double() / levels
    rel = torch.rand(q, n, generator=g) < p_rel
    return scores, rel


def ours(scores, rel, k, ties):
    ap = average_precision(scores, rel, ties).numpy()
    p = precision_at_k(scores, rel, k, ties).numpy()
    r = recall_at_k(scores, rel, k, ties).numpy()
    return np.stack([ap, p, r], 1)


# ----------------------------------------------------------------------------- tests


def test_harmonic_numbers():
    h = harmonic_numbers(10)
    assert h[0] == 0
    assert torch.allclose(h[10], torch.tensor(sum(1.0 / i for i in range(1, 11)), dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_stable_matches_bruteforce(seed):
    scores, rel = random_case(5, 40, levels=6, p_rel=0.3, seed=seed)
    k = 7
    ref = stable_reference(scores.numpy(), rel.numpy(), k)
    np.testing.assert_allclose(ours(scores, rel, k, "stable"), ref, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_no_ties_modes_agree(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(4, 50, generator=g, dtype=torch.float64)
    rel = torch.rand(4, 50, generator=g) < 0.2
    np.testing.assert_allclose(ours(scores, rel, 5, "expected"), ours(scores, rel, 5, "stable"), atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_expected_exact_enumeration(seed):
    # Tiny rows with large tie groups: all orders can be enumerated exactly.
    scores, rel = random_case(3, 7, levels=2, p_rel=0.4, seed=seed)
    for k in (1, 3, 7):
        ref = enumerate_reference(scores.numpy(), rel.numpy(), k)
        np.testing.assert_allclose(ours(scores, rel, k, "expected"), ref, atol=1e-12)


def test_expected_monte_carlo():
    scores, rel = random_case(3, 30, levels=4, p_rel=0.3, seed=11)
    k = 8
    mean, se = monte_carlo_reference(scores.numpy(), rel.numpy(), k, trials=3000)
    got = ours(scores, rel, k, "expected")
    assert np.all(np.abs(got - mean) <= 5 * se + 1e-9), (got, mean, se)


def test_single_level_closed_form():
    # One tie group of t items with r relevant: AP = (r/t)/N * sum_j (1 + (j-1)(r-1)/(t-1)) / j.
    t, r = 9, 4
    scores = torch.zeros(1, t, dtype=torch.float64)
    rel = torch.zeros(1, t, dtype=torch.bool)
    rel[0, :r] = True
    want = (r / t) / r * sum((1 + (j - 1) * (r - 1) / (t - 1)) / j for j in range(1, t + 1))
    assert abs(average_precision(scores, rel).item() - want) < 1e-12
    # Precision at any k of a single tie group is r/t in expectation.
    for k in range(1, t + 1):
        assert abs(precision_at_k(scores, rel, k).item() - r / t) < 1e-12


def test_levels_layout():
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 1.0]])
    rel = torch.tensor([[True, False, False, True, True, False]])
    above, tied, r = levels_from_scores(scores, rel, "expected")
    assert above.tolist() == [[0, 0, 2, 3, 3, 3]]
    assert tied.tolist() == [[2, 2, 1, 3, 3, 3]]
    assert r.tolist() == [[0, 1, 1, 0, 0, 1]]
    got = relevant_at_cutoffs_from_levels(above, tied, r, torch.tensor([1, 2, 3, 4, 6]))
    np.testing.assert_allclose(got.numpy(), [[0.5, 1.0, 2.0, 2 + 1 / 3, 3.0]])


def test_no_relevant_gives_zero_not_nan_and_none_when_no_query_counts():
    scores = torch.rand(3, 10)
    rel = torch.zeros(3, 10, dtype=torch.bool)
    rel[1, 4] = True
    ap = average_precision(scores, rel)
    assert torch.isfinite(ap).all() and ap[0] == 0 and ap[2] == 0
    assert torch.isfinite(recall_at_k(scores, rel, 3)).all()
    res = retrieval_metrics(scores, rel, k=3)
    assert res["skipped_queries"] == 2 and res["num_evaluated"] == 1
    assert math.isclose(res["mAP"], ap[1].item())
    rel[:] = False
    res = retrieval_metrics(scores, rel, k=3)
    # Undefined, not 0.0 (which reads like a real score); the reason is in the result.
    assert res["mAP"] is None and res["skipped_queries"] == 3
    assert res["precision_at_k"] is None and res["recall_at_k"] is None
    assert all(x is None for x in res["pr_curve"]["precision"])
    assert "no query has a relevant database item" in res["undefined_reason"]


def test_ap_from_levels_padding():
    # Padding entries (above = N, tied = 1, rel = 0) do not change the result.
    above = torch.tensor([[0, 2, 5, 5]])
    tied = torch.tensor([[2, 3, 1, 1]])
    rel = torch.tensor([[1, 2, 0, 0]])
    a1 = ap_from_levels(above, tied, rel, torch.tensor([3]))
    a2 = ap_from_levels(above[:, :2], tied[:, :2], rel[:, :2], torch.tensor([3]))
    assert torch.allclose(a1, a2)


def test_pr_cutoffs():
    c = pr_cutoffs(100000, 100)
    assert c[0] == 1 and c[-1] == 100000 and 50 <= c.numel() <= 102
    assert torch.all(c[1:] > c[:-1])
    assert pr_cutoffs(1).tolist() == [1]


def test_k_larger_than_database():
    scores = torch.tensor([[0.3, 0.2, 0.1]])
    rel = torch.tensor([[True, False, True]])
    assert math.isclose(precision_at_k(scores, rel, 10, "stable").item(), 2 / 3)
    assert math.isclose(recall_at_k(scores, rel, 10, "stable").item(), 1.0)
