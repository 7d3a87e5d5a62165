"""The network of every method: a face backbone plus the method's quantization head
(:class:`RetrievalNet`), and the configuration that rebuilds it (:class:`NetConfig`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor, nn

from .methods import DEFAULT_METHOD, build_head, code_bits, get_method
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


@dataclass
class NetConfig:
    """Everything needed to rebuild a trained model of any method; stored in every
    checkpoint (flat: the method's parameters sit beside the other fields)."""

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
    # The method (models.methods); checkpoints written before it existed are OPQN's.
    method: str = DEFAULT_METHOD
    # The method's typed hyper-parameters (MethodSpec.params); a dict or None is turned
    # into them, missing names taking the method's defaults.
    params: Any = None

    def __post_init__(self) -> None:
        spec = get_method(self.method)
        if not isinstance(self.params, spec.params):
            self.params = spec.make_params(self.params)

    @property
    def bits(self) -> int:
        return code_bits(self.num_books, self.num_words)

    @property
    def word_dim(self) -> int:
        return self.feature_dim // self.num_books

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        data["backbone_args"] = dict(self.backbone_args)
        data.update(asdict(self.params))
        data["bits"] = self.bits
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "NetConfig":
        """The config a checkpoint holds; fields it lacks take the defaults, and the
        method's parameters its legacy defaults (what such checkpoints were trained with)."""
        names = {f.name for f in fields(cls)} - {"params"}
        kept = {k: v for k, v in data.items() if k in names}
        spec = get_method(kept.get("method", DEFAULT_METHOD))
        return cls(**kept, params=spec.make_params(data, legacy=True))

    @staticmethod
    def stored_defaults(method: str) -> dict:
        """What :meth:`from_dict` reads for the fields a checkpoint of ``method`` lacks."""
        return NetConfig(1, 2, 2, 1, method=method,
                          params=get_method(method).make_params(legacy=True)).to_dict()


class RetrievalNet(nn.Module):
    """Backbone and quantizer together.

    ``forward(images)`` returns the features x ``(B, D)``; ``quantizer`` gives the soft
    assignment for training, the hard codes for the database and the query tables.
    """

    def __init__(self, config: NetConfig, load_pretrained: bool = False) -> None:
        """``load_pretrained``: fetch timm's weights (a fresh training run with --pretrained);
        rebuilding a trained model from its checkpoint never does."""
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, config.input_size, config.width,
                                       config.feature_dim, pretrained=load_pretrained,
                                       backbone_args=config.backbone_args)
        # The method's head (models.methods); OPQN's is models.methods.opqn.OPQNHead.
        self.quantizer = build_head(config)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> features ``(B, D)``."""
        return self.backbone(images)


# The earlier names, which scripts written against this project's first releases use.
OPQN = RetrievalNet
OPQNConfig = NetConfig
