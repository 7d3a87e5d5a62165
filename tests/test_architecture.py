"""The backbone of docs/paper.md ("Model"), pinned at the paper's width 64 for both input sizes.

A wrong number of units, a wrong stride, a wrong channel count or a re-ordered head must
fail here: the output shape alone (tests/test_quantizer.py) does not see them.
"""
import pytest
import torch
from torch import nn

from models import RetrievalNet, NetConfig
from models.backbone import FaceResNet20, ResidualUnit

# Parameter count at width 64, worked out by hand from docs/paper.md (convolutions have no bias;
# BatchNorm has 2 parameters per channel, running statistics are buffers; PReLU has one
# slope per channel):
#   stage opening conv(in->c) + BN + PReLU:  9*in*c + 2c + c = 9*in*c + 3c
#   residual unit (two conv(c->c)+BN+PReLU): 2*(9*c*c + 3c)  = 18c^2 + 6c
#   stage 1 (in 3,   c 64,  1 unit): (1,728 + 192)       + 1*(73,728 + 384)      =    76,032
#   stage 2 (in 64,  c 128, 2 units): (73,728 + 384)     + 2*(294,912 + 768)     =   665,472
#   stage 3 (in 128, c 256, 4 units): (294,912 + 768)    + 4*(1,179,648 + 1,536) = 5,020,416
#   stage 4 (in 256, c 512, 1 unit): (1,179,648 + 1,536) + 1*(4,718,592 + 3,072) = 5,902,848
#   convolutional part: 76,032 + 665,472 + 5,020,416 + 5,902,848                = 11,664,768
# Head, flat = 512*S*S with S the final map side; BatchNorm1d(flat) = 2*flat,
# Linear(flat, D) = flat*D + D, BatchNorm1d(D) = 2D:
#   32x32 (S = 4, flat 8,192), D = 512:  16,384 + 4,194,816 + 1,024   =  4,212,224
#   112x112 (S = 7, flat 25,088), D = 512: 50,176 + 12,845,568 + 1,024 = 12,896,768
# Quantizer V_m: M*d*K = 8*64*64 = 32,768 (the codebooks are a buffer, not parameters).
CONV_PARAMS = 11_664_768
BACKBONE_PARAMS = {32: CONV_PARAMS + 4_212_224, 112: CONV_PARAMS + 12_896_768}
ASSIGNMENT_PARAMS = 8 * 64 * 64


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Function scope: each test builds its own model, so that mutation tools that map tests to
# the code they run see every test depend on the constructor.
@pytest.fixture(params=[32, 112])
def backbone(request):
    torch.manual_seed(0)
    return FaceResNet20(feature_dim=512, input_size=request.param, width=64).eval()


def test_stages_units_channels_and_strides(backbone):
    strides = (1, 2, 2, 2) if backbone.input_size == 32 else (2, 2, 2, 2)
    assert len(backbone.stages) == 4
    in_ch = 3
    for stage, channels, stride, units in zip(backbone.stages, (64, 128, 256, 512), strides,
                                              (1, 2, 4, 1)):
        opening, *rest = list(stage)
        conv, bn, prelu = opening
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert isinstance(prelu, nn.PReLU) and prelu.num_parameters == channels
        assert (conv.in_channels, conv.out_channels) == (in_ch, channels)
        assert conv.kernel_size == (3, 3) and conv.stride == (stride, stride)
        assert conv.padding == (1, 1)
        assert len(rest) == units and all(isinstance(u, ResidualUnit) for u in rest)
        for unit in rest:
            layers = [type(layer) for block in unit.body for layer in block]
            assert layers == [nn.Conv2d, nn.BatchNorm2d, nn.PReLU] * 2
            for block in unit.body:
                assert block[0].stride == (1, 1) and block[0].in_channels == channels
                assert block[0].out_channels == channels and block[0].kernel_size == (3, 3)
        in_ch = channels


def test_final_map_and_head_order(backbone):
    side = 4 if backbone.input_size == 32 else 7
    size = backbone.input_size
    with torch.no_grad():
        fmap = backbone.stages(torch.randn(2, 3, size, size))
    assert fmap.shape == (2, 512, side, side)
    head = list(backbone.head)
    assert [type(layer) for layer in head] == [nn.Flatten, nn.BatchNorm1d, nn.Dropout,
                                               nn.Linear, nn.BatchNorm1d]
    assert head[1].num_features == 512 * side * side and head[2].p == 0.5
    assert (head[3].in_features, head[3].out_features) == (512 * side * side, 512)
    assert head[4].num_features == 512


def test_parameter_count_by_hand(backbone):
    assert _count(backbone.stages) == CONV_PARAMS
    assert _count(backbone) == BACKBONE_PARAMS[backbone.input_size]


def test_full_model_parameter_count():
    cfg = NetConfig(num_books=8, num_words=64, feature_dim=512, num_classes=10,
                     input_size=112, width=64)
    model = RetrievalNet(cfg)
    assert _count(model) == BACKBONE_PARAMS[112] + ASSIGNMENT_PARAMS


def test_residual_unit_adds_the_identity():
    unit = ResidualUnit(4).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        body = unit.body(x)
        torch.testing.assert_close(unit(x), x + body)
        # A unit whose last BN outputs zero is exactly the identity (PReLU(0) = 0).
        last_bn = unit.body[1][1]
        last_bn.weight.zero_()
        last_bn.bias.zero_()
        torch.testing.assert_close(unit(x), x)


def test_attributes_and_initialisation(backbone):
    assert (backbone.feature_dim, backbone.width) == (512, 64)
    # Kaiming normal, fan_out mode: std = sqrt(2 / (9 * out_channels)) for a 3x3 conv.
    first = backbone.stages[0][0][0]
    assert first.weight.std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.1)
    linear = backbone.head[3]
    assert torch.count_nonzero(linear.bias) == 0


def test_argument_checks():
    FaceResNet20(feature_dim=1, input_size=32, width=1)  # the smallest valid network
    with pytest.raises(ValueError, match="input_size must be one of"):
        FaceResNet20(feature_dim=8, input_size=64)
    for width, dim in ((0, 8), (4, 0)):
        with pytest.raises(ValueError, match="width and feature_dim must be positive"):
            FaceResNet20(feature_dim=dim, width=width)


def test_flop_count_agrees_with_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from models import count_flops

    for size in (32, 112):
        model = FaceResNet20(feature_dim=64, input_size=size, width=8).train()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
        model.train()
        flops = count_flops(model)
        assert isinstance(flops, int) and flops == counter.get_total_flops() > 0
        assert model.training  # the training mode is restored
