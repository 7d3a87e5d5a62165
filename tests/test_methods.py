"""The compared methods (--method): each head's ADC score equals a direct computation, the
faiss export scores like the engine, the losses do what the papers say, and DCDH's
tie-aware mAP equals the brute-force expectation over random tie orders."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from models.methods import DCDHLoss, DPQLoss, GPQLoss, OPQNLoss, build_loss
from models.methods.dcdh import discrete_targets
from models import RetrievalNet, NetConfig
from models.methods import build_head, method_names
from utils.retrieval.metrics import average_precision
from utils.retrieval.adc import evaluate_adc, search_adc
from utils.cli import validation

METHODS = method_names()

D, M, K = 24, 3, 16  # K > d = 8 on purpose: only opqn needs K <= d
L = 10


def make_head(method: str, seed: int = 0):
    torch.manual_seed(seed)
    if method == "dcdh":
        config = NetConfig(num_books=L, num_words=2, feature_dim=L, num_classes=4,
                            method=method)
    else:
        config = NetConfig(num_books=M, num_words=8 if method == "opqn" else K,
                            feature_dim=D, num_classes=4, method=method)
    return build_head(config)


def engine_scores(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """All (Q, N) scores as the ADC engine's search returns them, back in item order."""
    scores, index = search_adc(tables, codes, codes.shape[0])
    full = torch.empty_like(scores)
    full.scatter_(1, index, scores)
    return full


def direct_scores(method: str, head, queries: torch.Tensor, items: torch.Tensor):
    """The paper's score of every (query, item) pair, computed without the ADC tables."""
    q_sub = queries.reshape(queries.shape[0], head.num_books, -1)
    codes = head.encode(items).long()
    if method == "dcdh":
        hamming = ((queries >= 0)[:, None, :] != (items >= 0)[None, :, :]).sum(-1)
        return (L - hamming).float()
    if method == "gpq":
        words = head.codewords.detach()  # (M, d, K); cosines are scale-free
        chosen = torch.stack([words[m, :, codes[:, m]].T for m in range(M)], 1)  # (N, M, d)
        cos = F.cosine_similarity(q_sub[:, None], chosen[None], dim=-1)  # (Q, N, M)
        return cos.sum(-1)
    books = head.codebooks.detach()
    if method == "dpq" or getattr(head, "query_side", None) == "raw":
        probs = torch.softmax(torch.einsum("qmd,mdk->qmk", q_sub, head.assignment), -1)
    else:  # opqn, and l2q --l2q-query normalized, normalise the query first
        probs = torch.softmax(torch.einsum("qmd,mdk->qmk", F.normalize(q_sub, dim=-1),
                                           head.assignment), -1)
    soft = torch.einsum("mdk,qmk->qmd", books, probs)  # (Q, M, d)
    chosen = torch.stack([books[m, :, codes[:, m]].T for m in range(M)], 1)  # (N, M, d)
    if method == "opqn":  # orthonormal words: inner product with the item's codewords
        return torch.einsum("qmd,nmd->qn", soft, chosen)
    return -((soft[:, None] - chosen[None]) ** 2).sum((-1, -2))


@pytest.mark.parametrize("method", [*METHODS, "l2q-normalized"])
def test_engine_score_equals_direct_computation(method):
    if method == "l2q-normalized":
        method, head = "l2q", make_head("l2q")
        head.query_side = "normalized"
    else:
        head = make_head(method)
    head.eval()
    dim = L if method == "dcdh" else D
    g = torch.Generator().manual_seed(1)
    items, queries = torch.randn(40, dim, generator=g), torch.randn(5, dim, generator=g)
    codes, tables = head.encode(items), head.query_tables(queries)
    assert codes.dtype == torch.uint8 and codes.shape == (40, head.num_books)
    assert tables.dtype == torch.float32
    assert tables.shape == (5, head.num_books, head.num_words)
    torch.testing.assert_close(engine_scores(tables, codes),
                               direct_scores(method, head, queries, items),
                               atol=1e-4, rtol=1e-5)


