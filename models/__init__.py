"""Backbones (by name, through the registry), orthonormal codebooks and the OPQN head."""
from .backbone import FaceResNet20
from .codebooks import dct_matrix, orthonormal_codebooks
from .flops import count_flops, count_parameters
from .opqn import OPQN, OPQNConfig, choose_feature_dim
from .heads import METHODS, QuantHead, build_head
from .heads.opqn import OrthoPQ, code_dtype
from .registry import (DEFAULT_BACKBONE, BackboneError, PretrainedUnavailable, build_backbone,
                       parse_backbone_args)

__all__ = [
    "FaceResNet20", "count_flops", "count_parameters", "dct_matrix", "orthonormal_codebooks",
    "OPQN", "OPQNConfig", "choose_feature_dim", "OrthoPQ", "code_dtype", "DEFAULT_BACKBONE",
    "BackboneError", "PretrainedUnavailable", "build_backbone", "parse_backbone_args",
    "METHODS", "QuantHead", "build_head",
]
