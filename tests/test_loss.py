import math

import pytest
import torch
import torch.nn.functional as F

from losses import OPQNLoss, assignment_entropy, margin_cosine_logits


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