def test_query_side_normalisation_per_method():
    """opqn and gpq score a query by direction only; dpq and l2q (by default) use the raw
    sub-vector, as their training does; --l2q-query normalized is the authors' evaluator."""
    q = torch.randn(3, D)
    for method in ("opqn", "gpq"):
        head = make_head(method)
        torch.testing.assert_close(head.query_tables(q), head.query_tables(4.0 * q))
    for method in ("dpq", "l2q"):
        head = make_head(method)
        assert head.query_side == "raw"
        assert not torch.allclose(head.query_tables(q), head.query_tables(4.0 * q))
    l2q = build_head(NetConfig(num_books=M, num_words=K, feature_dim=D, num_classes=4,
                                method="l2q", params={"l2q_query": "normalized"}))
    torch.testing.assert_close(l2q.query_tables(q), l2q.query_tables(4.0 * q))
    with pytest.raises(ValueError, match="l2q_query 'unit'"):
        build_head(NetConfig(num_books=M, num_words=K, feature_dim=D, num_classes=4,
                              method="l2q", params={"l2q_query": "unit"}))


def test_checkpoints_from_before_the_l2q_and_dpq_flags_keep_their_form():
    """Old l2q checkpoints were scored with the normalised query: they keep that score. Old
    DPQ checkpoints record the standard-normal V_m they started from."""
    base = dict(num_books=M, num_words=K, feature_dim=D, num_classes=4)
    old = NetConfig.from_dict({**base, "method": "l2q"})
    assert old.params.l2q_query == "normalized" and build_head(old).query_side == "normalized"
    assert NetConfig(**base, method="l2q").params.l2q_query == "raw"
    stored = NetConfig.from_dict({**base, "method": "l2q", "l2q_query": "raw"})
    assert stored.params.l2q_query == "raw"
    dpq = NetConfig.from_dict({**base, "method": "dpq", "l2q_query": "normalized"})
    assert dpq.params.dpq_init == "normal" and "l2q_query" not in dpq.to_dict()
    assert NetConfig(**base, method="dpq").params.dpq_init == "xavier"


@pytest.mark.parametrize("method", METHODS)
def test_faiss_scores_equal_the_engine(method):
    pytest.importorskip("faiss")
    from utils.retrieval.faiss_index import build_head_index, search_head_index

    head = make_head(method).eval()
    dim = L if method == "dcdh" else D
    g = torch.Generator().manual_seed(2)
    items, queries = torch.randn(60, dim, generator=g), torch.randn(4, dim, generator=g)
    codes = head.encode(items)
    index = build_head_index(head, codes)
    scores, ids = search_head_index(index, head, queries, 60)
    full = engine_scores(head.query_tables(queries), codes)
    torch.testing.assert_close(scores, torch.gather(full, 1, ids), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scores, full.sort(1, descending=True).values, atol=1e-4,
                               rtol=1e-5)


def test_dcdh_tie_aware_map_equals_brute_force_over_tie_orders():
    """Hamming ranks tie a lot: the exact expectation equals averaging every tie order."""
    g = torch.Generator().manual_seed(3)
    head = make_head("dcdh")
    items = torch.randn(7, L, generator=g)
    items[3:] = items[:4] * torch.tensor([1.0] * (L - 1) + [-1.0])  # near-duplicate codes
    queries = torch.randn(2, L, generator=g)
    item_labels = torch.tensor([0, 1, 0, 1, 0, 2, 1])
    query_labels = torch.tensor([0, 1])
    result = evaluate_adc(head.query_tables(queries), head.encode(items), query_labels,
                          item_labels, ties="expected")
    scores = direct_scores("dcdh", head, queries, items)
    aps = []
    for qi in range(2):
        s, rel = scores[qi], (item_labels == query_labels[qi])
        assert len(set(s.tolist())) < 7  # the case really has ties
        total, count = 0.0, 0
        for order in itertools.permutations(range(7)):
            ranked = s[list(order)]
            if bool((ranked[:-1] >= ranked[1:]).all()):  # a valid ranking of tied items
                hits = rel[list(order)].double()
                prec = hits.cumsum(0) / torch.arange(1, 8)
                total += float((prec * hits).sum() / hits.sum())
                count += 1
        aps.append(total / count)
        torch.testing.assert_close(average_precision(s[None], rel[None])[0].double(),
                                   torch.tensor(aps[-1], dtype=torch.float64), atol=1e-6,
                                   rtol=0)
    assert result["mAP"] == pytest.approx(sum(aps) / 2, abs=1e-6)


