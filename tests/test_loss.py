import math

import pytest
import torch
import torch.nn.functional as F

from models.methods import OPQNLoss, assignment_entropy, margin_cosine_logits


def _cosines(sub, weights):
    return torch.einsum("bmd,mcd->bmc", F.normalize(sub, dim=-1), F.normalize(weights, dim=-1))


def test_margin_only_at_the_target_class_and_scaled():
    torch.manual_seed(0)
    sub, weights = torch.randn(5, 3, 8), torch.randn(3, 7, 8)
    labels = torch.tensor([0, 3, 6, 2, 2])
    cos = _cosines(sub, weights)
    logits = margin_cosine_logits(sub, weights, labels, margin=0.35, scale=20.0)
    diff = cos * 20.0 - logits  # margin*scale at the target, 0 elsewhere
    target = F.one_hot(labels, 7).bool().unsqueeze(1).expand_as(diff)
    torch.testing.assert_close(diff[target], torch.full_like(diff[target], 0.35 * 20.0))
    torch.testing.assert_close(diff[~target], torch.zeros_like(diff[~target]), atol=1e-5, rtol=0)


def test_cosines_are_clamped():
    sub = torch.ones(1, 1, 4)
    logits = margin_cosine_logits(sub, sub.clone().reshape(1, 1, 4) * 3, torch.tensor([0]),
                                  margin=0.0, scale=1.0)
    assert logits.max().item() <= 1.0


def test_loss_equals_the_formula():
    torch.manual_seed(1)
    b, m, d, k, c = 6, 3, 8, 4, 5
    loss_fn = OPQNLoss(c, m, d, margin=0.5, scale=20.0, miu=0.1)
    sub, soft = torch.randn(b, m, d), torch.randn(b, m, d)
    probs = torch.softmax(torch.randn(b, m, k), -1)
    labels = torch.randint(0, c, (b,))
    loss, parts = loss_fn(sub, soft, probs, labels)
    w = loss_fn.class_weights.detach()
    ce_x = sum(F.cross_entropy(20 * (_cosines(sub, w)[:, i] - 0.5 * F.one_hot(labels, c)), labels)
               for i in range(m)) / m
    ce_s = sum(F.cross_entropy(20 * (_cosines(soft, w)[:, i] - 0.5 * F.one_hot(labels, c)), labels)
               for i in range(m)) / m
    entropy = -(probs * probs.log()).sum(-1).mean()
    expected = 0.5 * (ce_x + ce_s) + 0.1 * entropy
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["entropy"].item() == pytest.approx(entropy.item(), rel=1e-6)


def test_larger_scale_sharpens_and_margin_raises_the_loss():
    torch.manual_seed(2)
    sub = torch.randn(16, 2, 8)
    probs = torch.softmax(torch.randn(16, 2, 4), -1)
    labels = torch.randint(0, 4, (16,))
    base = OPQNLoss(4, 2, 8, margin=0.0, scale=20.0, miu=0.0)
    with_margin = OPQNLoss(4, 2, 8, margin=0.5, scale=20.0, miu=0.0)
    with_margin.load_state_dict(base.state_dict())
    assert with_margin(sub, sub, probs, labels)[0] > base(sub, sub, probs, labels)[0]
    # Aligning features with their class weights: a larger scale gives a smaller loss.
    aligned = base.class_weights.detach()[:, labels].transpose(0, 1).clone()
    low = OPQNLoss(4, 2, 8, margin=0.0, scale=5.0, miu=0.0)
    low.load_state_dict(base.state_dict())
    assert base(aligned, aligned, probs, labels)[0] < low(aligned, aligned, probs, labels)[0]


def test_entropy_term_is_weighted_by_miu():
    torch.manual_seed(3)
    sub = torch.randn(4, 2, 8)
    labels = torch.randint(0, 3, (4,))
    uniform = torch.full((4, 2, 16), 1 / 16)
    onehot = F.one_hot(torch.zeros(4, 2, dtype=torch.long), 16).float()
    assert assignment_entropy(uniform).item() == pytest.approx(math.log(16), rel=1e-6)
    assert assignment_entropy(onehot).item() == pytest.approx(0.0, abs=1e-6)
    a = OPQNLoss(3, 2, 8, miu=0.0)
    b = OPQNLoss(3, 2, 8, miu=0.25)
    b.load_state_dict(a.state_dict())
    gap = b(sub, sub, uniform, labels)[0] - a(sub, sub, uniform, labels)[0]
    assert gap.item() == pytest.approx(0.25 * math.log(16), rel=1e-5)


