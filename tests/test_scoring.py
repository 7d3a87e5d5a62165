"""utils.retrieval.scoring: the asymmetric score, and the engine's fast paths against it."""
import pytest
import torch

from utils.retrieval.adc import evaluate_adc, search_adc
from utils.retrieval.metrics import retrieval_metrics
from utils.retrieval.scoring import score


def brute_force(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The definition, item by item and book by book, in float64."""
    q, m, _ = tables.shape
    out = torch.zeros(q, codes.shape[0], dtype=torch.float64)
    for i in range(q):
        for n in range(codes.shape[0]):
            out[i, n] = sum(float(tables[i, j, int(codes[n, j])]) for j in range(m))
    return out


def case(seed: int = 0, q: int = 7, n: int = 300, m: int = 4, k: int = 8):
    gen = torch.Generator().manual_seed(seed)
    tables = torch.randn(q, m, k, generator=gen).softmax(-1)
    codes = torch.randint(0, k, (n, m), generator=gen, dtype=torch.uint8)
    codes[50:90] = codes[3]  # many items share a code: exact ties
    return tables, codes


def test_score_is_the_sum_of_table_entries():
    tables, codes = case(n=40)
    got = score(tables, codes)
    assert got.shape == (7, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), brute_force(tables, codes), rtol=0, atol=1e-6)


def test_score_promotes_half_tables_and_checks_its_input():
    tables, codes = case(n=10)
    assert score(tables.bfloat16(), codes).dtype == torch.float32
    with pytest.raises(ValueError, match="books"):
        score(tables, codes[:, :3])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        score(tables, codes.long() + 8)
    with pytest.raises(TypeError, match="integer"):
        score(tables, codes.float())
    with pytest.raises(ValueError, match="NaN"):
        score(tables.masked_fill(tables > 0.5, float("nan")), codes)


@pytest.mark.parametrize("seed", [0, 1])
def test_search_adc_returns_the_top_of_score(seed):
    tables, codes = case(seed)
    full = score(tables, codes)
    values, index = search_adc(tables, codes, 25, budget_bytes=1 << 14)  # many blocks
    assert torch.equal(values, full.sort(dim=1, descending=True).values[:, :25])
    assert torch.equal(full.gather(1, index), values)  # bit-identical, not merely close


@pytest.mark.parametrize("ties", ["expected", "stable"])
def test_evaluate_adc_equals_metrics_of_the_dense_score(ties):
    tables, codes = case(2)
    gen = torch.Generator().manual_seed(3)
    db_labels = torch.randint(0, 5, (codes.shape[0],), generator=gen)
    q_labels = torch.randint(0, 5, (tables.shape[0],), generator=gen)
    got = evaluate_adc(tables, codes, q_labels, db_labels, k=10, ties=ties,
                       budget_bytes=1 << 14)
    want = retrieval_metrics(score(tables, codes), q_labels[:, None] == db_labels[None, :],
                             k=10, ties=ties)
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-9)
    assert got["precision_at_k"] == pytest.approx(want["precision_at_k"], abs=1e-9)