def test_dpq_hard_vector_is_the_argmax_codeword_and_passes_no_gradient_to_p():
    head = make_head("dpq")
    x = torch.randn(5, D, requires_grad=True)
    soft, hard, probs = head(x)
    codes = head.encode(x.detach()).long()
    words = torch.cat([head.codebooks[m, :, codes[:, m]].T for m in range(M)], 1)
    torch.testing.assert_close(hard, words)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, M))
    hard.sum().backward()  # the argmax passes nothing back: only the codewords learn from h
    assert head.assignment.grad is None and x.grad is None
    assert head.codebooks.grad is not None and head.codebooks.grad.abs().sum() > 0
    soft.sum().backward()  # the soft branch does reach V_m and the features
    assert head.assignment.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_dpq_loss_is_ce_centre_and_gini_terms_without_classifier_bias():
    head = make_head("dpq")
    soft, hard, probs = (t.detach() for t in head(torch.randn(5, D)))
    loss_fn = DPQLoss(4, D)  # defaults: alpha 0.25, Gini weights 1 and 0.01
    assert loss_fn.classifier.bias is None
    assert {n for n, _ in loss_fn.named_parameters()} == {"classifier.weight", "centers"}
    labels = torch.tensor([0, 1, 2, 3, 0])
    loss, parts = loss_fn(soft, hard, probs, labels)
    c = loss_fn.centers[labels]
    centre = 0.5 * (((soft - c) ** 2).sum() + ((hard - c) ** 2).sum()) / 5
    torch.testing.assert_close(parts["center"], centre.detach())
    # Gini terms written out: usage of word k in book m over the batch, and sum of p^2.
    usage = torch.stack([torch.stack([probs[:, m, k].mean() for k in range(K)])
                         for m in range(M)])
    diversity = (usage ** 2).sum()
    sharpness = -sum((probs[b] ** 2).sum() for b in range(5)) / 5
    torch.testing.assert_close(parts["gini_div"], diversity)
    torch.testing.assert_close(parts["gini_sharp"], sharpness)
    weight = loss_fn.classifier.weight
    expected = (F.cross_entropy(soft @ weight.T, labels) + F.cross_entropy(hard @ weight.T, labels)
                + 0.25 * centre + 1.0 * diversity + 0.01 * sharpness)
    torch.testing.assert_close(loss, expected)


def test_dpq_centre_term_starts_near_half_the_feature_dim_as_the_authors():
    # Codewords N(0, 1) and centres Xavier (near 0), as the authors' dpq_layer.py: at the
    # start the hard vector has ||h||^2 ~ D and the centre term ~ D / 2 (~270 at D = 512),
    # however small the CE. Not a scaling bug: the authors sum over D and divide by B too.
    torch.manual_seed(0)
    head = build_head(NetConfig(num_books=4, num_words=64, feature_dim=512,
                                 num_classes=40, method="dpq"))
    soft, hard, probs = (t.detach() for t in head(torch.randn(64, 512)))
    _, parts = DPQLoss(40, 512)(soft, hard, probs, torch.arange(64) % 40)
    assert 240 < parts["center"] < 300
    assert 0.5 * hard.pow(2).sum(1).mean() > 0.9 * parts["center"]


def test_gini_terms_at_their_extremes():
    """Uniform assignments: diversity M/K (its minimum), sharpness -M/K (its maximum);
    one word for every sample: diversity M, sharpness -M."""
    from models.methods.dpq import gini_terms

    uniform = torch.full((6, M, K), 1.0 / K)
    same = F.one_hot(torch.zeros(6, M, dtype=torch.long), K).float()
    for probs, value in ((uniform, M / K), (same, float(M))):
        diversity, sharpness = gini_terms(probs)
        assert diversity.item() == pytest.approx(value)
        assert sharpness.item() == pytest.approx(-value)


