"""Tests of utils.retrieval.adc (ADC evaluation and top-k search) against brute-force references."""
import json
import math

import numpy as np
import pytest
import torch


from utils.retrieval.metrics import retrieval_metrics  # noqa: E402
from utils.retrieval.adc import evaluate_adc, search_adc  # noqa: E402


# ----------------------------------------------------------------------------- helpers


def dense_scores(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(Q, N) ADC scores, summed over books in order (same float ops as the engine)."""
    c = codes.long()
    s = tables[:, 0][:, c[:, 0]].clone()
    for m in range(1, c.shape[1]):
        s += tables[:, m][:, c[:, m]]
    return s


def ranked(order_rel: np.ndarray, k: int):
    hits = np.nonzero(order_rel)[0] + 1
    nrel = len(hits)
    ap = float(np.mean(np.arange(1, nrel + 1) / hits))
    topk = int(order_rel[:k].sum())
    return ap, topk / k, topk / nrel


def reference(scores, qlab, dlab, k, ties, trials=2000, seed=0):
    """Brute-force metrics over queries with relevant items: stable sort, or the Monte-Carlo
    mean (and standard error) over random tie orders."""
    rng = np.random.default_rng(seed)
    s_all, ql, dl = scores.double().numpy(), qlab.numpy(), dlab.numpy()
    means, ses = [], []
    for s, y in zip(s_all, ql):
        rel = dl == y
        if not rel.any():
            continue
        if ties == "stable":
            order = np.lexsort((np.arange(len(s)), -s))
            means.append(ranked(rel[order], k))
            ses.append((0.0, 0.0, 0.0))
            continue
        samples = np.array([ranked(rel[np.lexsort((rng.random(len(s)), -s))], k) for _ in range(trials)])
        means.append(samples.mean(0))
        ses.append(samples.std(0, ddof=1) / math.sqrt(trials))
    means, ses = np.array(means), np.array(ses)
    # Standard error of the mean over queries.
    return means.mean(0), np.sqrt((ses ** 2).sum(0)) / len(means)


def tied_case(q=6, n=80, m=3, kw=4, classes=5, quantize=True, seed=0):
    """Few distinct codes (identical-code ties) and, with ``quantize``, table values on a coarse
    grid so that different codes also tie exactly."""
    g = torch.Generator().manual_seed(seed)
    if quantize:
        tables = torch.randint(0, 3, (q, m, kw), generator=g).float() / 4
    else:
        tables = torch.rand(q, m, kw, generator=g)
    codes = torch.randint(0, kw, (n, m), generator=g).to(torch.uint8)
    dlab = torch.randint(0, classes, (n,), generator=g)
    qlab = torch.randint(0, classes, (q,), generator=g)
    return tables, codes, qlab, dlab


def as_vec(res):
    return np.array([res["mAP"], res["precision_at_k"], res["recall_at_k"]])


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("quantize", [False, True])
def test_stable_matches_bruteforce(seed, quantize):
    tables, codes, qlab, dlab = tied_case(quantize=quantize, seed=seed)
    res = evaluate_adc(tables, codes, qlab, dlab, k=5, ties="stable")
    ref, _ = reference(dense_scores(tables, codes), qlab, dlab, 5, "stable")
    np.testing.assert_allclose(as_vec(res), ref, atol=1e-12)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("quantize", [False, True])
def test_expected_matches_monte_carlo(seed, quantize):
    tables, codes, qlab, dlab = tied_case(quantize=quantize, seed=seed)
    res = evaluate_adc(tables, codes, qlab, dlab, k=5, ties="expected")
    mean, se = reference(dense_scores(tables, codes), qlab, dlab, 5, "expected", trials=1500, seed=seed)
    assert np.all(np.abs(as_vec(res) - mean) <= 5 * se + 1e-9), (as_vec(res), mean, se)


@pytest.mark.parametrize("ties", ["expected", "stable"])
@pytest.mark.parametrize("quantize", [False, True])
def test_matches_dense_metrics_including_pr_curve(ties, quantize):
    tables, codes, qlab, dlab = tied_case(q=9, n=120, quantize=quantize, seed=5)
    res = evaluate_adc(tables, codes, qlab, dlab, k=7, ties=ties, pr_points=20)
    scores = dense_scores(tables, codes)
    dense = retrieval_metrics(scores, qlab[:, None] == dlab[None, :], k=7, ties=ties, pr_points=20)
    assert res["pr_curve"]["cutoffs"] == dense["pr_curve"]["cutoffs"]
    for key in ("mAP", "precision_at_k", "recall_at_k"):
        assert math.isclose(res[key], dense[key], abs_tol=1e-12), key
    np.testing.assert_allclose(res["pr_curve"]["precision"], dense["pr_curve"]["precision"], atol=1e-12)
    np.testing.assert_allclose(res["pr_curve"]["recall"], dense["pr_curve"]["recall"], atol=1e-12)


def test_result_layout_is_json():
    tables, codes, qlab, dlab = tied_case(seed=1)
    res = evaluate_adc(tables, codes, qlab, dlab, k=3)
    json.dumps(res)
    for key in ("mAP", "precision_at_k", "recall_at_k", "k", "pr_curve", "skipped_queries", "ties",
                "num_queries", "num_database"):
        assert key in res
    pr = res["pr_curve"]
    assert len(pr["precision"]) == len(pr["recall"]) == len(pr["cutoffs"])
    assert pr["cutoffs"][0] == 1 and pr["cutoffs"][-1] == codes.shape[0]
    assert math.isclose(pr["recall"][-1], 1.0)
    assert res["ties"] == "expected" and res["num_database"] == codes.shape[0]


def test_skipped_queries():
    tables, codes, qlab, dlab = tied_case(seed=2)
    qlab = qlab.clone()
    qlab[0] = 100  # labels absent from the database
    qlab[3] = -7
    for ties in ("expected", "stable"):
        res = evaluate_adc(tables, codes, qlab, dlab, ties=ties)
        assert res["skipped_queries"] == 2 and res["num_queries"] == 6
        ref, _ = reference(dense_scores(tables, codes), qlab, dlab, 5, "stable")
        if ties == "stable":
            np.testing.assert_allclose(as_vec(res), ref, atol=1e-12)
        assert all(math.isfinite(v) for v in as_vec(res))
    res = evaluate_adc(tables, codes, torch.full((6,), 99), dlab)
    assert res["skipped_queries"] == 6 and res["mAP"] is None
    assert "no query has a relevant database item" in res["undefined_reason"]


@pytest.mark.parametrize("ties", ["expected", "stable"])
def test_chunked_equals_unchunked(ties):
    tables, codes, qlab, dlab = tied_case(q=11, n=150, m=3, kw=8, seed=3)
    big = evaluate_adc(tables, codes, qlab, dlab, k=4, ties=ties)
    small = evaluate_adc(tables, codes, qlab, dlab, k=4, ties=ties, budget_bytes=3000)
    for key in ("mAP", "precision_at_k", "recall_at_k"):
        assert math.isclose(big[key], small[key], abs_tol=1e-12)
    np.testing.assert_allclose(big["pr_curve"]["precision"], small["pr_curve"]["precision"], atol=1e-12)


def test_code_dtypes_and_wide_codes():
    tables, codes, qlab, dlab = tied_case(seed=4)
    a = evaluate_adc(tables, codes, qlab, dlab)
    b = evaluate_adc(tables, codes.long(), qlab, dlab)
    assert a.keys() == b.keys()
    for key in ("mAP", "precision_at_k", "recall_at_k"):
        assert math.isclose(a[key], b[key], abs_tol=1e-12)
    # 8 x 256 (64-bit codes) cannot be packed into one int64 key: the row-unique path.
    g = torch.Generator().manual_seed(0)
    tables = torch.rand(4, 8, 256, generator=g)
    base = torch.randint(0, 256, (10, 8), generator=g)
    codes = base[torch.randint(0, 10, (200,), generator=g)].to(torch.uint8)
    dlab = torch.randint(0, 3, (200,), generator=g)
    qlab = torch.randint(0, 3, (4,), generator=g)
    for ties in ("expected", "stable"):
        res = evaluate_adc(tables, codes, qlab, dlab, ties=ties)
        dense = retrieval_metrics(dense_scores(tables, codes), qlab[:, None] == dlab[None], k=5, ties=ties)
        assert math.isclose(res["mAP"], dense["mAP"], abs_tol=1e-12)


def test_half_tables_and_input_checks():
    tables, codes, qlab, dlab = tied_case(seed=6)
    res = evaluate_adc(tables.half(), codes, qlab, dlab)
    assert math.isfinite(res["mAP"])
    with pytest.raises(ValueError):
        evaluate_adc(tables, codes.long() + 4, qlab, dlab)
    bad = tables.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        evaluate_adc(bad, codes, qlab, dlab)
    with pytest.raises(ValueError):
        evaluate_adc(tables, codes, qlab, dlab, ties="random")


def test_all_tied_stable_fallback():
    # Every item has the same score: the stable order is the index order.
    q, n = 3, 30
    tables = torch.zeros(q, 2, 4)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (n, 2), generator=g)
    dlab = torch.randint(0, 3, (n,), generator=g)
    qlab = torch.tensor([0, 1, 2])
    res = evaluate_adc(tables, codes, qlab, dlab, ties="stable")
    ref, _ = reference(dense_scores(tables, codes), qlab, dlab, 5, "stable")
    np.testing.assert_allclose(as_vec(res), ref, atol=1e-12)
    # Expected: one tie group; P@k = class fraction.
    res = evaluate_adc(tables, codes, qlab, dlab, ties="expected")
    frac = np.mean([(dlab == y).double().mean().item() for y in qlab])
    assert math.isclose(res["precision_at_k"], frac, abs_tol=1e-12)


# ----------------------------------------------------------------------------- search


def check_topk(tables, codes, topk, budget=None):
    kw = {} if budget is None else {"budget_bytes": budget}
    s, i = search_adc(tables, codes, topk, **kw)
    dense = dense_scores(tables, codes)
    ref_s = torch.topk(dense, min(topk, codes.shape[0]), dim=1).values
    n = min(topk, codes.shape[0])
    assert torch.equal(s[:, :n], ref_s)
    # The returned indices carry the returned scores.
    assert torch.equal(dense.gather(1, i[:, :n]), s[:, :n])
    for row in i[:, :n]:
        assert row.unique().numel() == n
    return s, i


def test_search_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    tables = torch.rand(5, 4, 16, generator=g)
    codes = torch.randint(0, 16, (300, 4), generator=g).to(torch.uint8)
    s, i = check_topk(tables, codes, 10)
    # Without ties the indices equal a stable full sort's.
    order = torch.sort(dense_scores(tables, codes), dim=1, descending=True, stable=True).indices[:, :10]
    assert torch.equal(i, order)


def test_search_ties_chunked_and_padding():
    tables, codes, _, _ = tied_case(q=5, n=60, seed=7)
    check_topk(tables, codes, 25)
    check_topk(tables, codes, 25, budget=2000)  # blocks over queries and codes
    s, i = search_adc(tables, codes, 70)  # more than N
    assert (i[:, 60:] == -1).all() and torch.isinf(s[:, 60:]).all()
    # Items sharing one code come out by ascending index.
    s, i = search_adc(tables, codes, 60)
    dense = dense_scores(tables, codes)
    for qi in range(5):
        for code in codes.long().unique(dim=0):
            same = (codes.long() == code).all(1)
            pos = torch.nonzero(same[i[qi]]).flatten()
            assert torch.all(torch.diff(i[qi, pos]) > 0)
    assert torch.equal(dense.gather(1, i), s)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("ties", ["expected", "stable"])
def test_cuda_matches_cpu(ties):
    tables, codes, qlab, dlab = tied_case(q=9, n=200, quantize=True, seed=8)
    cpu = evaluate_adc(tables, codes, qlab, dlab, ties=ties)
    gpu = evaluate_adc(tables.cuda(), codes.cuda(), qlab.cuda(), dlab.cuda(), ties=ties)
    for key in ("mAP", "precision_at_k", "recall_at_k"):
        assert math.isclose(cpu[key], gpu[key], abs_tol=1e-9), key
    np.testing.assert_allclose(cpu["pr_curve"]["precision"], gpu["pr_curve"]["precision"], atol=1e-9)
    small = evaluate_adc(tables.cuda(), codes.cuda(), qlab.cuda(), dlab.cuda(), ties=ties, budget_bytes=3000)
    assert math.isclose(small["mAP"], gpu["mAP"], abs_tol=1e-9)
    s, i = search_adc(tables.cuda(), codes.cuda(), 10)
    assert s.is_cuda and i.is_cuda
    s_cpu, _ = search_adc(tables, codes, 10)
    assert torch.allclose(s.cpu(), s_cpu)


# ----------------------------------------------------------------------------- engine internals


@pytest.mark.parametrize("ties", ["expected", "stable"])
@pytest.mark.parametrize("buckets", [1, 3, 4096])
def test_any_bucket_count_gives_exact_metrics(monkeypatch, ties, buckets):
    # The histogram only has to be monotone: with 1 bucket every code is placed exactly,
    # with few most are counted by bucket.  Negative scores, many codes tying across codes.
    import utils.retrieval.adc as retrieval
    import utils.retrieval.blocks as blocks

    monkeypatch.setattr(retrieval, "_NUM_BUCKETS", buckets)
    monkeypatch.setattr(blocks, "MIN_BLOCK_U", 16)
    g = torch.Generator().manual_seed(buckets)
    tables = torch.randint(-3, 3, (13, 3, 8), generator=g).float() / 4
    base = torch.randint(0, 8, (60, 3), generator=g)
    codes = base[torch.randint(0, 60, (700,), generator=g)]
    dlab = torch.randint(0, 9, (700,), generator=g)
    qlab = torch.randint(0, 9, (13,), generator=g)
    res = evaluate_adc(tables, codes, qlab, dlab, k=6, ties=ties, budget_bytes=4000)
    dense = retrieval_metrics(dense_scores(tables, codes), qlab[:, None] == dlab[None], k=6, ties=ties)
    for key in ("mAP", "precision_at_k", "recall_at_k"):
        assert math.isclose(res[key], dense[key], abs_tol=1e-12), key
    np.testing.assert_allclose(res["pr_curve"]["precision"], dense["pr_curve"]["precision"], atol=1e-12)


def test_stable_near_one_hot_tables_match_dense():
    # Near-one-hot tables: most codes tie with other codes at a few score levels (the case
    # that used to fall back to a full sort per query).
    g = torch.Generator().manual_seed(7)
    tables = torch.zeros(16, 4, 16)
    tables.scatter_(2, torch.randint(0, 16, (16, 4, 1), generator=g), 1.0)
    codes = torch.randint(0, 16, (3000, 4), generator=g)
    dlab = torch.randint(0, 5, (3000,), generator=g)
    qlab = torch.randint(0, 5, (16,), generator=g)
    res = evaluate_adc(tables, codes, qlab, dlab, k=10, ties="stable")
    ref, _ = reference(dense_scores(tables, codes), qlab, dlab, 10, "stable")
    np.testing.assert_allclose(as_vec(res), ref, atol=1e-12)


def test_block_floors_and_memory_scaling():
    from utils.retrieval.blocks import block_sizes as _block_sizes

    cpu = torch.device("cpu")
    qb, bu = _block_sizes(100, 50_000, 10**6, 1000, cpu, 64)
    assert qb == 1 and bu >= 2048  # a tiny budget never shrinks blocks to single codes
    qb, bu = _block_sizes(100, 5_000, 8 * 5000 * 16, 256 << 20, cpu, 64, whole_rows=True)
    assert bu == 5_000  # search: whole rows
    assert _block_sizes(1000, 10**6, 10_000, 1 << 26, torch.device("cuda"), 64)[0] > \
        _block_sizes(1000, 10**6, 100_000, 1 << 26, torch.device("cuda"), 64)[0]


def test_thread_setting_restored_for_new_threads():
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tables, codes, qlab, dlab = tied_case(q=300, n=400, seed=1)
        evaluate_adc(tables, codes, qlab, dlab)
        search_adc(tables, codes, 5)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert torch.get_num_threads() == 2 and seen == [2]
    finally:
        torch.set_num_threads(before)
