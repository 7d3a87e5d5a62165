"""Backbones (by name, through the registry), orthonormal codebooks, the methods (by name,
through theirs) and the network that joins a backbone to a method's head."""
from .backbone import FaceResNet20
from .codebooks import dct_matrix, orthonormal_codebooks
from .flops import count_flops, count_parameters
from .methods import (DEFAULT_METHOD, MethodSpec, OPQNHead, OrthoPQ, QuantHead, build_head,
                      build_loss, code_dtype, get_method, method_names, register)
from .network import OPQN, NetConfig, OPQNConfig, RetrievalNet, choose_feature_dim
from .registry import (DEFAULT_BACKBONE, BackboneError, PretrainedUnavailable, build_backbone,
                       parse_backbone_args)

__all__ = [
    "FaceResNet20", "count_flops", "count_parameters", "dct_matrix", "orthonormal_codebooks",
    "RetrievalNet", "NetConfig", "choose_feature_dim", "OPQNHead", "code_dtype",
    "OPQN", "OPQNConfig", "OrthoPQ", "DEFAULT_BACKBONE",
    "BackboneError", "PretrainedUnavailable", "build_backbone", "parse_backbone_args",
    "DEFAULT_METHOD", "MethodSpec", "QuantHead", "build_head", "build_loss", "get_method",
    "method_names", "register",
]