def _stats(t: torch.Tensor) -> tuple[float, float]:
    return t.mean().item(), t.std().item()


def test_initialisations_are_the_authors():
    """DPQ's codewords and DCDH's centres come from torch.randn (mean 0, sd 1); DPQ's V_m
    is Xavier by default (the deviation docs/methods.md states) and torch.randn with
    --dpq-init normal, as the authors'; l2q's codewords are torch.randn by default
    (--l2q-init xavier: Xavier uniform), its V_m Xavier as OPQN's."""
    torch.manual_seed(0)
    big = dict(num_books=4, num_words=64, feature_dim=512, num_classes=10)  # d = 128
    xavier_sd = (6 / (128 + 64)) ** 0.5 / 3 ** 0.5  # uniform(-a, a) has sd a / sqrt(3)
    dpq = build_head(NetConfig(**big, method="dpq"))
    mean, sd = _stats(dpq.codebooks.detach())
    assert abs(mean) < 0.03 and sd == pytest.approx(1.0, abs=0.03)
    assert _stats(dpq.assignment.detach())[1] == pytest.approx(xavier_sd, rel=0.05)
    dpq_authors = build_head(NetConfig(**big, method="dpq", params={"dpq_init": "normal"}))
    for tensor in (dpq_authors.codebooks, dpq_authors.assignment):
        mean, sd = _stats(tensor.detach())
        assert abs(mean) < 0.03 and sd == pytest.approx(1.0, abs=0.03)
    l2q = build_head(NetConfig(**big, method="l2q"))
    assert _stats(l2q.codebooks.detach())[1] == pytest.approx(1.0, abs=0.03)
    assert _stats(l2q.assignment.detach())[1] == pytest.approx(xavier_sd, rel=0.05)
    l2q_x = build_head(NetConfig(**big, method="l2q", params={"l2q_init": "xavier"}))
    assert _stats(l2q_x.codebooks.detach())[1] == pytest.approx(xavier_sd, rel=0.05)
    centres = DCDHLoss(500, 48).centers.detach()
    mean, sd = _stats(centres)
    assert abs(mean) < 0.03 and sd == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match="l2q_init 'zeros'"):
        build_head(NetConfig(**big, method="l2q", params={"l2q_init": "zeros"}))


def test_gpq_class_logits_are_beta_squared_times_the_mean_cosine():
    torch.manual_seed(0)
    loss_fn = GPQLoss(4, M, D, beta=4.0)
    protos = loss_fn._prototypes()  # intra-normalised (4, D)
    feature = torch.randn(3, D)
    feature = F.normalize(feature.reshape(3, M, -1), dim=-1).flatten(1)
    d = D // M
    mean_cos = torch.tensor([[sum(F.cosine_similarity(feature[b, m * d:(m + 1) * d],
                                                      protos[c, m * d:(m + 1) * d], dim=0)
                                  for m in range(M)).item() / M for c in range(4)]
                             for b in range(3)])
    torch.testing.assert_close(loss_fn.class_logits(feature).detach(), 16.0 * mean_cos)
    # A feature equal to a prototype gets the largest possible logit: beta^2 = 16, not 16 M.
    assert loss_fn.class_logits(protos[2:3])[0, 2].item() == pytest.approx(16.0)


def test_l2q_diagnostics_are_its_query_side_sharpness_and_codeword_norm_spread():
    head = make_head("l2q")
    x = torch.randn(7, D)
    diag = head.diagnostics(x)
    assert set(diag) == set(head.DIAGNOSTICS) == {"maxP_q", "norm_cv"}
    for side, sub in (("raw", x.reshape(7, M, -1)),
                      ("normalized", F.normalize(x.reshape(7, M, -1), dim=-1))):
        head.query_side = side
        probs = torch.softmax(torch.einsum("bmd,mdk->bmk", sub, head.assignment), -1)
        torch.testing.assert_close(head.diagnostics(x)["maxP_q"],
                                   probs.max(-1).values.mean().detach())
    norms = head.codebooks.detach().norm(dim=1).flatten()
    torch.testing.assert_close(diag["norm_cv"], norms.std() / norms.mean())
    assert make_head("dpq").diagnostics(x) == {} and make_head("opqn").diagnostics(x) == {}


