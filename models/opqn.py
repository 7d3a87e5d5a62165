"""The complete network: backbone plus the method's quantization head, and its configuration."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor, nn

from .heads import build_head
from .heads.base import code_bits
from .registry import DEFAULT_BACKBONE, build_backbone

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


# Fields whose default changed after checkpoints were written without them: such a
# checkpoint keeps the form it was trained and scored with (l2q was scored with the
# normalised query, DPQ's V_m started from a standard normal).
LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {
    "l2q": {"l2q_query": "normalized"},
    "dpq": {"dpq_init": "normal"},
}


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
    # Checkpoints written before these fields existed load with the defaults: the paper's
    # sphere20 backbone and its additive cosine margin.
    backbone: str = DEFAULT_BACKBONE
    backbone_args: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs
    pretrained: bool = False  # provenance only: rebuilding never downloads weights
    margin_type: str = "cosface"
    # The method (models.heads.METHODS); checkpoints written before it existed are OPQN.
    method: str = "opqn"
    # Method-specific hyper-parameters (ignored by the other methods).
    l2q_init: str = "normal"  # OPQN-l2q: codeword initialisation, "normal" or "xavier"
    # OPQN-l2q: P_m of a query from its sub-vector as training sees it ("raw") or from the
    # normalised one ("normalized", the authors' evaluator); see models.heads.l2q.
    l2q_query: str = "raw"
    # DPQ: initialisation of V_m, "xavier" or "normal" (the authors'); see models.heads.dpq
    dpq_init: str = "xavier"
    dpq_alpha: float = 0.25  # DPQ: weight of the joint centre loss
    dpq_gini_diversity: float = 1.0  # DPQ: weight of the Gini diversity term
    dpq_gini_sharpness: float = 0.01  # DPQ: weight of the Gini sharpness term
    gpq_alpha: float = 20.0  # GPQ: soft-assignment temperature
    gpq_beta: float = 4.0  # GPQ: cosine-classifier scale
    gpq_lambda_ce: float = 0.1  # GPQ: weight of the classification term (lambda_2)
    gpq_lambda_entropy: float = 0.0  # GPQ: subspace minimax entropy (lambda_1; 0 = off)
    dcdh_sigma: float = 0.25  # DCDH: Gaussian similarity width
    dcdh_eta: float = 0.01  # DCDH: quantization weight
    dcdh_center_weight: float = 0.1  # DCDH: weight of the centre separation term

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
        kept = {k: v for k, v in data.items() if k in names}
        legacy = LEGACY_DEFAULTS.get(kept.get("method", "opqn"), {})
        return cls(**{**legacy, **kept})


class OPQN(nn.Module):
    """Backbone and quantizer together.

    ``forward(images)`` returns the features x ``(B, D)``; ``quantizer`` gives the soft
    assignment for training, the hard codes for the database and the query tables.
    """

    def __init__(self, config: OPQNConfig, load_pretrained: bool = False) -> None:
        """``load_pretrained``: fetch timm's weights (a fresh training run with --pretrained);
        rebuilding a trained model from its checkpoint never does."""
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, config.input_size, config.width,
                                       config.feature_dim, pretrained=load_pretrained,
                                       backbone_args=config.backbone_args)
        # The method's head (models.heads); OPQN's is models.heads.opqn.OrthoPQ.
        self.quantizer = build_head(config)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> features ``(B, D)``."""
        return self.backbone(images)
