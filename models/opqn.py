"""The complete OPQN network: backbone plus quantization head, and its configuration."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from torch import Tensor, nn

from .backbone import FaceResNet20
from .quantizer import OrthoPQ, code_bits

# 32x32 datasets use D = 512 in the paper (516 for M = 6 so that it divides).
SMALL_INPUT_FEATURE_DIM = 512


def choose_feature_dim(num_books: int, num_words: int, input_size: int) -> int:
    """The feature dimension D used for a code configuration.

    * 112x112 inputs (VGGFace2, cross-dataset): ``D = M * K``, as in the paper.
    * 32x32 inputs: the smallest multiple of ``M`` that is at least 512 (512, or 516 for
      M = 6), raised to ``M * K`` when that is larger, so that ``K <= d`` always holds
      (e.g. 4x256 gets D = 1024 instead of crashing).
    """
    if input_size == 112:
        return num_books * num_words
    dim = math.ceil(SMALL_INPUT_FEATURE_DIM / num_books) * num_books
    return max(dim, num_books * num_words)


@dataclass
class OPQNConfig:
    """Everything needed to rebuild a trained model; stored in every checkpoint."""

    num_books: int
    num_words: int
    feature_dim: int
    num_classes: int
    input_size: int = 32
    width: int = 64
    margin: float = 0.5
    scale: float = 20.0
    miu: float = 0.1
    dataset: str = ""

    @property
    def bits(self) -> int:
        return code_bits(self.num_books, self.num_words)

    @property
    def word_dim(self) -> int:
        return self.feature_dim // self.num_books

    def to_dict(self) -> dict:
        data = asdict(self)
        data["bits"] = self.bits
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "OPQNConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class OPQN(nn.Module):
    """Backbone and quantizer together.

    ``forward(images)`` returns the features x ``(B, D)``; ``quantizer`` gives the soft
    assignment for training, the hard codes for the database and the query tables.
    """

    def __init__(self, config: OPQNConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = FaceResNet20(config.feature_dim, config.input_size, config.width)
        self.quantizer = OrthoPQ(config.feature_dim, config.num_books, config.num_words)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> features ``(B, D)``."""
        return self.backbone(images)