def test_each_method_defaults_to_its_authors_optimizer():
    from models.methods import get_method
    from utils.training.loop import TrainSettings, build_optimizer

    expected = {  # method: (optimizer at 32x32, lr, weight decay, betas, amsgrad)
        "opqn": ("sgd", 0.1, 5e-4, None, None), "l2q": ("sgd", 0.1, 5e-4, None, None),
        "dpq": ("sgd", 0.1, 5e-4, None, None),
        "gpq": ("adam", 2e-4, 0.0, (0.5, 0.999), False),
        "dcdh": ("adam", 0.005, 1e-4, (0.9, 0.999), True)}
    for method, (opt, lr, wd, betas, amsgrad) in expected.items():
        spec = get_method(method)
        assert spec.optimizer_for(32) == opt, method
        assert spec.default_lr(opt) == lr and spec.default_weight_decay(opt) == wd
        if opt == "adam":
            form = spec.adam_form()
            settings = TrainSettings(epochs=1, lr=lr, optimizer="adam", weight_decay=wd,
                                     adam_betas=form.betas, amsgrad=form.amsgrad)
            group = build_optimizer([torch.nn.Parameter(torch.zeros(2))], settings).param_groups[0]
            assert (group["betas"], group["amsgrad"], group["weight_decay"]) == \
                (betas, amsgrad, wd), method
    # DCDH's authors used SGD on the 112x112 protocol; GPQ keeps its Adam there.
    assert get_method("dcdh").optimizer_for(112) == "sgd"
    assert get_method("dcdh").default_lr("sgd") == 0.01
    assert get_method("gpq").optimizer_for(112) == "adam"


