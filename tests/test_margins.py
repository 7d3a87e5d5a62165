"""CosFace and ArcFace target margins (losses.margins), checked against hand-computed values."""
import math

import pytest
import torch

from losses import apply_margin
from models.methods import OPQNLoss, margin_cosine_logits

M = 0.5  # radians for ArcFace


def _two_class_case():
    """Unit class weights e0, e1; sub-vectors whose cosines are exactly (0.8, 0.6) and
    (-0.95, sqrt(1 - 0.95^2)); both samples belong to class 0."""
    weights = torch.eye(2, dtype=torch.float64).unsqueeze(0)  # (M=1, C=2, d=2)
    sub = torch.tensor([[[0.8, 0.6]], [[-0.95, math.sqrt(1 - 0.95 ** 2)]]], dtype=torch.float64)
    return sub, weights, torch.tensor([0, 0])


def test_arcface_logits_hand_computed_including_the_fallback_branch():
    sub, weights, labels = _two_class_case()
    logits = margin_cosine_logits(sub, weights, labels, M, 10.0, "arcface")
    # Sample 0: θ = acos(0.8) < π - m, so cos(θ + m) = 0.8·cos m - 0.6·sin m.
    # cos 0.5 = 0.8775825619, sin 0.5 = 0.4794255386.
    first = 0.8 * 0.8775825619 - 0.6 * 0.4794255386  # 0.4144107263
    # Sample 1: cos θ = -0.95 < cos(π - m) = -0.8776, so θ + m would pass π: the fallback
    # cos θ - m·sin(π - m) = -0.95 - 0.5·0.4794255386 = -1.1897127693.
    second = -0.95 - 0.5 * 0.4794255386
    expected = 10.0 * torch.tensor([[[first, 0.6]], [[second, math.sqrt(1 - 0.95 ** 2)]]],
                                   dtype=torch.float64)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-8)
    assert first == pytest.approx(0.4144107263, abs=1e-9)
    assert second == pytest.approx(-1.1897127693, abs=1e-9)


def test_cosface_default_is_unchanged():
    sub, weights, labels = _two_class_case()
    logits = margin_cosine_logits(sub, weights, labels, M, 10.0)
    expected = 10.0 * torch.tensor([[[0.3, 0.6]], [[-1.45, math.sqrt(1 - 0.95 ** 2)]]],
                                   dtype=torch.float64)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-8)


def test_arcface_target_logit_decreases_over_all_angles_with_finite_gradients():
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    cos = torch.cos(theta).requires_grad_(True)
    target = apply_margin(cos, torch.ones_like(cos), M, "arcface")
    steps = target[1:] - target[:-1]
    assert (steps < 0).all()  # monotonic in θ, also past π - m
    target.sum().backward()
    assert torch.isfinite(cos.grad).all()
    # Where θ + m <= π it is exactly cos(θ + m).
    inside = theta <= math.pi - M - 1e-6
    torch.testing.assert_close(target[inside].detach(), torch.cos(theta[inside] + M),
                               rtol=0, atol=1e-6)  # sin is floored at 1e-6 for the gradient


def test_opqn_loss_applies_arcface_to_x_and_s():
    torch.manual_seed(0)
    sub, soft = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    probs = torch.softmax(torch.randn(6, 2, 4), -1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    arc = OPQNLoss(3, 2, 8, margin=M, scale=10.0, margin_type="arcface")
    cos = OPQNLoss(3, 2, 8, margin=M, scale=10.0)
    cos.load_state_dict(arc.state_dict())
    _, parts_arc = arc(sub, soft, probs, labels)
    _, parts_cos = cos(sub, soft, probs, labels)
    for part in ("ce_x", "ce_s"):
        assert not torch.isclose(parts_arc[part], parts_cos[part])
        weights = arc.class_weights
        source = sub if part == "ce_x" else soft
        logits = margin_cosine_logits(source, weights, labels, M, 10.0, "arcface")
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                     labels.repeat_interleave(2))
        torch.testing.assert_close(parts_arc[part], expected.detach())
    with pytest.raises(ValueError, match="margin type"):
        OPQNLoss(3, 2, 8, margin_type="sphereface")
