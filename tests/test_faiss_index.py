"""Tests of the FAISS IndexPQ export (utils.retrieval.faiss_index) against search_adc."""

import numpy as np
import pytest
import torch


faiss = pytest.importorskip("faiss")

from utils.retrieval.faiss_index import (  # noqa: E402
    build_faiss_index,
    load_faiss_index,
    pack_codes,
    save_faiss_index,
    search_faiss,
    soft_quantized_queries,
)
from utils.retrieval.adc import search_adc  # noqa: E402


def orthonormal_codebooks(m, d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(m, d, d, generator=g, dtype=torch.float64)).Q
    return q[:, :, :k].float().contiguous()


def opqn_case(m=4, d=16, k=16, n=500, q=6, distinct=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebooks = orthonormal_codebooks(m, d, k, seed)
    if distinct is None:
        codes = torch.randint(0, k, (n, m), generator=g)
    else:  # few distinct codes -> many exact ties
        base = torch.randint(0, k, (distinct, m), generator=g)
        codes = base[torch.randint(0, distinct, (n,), generator=g)]
    tables = torch.softmax(3 * torch.randn(q, m, k, generator=g), dim=2)
    return codebooks, codes.to(torch.uint8), tables


def assert_same_topk(s_f, i_f, tables, codes, atol=1e-5):
    topk = s_f.shape[1]
    # One extra result tells whether the last position is tied with an item left out.
    s_ext, i_ext = search_adc(tables, codes, topk + 1)
    s_o, i_o = s_ext[:, :topk], i_ext[:, :topk]
    np.testing.assert_allclose(s_f.numpy(), s_o.numpy(), atol=atol)
    # Exact ADC scores of what faiss returned must match the scores it reported.
    c = codes.long()
    checked = 0
    for qi in range(tables.shape[0]):
        exact = tables[qi][torch.arange(c.shape[1]), c[i_f[qi]]].sum(1)
        np.testing.assert_allclose(exact.numpy(), s_f[qi].numpy(), atol=atol)
        # Indices must agree wherever the score is not (nearly) tied with another result.
        s = s_ext[qi]
        gap = s[:-1] - s[1:]
        gap_prev = torch.cat([torch.tensor([float("inf")]), gap[:-1]])
        gap_next = gap
        clear = (gap_prev > atol) & (gap_next > atol)
        assert torch.equal(i_f[qi][clear], i_o[qi][clear])
        checked += int(clear.sum())
    return checked


@pytest.mark.parametrize("k,m", [(16, 4), (64, 3), (256, 2)])
def test_pack_codes_roundtrip(k, m):
    codebooks, codes, _ = opqn_case(m=m, d=k, k=k, n=50)
    nbits = k.bit_length() - 1
    packed = pack_codes(codes, nbits)
    index = build_faiss_index(codebooks, codes)
    assert packed.shape == (50, index.code_size)
    recon = index.sa_decode(packed)
    want = codebooks.permute(0, 2, 1)[torch.arange(m), codes.long()].reshape(50, -1)
    np.testing.assert_allclose(recon, want.numpy(), atol=1e-6)
    assert index.ntotal == 50 and index.is_trained


def test_soft_quantized_inner_product_equals_adc():
    codebooks, codes, tables = opqn_case()
    x = soft_quantized_queries(tables, codebooks)
    items = codebooks.permute(0, 2, 1)[torch.arange(4), codes.long()].reshape(codes.shape[0], -1)
    ip = x @ items.t()
    c = codes.long()
    adc = sum(tables[:, b][:, c[:, b]] for b in range(4))
    assert torch.allclose(ip, adc, atol=1e-5)


@pytest.mark.parametrize("distinct", [None, 25])
def test_faiss_topk_matches_search_adc(distinct):
    codebooks, codes, tables = opqn_case(distinct=distinct)
    index = build_faiss_index(codebooks, codes)
    s_f, i_f = search_faiss(index, tables, codebooks, 20)
    assert s_f.shape == (6, 20) and i_f.dtype == torch.int64
    checked = assert_same_topk(s_f, i_f, tables, codes)
    if distinct is None:
        assert checked > 60  # most positions are untied and compared by index


def test_save_load_roundtrip(tmp_path):
    codebooks, codes, tables = opqn_case(k=64, d=64, m=3, n=300)
    index = build_faiss_index(codebooks, codes)
    path = tmp_path / "opqn.faiss"
    save_faiss_index(index, path)
    loaded = load_faiss_index(path)
    assert loaded.ntotal == 300
    s1, i1 = search_faiss(index, tables, codebooks, 10)
    s2, i2 = search_faiss(loaded, tables, codebooks, 10)
    assert torch.equal(s1, s2) and torch.equal(i1, i2)


def test_chunked_add_and_checks():
    codebooks, codes, tables = opqn_case(n=130)
    a = build_faiss_index(codebooks, codes)
    b = build_faiss_index(codebooks, codes, chunk=17)
    assert np.array_equal(faiss.vector_to_array(a.codes), faiss.vector_to_array(b.codes))
    with pytest.raises(ValueError):
        build_faiss_index(codebooks[:, :, :12], codes)  # K not a power of two
    with pytest.raises(ValueError):
        build_faiss_index(codebooks, codes[:, :3])