def test_gpq_loss_terms():
    head = make_head("gpq")
    feature, desc = head(torch.randn(6, D))
    # Intra-normalised: every sub-vector has unit norm.
    torch.testing.assert_close(feature.reshape(6, M, -1).norm(dim=-1), torch.ones(6, M))
    torch.testing.assert_close(desc.reshape(6, M, -1).norm(dim=-1), torch.ones(6, M))
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    loss_fn = GPQLoss(4, M, D, beta=4.0, lambda_ce=0.1)
    loss, parts = loss_fn(feature, desc, labels)
    logits = M * (feature / M ** 0.5) @ (desc / M ** 0.5).T
    same = (labels[:, None] == labels[None]).float()
    npair = -(same / same.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    npair = npair + 0.002 / 4 * 2 * M  # both vectors have squared norm M
    torch.testing.assert_close(parts["npair"], npair.detach())
    torch.testing.assert_close(loss, npair + 0.1 * parts["ce"])
    assert parts["entropy"] == 0  # off by default: our protocols are fully labelled
    on = GPQLoss(4, M, D, lambda_entropy=0.1)
    assert on(feature, desc, labels)[1]["entropy"] < 0  # negative entropy


def test_dcdh_loss_terms():
    torch.manual_seed(0)
    h = torch.randn(6, L)
    labels = torch.tensor([0, 0, 1, 1, 1, 3])
    target = discrete_targets(h, labels, 4, eta=0.01)
    # Y W is each sample's class mean of sign(h); B its sign (ties broken by eta * h).
    means = torch.stack([torch.sign(h[labels == c]).mean(0) for c in labels.tolist()])
    direct = torch.sign(means + 0.01 * h)
    direct[direct == 0] = 1
    torch.testing.assert_close(target, direct)
    loss_fn = DCDHLoss(4, L, sigma=0.25, eta=0.01, center_weight=0.1)
    loss, parts = loss_fn(h, labels)
    dist = ((h[:, None] - loss_fn.centers[None]) ** 2).sum(-1)
    torch.testing.assert_close(parts["class"], F.cross_entropy(-0.125 * dist, labels).detach())
    c = F.normalize(loss_fn.centers, dim=1)
    pairs = [F.softplus(0.5 * L * (c[i] @ c[j])) for i in range(4) for j in range(4) if i != j]
    torch.testing.assert_close(parts["center"], torch.stack(pairs).mean().detach())
    torch.testing.assert_close(parts["quant"], ((h - direct) ** 2).sum() / 6)


def pinv_targets(h: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 eta: float) -> torch.Tensor:
    """The dense formula ``sign(Y pinv(Y^T Y) Y^T sign(h) + eta h)``, in float64."""
    y = F.one_hot(labels, num_classes).double()
    signs = torch.where(h >= 0, 1.0, -1.0).double()
    out = y @ (torch.linalg.pinv(y.T @ y) @ y.T @ signs) + eta * h.double()
    return torch.where(out >= 0, 1.0, -1.0).to(h.dtype)


@pytest.mark.parametrize("seed", range(5))
def test_dcdh_targets_equal_the_pinv_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    classes, batch = 7, 12
    # Class 6 never appears; most samples in 0..4, so some classes have one sample or none.
    labels = torch.randint(0, 5, (batch,), generator=gen)
    h = torch.randn(batch, L, generator=gen)
    h[0, :3] = 0.0  # sign(0) = +1, as in the codes
    # Ties: class 5's two samples have opposite signs, its mean is 0 and eta * h decides.
    labels[1], labels[2] = 5, 5
    h[2] = -h[1]
    target = discrete_targets(h, labels, classes, eta=0.01)
    torch.testing.assert_close(target, pinv_targets(h, labels, classes, 0.01), rtol=0, atol=0)
    assert set(target.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(target[1:3], torch.sign(h[1:3]) + (h[1:3] == 0))


def test_dcdh_targets_need_no_class_by_class_matrix():
    # pinv of a 200000 x 200000 float32 matrix would need 160 GB; per-class sums need B x L.
    torch.manual_seed(0)
    h = torch.randn(32, 64)
    labels = torch.randint(0, 200_000, (32,))
    labels[1] = labels[0]
    target = discrete_targets(h, labels, 200_000, eta=0.01)
    assert target.shape == h.shape
    small, inverse = torch.unique(labels, return_inverse=True)
    torch.testing.assert_close(target, pinv_targets(h, inverse, small.numel(), 0.01))
    labels = torch.randint(0, 9000, (16,))
    h = torch.randn(16, 24)
    torch.testing.assert_close(discrete_targets(h, labels, 9000, 0.01),
                               pinv_targets(h, torch.unique(labels, return_inverse=True)[1],
                                            labels.unique().numel(), 0.01))


def test_l2q_shares_the_opqn_loss_and_learns_its_codewords():
    config = NetConfig(num_books=M, num_words=K, feature_dim=D, num_classes=4, width=4,
                        method="l2q")
    assert type(build_loss(config)) is OPQNLoss
    model = RetrievalNet(config)
    assert "codebooks" in dict(model.quantizer.named_parameters())
    opqn = RetrievalNet(NetConfig(M, 8, D, 4, width=4))
    assert "codebooks" in dict(opqn.quantizer.named_buffers())


def test_old_configs_load_as_opqn_and_methods_are_listed_once():
    old = {"num_books": 2, "num_words": 16, "feature_dim": 64, "num_classes": 3}
    assert NetConfig.from_dict(old).method == "opqn"
    with pytest.raises(validation.UsageError, match="learns its codewords allows K > d"):
        validation.check_feature_dim(D, M, K, "opqn")
    for method in ("l2q", "dpq", "gpq"):
        validation.check_feature_dim(D, M, K, method)  # K > d is fine for learned words


def test_method_flag_defaults_are_the_config_defaults():
    import opqn_main
    from models import NetConfig
    from models.methods import get_method

    parsed = vars(opqn_main.build_parser().parse_args([]))
    for method in METHODS:
        defaults = NetConfig(1, 2, 2, 1, method=method).to_dict()
        infos = get_method(method).param_info()
        assert [i.name for i in infos] == list(get_method(method).param_names())
        for info in infos:
            assert defaults[info.name] == info.default == parsed[info.name], info.name
