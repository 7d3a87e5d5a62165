"""The 20-layer SphereFace-style residual CNN that maps face images to features x."""
from __future__ import annotations

from torch import Tensor, nn

from .precision import fp32_zone

# Residual units per stage, as in SphereFace-20: 1 + 2 + 4 + 1 units of two convolutions,
# plus the four stage-opening convolutions = 20 weight layers with the linear head.
UNITS_PER_STAGE = (1, 2, 4, 1)
SUPPORTED_INPUT_SIZES = (32, 112)


def _conv_bn_prelu(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.PReLU(out_ch),
    )


class ResidualUnit(nn.Module):
    """conv3x3-BN-PReLU twice, plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_prelu(channels, channels, 1), _conv_bn_prelu(channels, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FaceHead(nn.Sequential):
    """The paper's head on the final map: flatten, BatchNorm1d, Dropout, Linear to D,
    BatchNorm1d. ``(B, C, h, w)`` -> features ``(B, D)``.

    It always runs in float32 with autocast off: mixed precision stops at the features, so
    bf16 training (``--amp``) rounds only the convolutions, and codes and query tables are
    computed from full-precision features.
    """

    def __init__(self, flat_dim: int, feature_dim: int, dropout: float) -> None:
        super().__init__(nn.Flatten(), nn.BatchNorm1d(flat_dim), nn.Dropout(dropout),
                         nn.Linear(flat_dim, feature_dim), nn.BatchNorm1d(feature_dim))

    def forward(self, feature_map: Tensor) -> Tensor:
        with fp32_zone():
            return super().forward(feature_map.float())


def check_input_shape(images: Tensor, input_size: int) -> None:
    """Refuse images of the wrong shape with a message saying what is expected.

    Without it a wrong size only fails deep inside the head (``running_mean should contain
    8192 elements``), and unnormalised input is not caught at all, hence the pointer to
    ``utils.retrieval.encode_images``, which applies the model's own transform.
    """
    if (not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3
            or images.shape[2] != input_size or images.shape[3] != input_size):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"expected a batch of normalised images of shape (B, 3, {input_size}, "
            f"{input_size}) for this {input_size}x{input_size} model, got {got}; "
            f"utils.retrieval.encode_images(model, images) takes image paths or PIL images "
            f"and applies the model's own evaluation transform")


class FaceResNet20(nn.Module):
    """SphereFace-style ResNet-20 producing a ``(B, feature_dim)`` feature.

    Args:
        feature_dim: D, the output dimension (must be divisible by the number of codebooks).
        input_size: 32 (first stage stride 1, 4x4 final map) or 112 (all strides 2, 7x7 map).
        width: channels of the first stage; stages have width x (1, 2, 4, 8). The paper
            uses 64 (64-128-256-512); 16 is the narrow variant for CPU work.
        dropout: dropout before the linear head (0.5 in the paper).

    Input: float tensor ``(B, 3, input_size, input_size)``.
    """

    def __init__(self, feature_dim: int, input_size: int = 32, width: int = 64,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if input_size not in SUPPORTED_INPUT_SIZES:
            raise ValueError(f"input_size must be one of {SUPPORTED_INPUT_SIZES}, got {input_size}")
        if width < 1 or feature_dim < 1:
            raise ValueError(f"width and feature_dim must be positive, got {width}, {feature_dim}")
        self.feature_dim = feature_dim
        self.input_size = input_size
        self.width = width
        strides = (1, 2, 2, 2) if input_size == 32 else (2, 2, 2, 2)
        channels = [width * f for f in (1, 2, 4, 8)]
        stages, in_ch = [], 3
        for out_ch, stride, units in zip(channels, strides, UNITS_PER_STAGE):
            layers = [_conv_bn_prelu(in_ch, out_ch, stride)]
            layers += [ResidualUnit(out_ch) for _ in range(units)]
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        side = input_size
        for stride in strides:
            side = (side + 2 - 3) // stride + 1
        self.map_shape = (channels[-1], side, side)  # (C, h, w) of the final feature map
        flat = channels[-1] * side * side
        self.head = FaceHead(flat, feature_dim, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` images -> ``(B, feature_dim)`` features."""
        check_input_shape(images, self.input_size)
        return self.head(self.stages(images))

