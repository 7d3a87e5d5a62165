import math

import pytest
import torch
import torch.nn.functional as F

from models import RetrievalNet, NetConfig, OPQNHead, choose_feature_dim


@pytest.fixture
def quantizer():
    torch.manual_seed(0)
    return OPQNHead(feature_dim=48, num_books=4, num_words=8)


def test_shapes_and_soft_quantization(quantizer):
    x = torch.randn(5, 48)
    sub, soft, probs = quantizer(x)
    assert sub.shape == soft.shape == (5, 4, 12) and probs.shape == (5, 4, 8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, 4))
    expected = torch.softmax(torch.einsum("bmd,mdk->bmk", sub, quantizer.assignment), -1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(soft[2, 1], quantizer.codebooks[1] @ probs[2, 1])


def test_encoding_is_the_argmax_of_the_soft_assignment(quantizer):
    x = torch.randn(64, 48)
    codes = quantizer.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == (64, 4)
    _, _, probs = quantizer(x)
    assert torch.equal(codes.long(), probs.argmax(-1))
    # Normalising the sub-vectors does not change the codes.
    normalised = F.normalize(x.reshape(64, 4, 12), dim=-1).reshape(64, 48)
    assert torch.equal(quantizer.encode(normalised), codes)


def test_query_score_equals_inner_product_with_codewords(quantizer):
    queries, items = torch.randn(7, 48), torch.randn(30, 48)
    tables = quantizer.lookup_tables(queries)
    codes = quantizer.encode(items).long()
    lookup = torch.stack([tables[:, m, codes[:, m]] for m in range(4)]).sum(0)  # (7, 30)
    inner = quantizer.soft_quantize_tables(tables) @ quantizer.decode(codes).T
    torch.testing.assert_close(lookup, inner, atol=1e-5, rtol=0)


def test_query_tables_normalise_the_sub_vectors(quantizer):
    q = torch.randn(3, 48)
    torch.testing.assert_close(quantizer.lookup_tables(q), quantizer.lookup_tables(q * 7.5))
    sub = F.normalize(q.reshape(3, 4, 12), dim=-1)
    expected = torch.softmax(torch.einsum("bmd,mdk->bmk", sub, quantizer.assignment), -1)
    torch.testing.assert_close(quantizer.lookup_tables(q), expected)


def test_codebooks_are_fixed_and_assignment_trains(quantizer):
    names = {n for n, _ in quantizer.named_parameters()}
    assert names == {"assignment"}
    assert "codebooks" in dict(quantizer.named_buffers())


def test_code_dtype_grows_past_256_words():
    q = OPQNHead(feature_dim=1024, num_books=2, num_words=512)
    assert q.encode(torch.randn(3, 1024)).dtype == torch.int16
    assert q.bits == 18


@pytest.mark.parametrize("m,k,size,expected", [
    (6, 64, 32, 516), (4, 64, 32, 512), (2, 256, 32, 512), (4, 256, 32, 1024),
    (8, 256, 112, 2048), (8, 64, 32, 512)])
def test_feature_dimension_rule(m, k, size, expected):
    dim = choose_feature_dim(m, k, size)
    assert dim == expected and dim % m == 0 and dim // m >= k


def test_full_model_runs_both_input_sizes():
    for size in (32, 112):
        cfg = NetConfig(num_books=2, num_words=16, feature_dim=64, num_classes=3,
                         input_size=size, width=4)
        model = RetrievalNet(cfg).eval()
        assert model(torch.randn(2, 3, size, size)).shape == (2, 64)
        assert cfg.bits == 2 * int(math.log2(16))


def test_code_dtype_boundaries():
    from models import code_dtype

    assert code_dtype(256) == torch.uint8 and code_dtype(257) == torch.int16
    assert code_dtype(2**15) == torch.int16 and code_dtype(2**15 + 1) == torch.int32


def test_quantizer_argument_checks():
    assert OPQNHead(feature_dim=8, num_books=1, num_words=4).bits == 2
    for dim, books in ((8, 0), (10, 4)):
        with pytest.raises(ValueError, match="must be divisible by num_books"):
            OPQNHead(feature_dim=dim, num_books=books, num_words=2)


def test_config_round_trip_and_model_wiring():
    cfg = NetConfig(num_books=2, num_words=16, feature_dim=64, num_classes=3, input_size=32,
                     width=4)
    data = cfg.to_dict()
    assert data["bits"] == 8 and data["width"] == 4
    assert NetConfig.from_dict({**data, "unknown": 1}) == cfg  # extra keys are ignored
    model = RetrievalNet(cfg)
    assert model.config is cfg and model.backbone.width == 4
    assert model.backbone.input_size == 32 and model.backbone.feature_dim == 64
    assert (model.quantizer.num_books, model.quantizer.num_words) == (2, 16)


def test_feature_dimension_at_112_is_m_times_k_even_when_small():
    assert choose_feature_dim(2, 16, 112) == 32 and choose_feature_dim(2, 16, 32) == 512