def test_gradients_reach_the_class_weights():
    loss_fn = OPQNLoss(3, 2, 8)
    sub = torch.randn(4, 2, 8, requires_grad=True)
    probs = torch.softmax(torch.randn(4, 2, 4, requires_grad=True), -1)
    loss, _ = loss_fn(sub, sub, probs, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert loss_fn.class_weights.grad is not None and sub.grad is not None


def test_cosines_are_clamped_where_rounding_exceeds_one():
    # In float32, cos(v, v) of a normalised vector with itself can round above 1. Find such
    # vectors first, so that the test is known to exercise the clamp.
    torch.manual_seed(4)
    vecs = torch.randn(4000, 7)
    unit = F.normalize(vecs, dim=-1)
    raw = (unit * unit).sum(-1)
    over = vecs[raw > 1.0]
    assert len(over) > 0, "no float32 rounding case found; the test would prove nothing"
    sub = over.unsqueeze(1)  # (B, 1, d)
    weights = over.unsqueeze(0)  # (1, B, d): class b is sample b's own direction
    labels = torch.arange(len(over))
    logits = margin_cosine_logits(sub, weights, labels, margin=0.0, scale=1.0)
    assert logits.max().item() <= 1.0 and logits.min().item() >= -1.0
    # The opposite direction rounds below -1 for the same vectors: the lower clamp.
    logits = margin_cosine_logits(sub, -weights, labels, margin=0.0, scale=1.0)
    assert (-(unit * unit).sum(-1) < -1.0).any()
    assert logits.min().item() >= -1.0


def test_loss_value_by_hand_with_the_margin_subtracted_at_the_target():
    # One book, d = 2, two classes. x = (3, 4) normalises to (0.6, 0.8); the class weights
    # (2, 0) and (0, 5) normalise to the axes, so the cosines are (0.6, 0.8) -- this also
    # checks that W is normalised. Label 0, margin 0.5, scale 20:
    #   logits = 20 * (0.6 - 0.5, 0.8) = (2, 16)
    #   CE = log(e^2 + e^16) - 2 = 14 + log(1 + e^-14)
    # soft = x, so ce_s = ce_x; p = (0.5, 0.5) gives H = log 2, and
    #   L = 0.5 * (CE + CE) + 0.1 * log 2.
    loss_fn = OPQNLoss(2, 1, 2, margin=0.5, scale=20.0, miu=0.1)
    with torch.no_grad():
        loss_fn.class_weights.copy_(torch.tensor([[[2.0, 0.0], [0.0, 5.0]]]))
    sub = torch.tensor([[[3.0, 4.0]]])
    probs = torch.full((1, 1, 2), 0.5)
    loss, parts = loss_fn(sub, sub, probs, torch.tensor([0]))
    ce = 14.0 + math.log1p(math.exp(-14.0))
    assert parts["ce_x"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["ce_s"].item() == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(ce + 0.1 * math.log(2.0), rel=1e-5)
    # Label 1: logits = 20 * (0.6, 0.8 - 0.5) = (12, 6); CE = 6 + log(1 + e^-6).
    _, parts = loss_fn(sub, sub, probs, torch.tensor([1]))
    assert parts["ce_x"].item() == pytest.approx(6.0 + math.log1p(math.exp(-6.0)), rel=1e-5)


def test_defaults_are_the_papers():
    loss_fn = OPQNLoss(3, 2, 8)
    assert (loss_fn.margin, loss_fn.scale, loss_fn.miu) == (0.5, 20.0, 0.1)


def _reference_loss(sub, soft, probs, weights, labels, margin, scale, miu):
    """The loss of docs/paper.md written independently, sample by sample and book by book, in float64."""
    b, m, _ = sub.shape
    total_x, total_s = 0.0, 0.0
    for i in range(b):
        for j in range(m):
            w = weights[j] / weights[j].norm(dim=-1, keepdim=True)
            for vec, is_soft in ((sub[i, j], False), (soft[i, j], True)):
                cos = w @ (vec / vec.norm())
                logit = scale * (cos - margin * (torch.arange(len(cos)) == labels[i]))
                ce = torch.logsumexp(logit, 0) - logit[labels[i]]
                if is_soft:
                    total_s = total_s + ce
                else:
                    total_x = total_x + ce
    entropy = -(probs * probs.log()).sum() / (b * m)
    return 0.5 * (total_x / (b * m) + total_s / (b * m)) + miu * entropy


def test_gradient_matches_an_independent_computation_of_the_formula():
    torch.manual_seed(5)
    b, m, d, k, c = 3, 2, 4, 3, 4
    loss_fn = OPQNLoss(c, m, d, margin=0.5, scale=20.0, miu=0.1)
    sub = torch.randn(b, m, d, requires_grad=True)
    soft = torch.randn(b, m, d, requires_grad=True)
    logits = torch.randn(b, m, k, requires_grad=True)
    labels = torch.tensor([0, 3, 1])
    loss, _ = loss_fn(sub, soft, torch.softmax(logits, -1), labels)
    got = torch.autograd.grad(loss, [sub, soft, logits, loss_fn.class_weights])

    leaves = [t.detach().double().requires_grad_() for t in
              (sub, soft, logits, loss_fn.class_weights)]
    ref = _reference_loss(leaves[0], leaves[1], torch.softmax(leaves[2], -1), leaves[3], labels,
                          0.5, 20.0, 0.1)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    expected = torch.autograd.grad(ref, leaves)
    for g, e in zip(got, expected):
        assert g.abs().max() > 0
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)
