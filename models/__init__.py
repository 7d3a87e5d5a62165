"""Backbone, orthonormal codebooks and the OPQN quantization head."""
from .backbone import FaceResNet20, count_flops
from .codebooks import dct_matrix, orthonormal_codebooks
from .opqn import OPQN, OPQNConfig, choose_feature_dim
from .heads import METHODS, QuantHead, build_head
from .quantizer import OrthoPQ, code_dtype

__all__ = [
    "FaceResNet20", "count_flops", "dct_matrix", "orthonormal_codebooks", "OPQN",
    "OPQNConfig", "choose_feature_dim", "OrthoPQ", "code_dtype", "METHODS", "QuantHead",
    "build_head",
]
