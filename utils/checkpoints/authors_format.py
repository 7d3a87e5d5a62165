"""The authors' released checkpoints (mzhang367/opqn; docs/paper.md): detection and conversion.

Their training saved ``{'backbone': nn.DataParallel(resnet20_pq).state_dict(), 'mlp': V}``
with ``V`` a Parameter ``(M, d, K)`` and nothing else (no configuration, no class weights,
no epoch). Their backbone is ours under other names:

=============================================  ======================================
theirs (after the ``module.`` prefix)          ours (``FaceResNet20``)
=============================================  ======================================
``layer{s}.0`` conv (with bias), ``.1`` BN,    ``stages.{s-1}.0.0`` conv (no bias),
``.2`` PReLU                                   ``.0.1`` BN, ``.0.2`` PReLU
``layer{s}.{j}.conv1/bn1/prelu1`` (j >= 3)     ``stages.{s-1}.{j-2}.body.0.{0,1,2}``
``layer{s}.{j}.conv2/bn2/prelu2``              ``stages.{s-1}.{j-2}.body.1.{0,1,2}``
``bn``, ``fc``, ``last_bn``                    ``head.1``, ``head.3``, ``head.4``
=============================================  ======================================

**The stage-opening conv bias is folded into the BatchNorm that follows it**: for a bias
``b``, ``BN(conv(x) + b)`` uses ``x - running_mean`` in eval mode, so
``running_mean' = running_mean - b`` gives the same output without the bias. In train mode
the batch mean absorbs any constant per-channel bias, so fine-tuning is unaffected too.

The configuration follows from the shapes alone: the width from ``layer1.0``'s
out-channels, the input size from ``bn``'s width (``8·width·7·7`` for 112,
``8·width·4·4`` for 32), ``D`` from ``fc`` and ``M, d, K`` from ``mlp``. (Their narrow
variant, 16-32-64-128 channels, always has strides 1, 2, 2, 2, so it exists at 32x32 only;
it maps onto ``--width 16``.) The class weights
were not saved, so a converted checkpoint has none: resuming from it starts a new class
head (and a new optimizer) at epoch 0.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from models import RetrievalNet, NetConfig
from models.backbone import UNITS_PER_STAGE
from utils.errors import CheckpointError

__all__ = ["AUTHORS_FORMAT", "is_authors_format", "convert_authors_checkpoint",
           "infer_authors_config"]

AUTHORS_FORMAT = "authors' OPQN checkpoint (mzhang367/opqn)"
_PREFIX = "module."
# Block sub-layers: theirs -> (conv_bn_prelu index inside our unit body, layer index).
_BLOCK_PARTS = {"conv1": (0, 0), "bn1": (0, 1), "prelu1": (0, 2),
                "conv2": (1, 0), "bn2": (1, 1), "prelu2": (1, 2)}
_HEAD = {"bn": "head.1", "fc": "head.3", "last_bn": "head.4"}
# Final feature-map side per input size (docs/paper.md, "Model"): 4x4 at 32, 7x7 at 112.
_SIDE_TO_INPUT = {4: 32, 7: 112}


def _strip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Their keys without DataParallel's ``module.`` prefix."""
    return {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in state.items()}


def is_authors_format(obj: object) -> bool:
    """A dict with exactly the authors' two keys: a ``backbone`` state_dict holding their
    ``layer1`` convolution and an ``mlp`` tensor ``(M, d, K)``."""
    if not isinstance(obj, dict) or "format" in obj:
        return False
    backbone, mlp = obj.get("backbone"), obj.get("mlp")
    return (isinstance(backbone, dict) and isinstance(mlp, Tensor) and mlp.dim() == 3
            and "layer1.0.weight" in _strip(backbone))


def _need(state: Mapping[str, Tensor], key: str, path: Path | None) -> Tensor:
    value = state.get(key)
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{AUTHORS_FORMAT} {path or ''} is incomplete: no tensor "
                              f"{_PREFIX}{key}", path)
    return value


def infer_authors_config(state: Mapping[str, Tensor], mlp: Tensor,
                         path: Path | None = None) -> NetConfig:
    """Our configuration from their tensors alone (``state`` without the prefix)."""
    width = int(_need(state, "layer1.0.weight", path).shape[0])
    flat = int(_need(state, "bn.weight", path).shape[0])
    side = math.isqrt(max(flat // (8 * width), 0))
    if 8 * width * side * side != flat or side not in _SIDE_TO_INPUT:
        raise CheckpointError(f"{AUTHORS_FORMAT} {path or ''}: head width {flat} is neither "
                              f"8*{width}*4*4 (32x32) nor 8*{width}*7*7 (112x112)", path)
    feature_dim = int(_need(state, "fc.weight", path).shape[0])
    num_books, word_dim, num_words = (int(s) for s in mlp.shape)
    if num_books * word_dim != feature_dim:
        raise CheckpointError(f"{AUTHORS_FORMAT} {path or ''}: mlp {tuple(mlp.shape)} does not "
                              f"split fc's D={feature_dim} into M x d", path)
    if num_words < 2 or num_words & (num_words - 1) or num_words > word_dim:
        raise CheckpointError(f"{AUTHORS_FORMAT} {path or ''}: K={num_words} must be a power "
                              f"of two <= d={word_dim}", path)
    input_size = _SIDE_TO_INPUT[side]
    return NetConfig(num_books=num_books, num_words=num_words, feature_dim=feature_dim,
                      num_classes=0, input_size=input_size, width=width,
                      scale=40.0 if input_size == 112 else 20.0, dataset="")


def _map_backbone(state: Mapping[str, Tensor], reference: Mapping[str, Tensor],
                  path: Path | None) -> OrderedDict[str, Tensor]:
    """Rename their backbone tensors to ours, folding the stage conv biases into BN."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    biases: dict[str, Tensor] = {}  # our BN prefix -> conv bias to fold into it
    unknown = []
    for key, value in state.items():
        match = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
        head = key.split(".", 1)
        if match:
            stage, index, rest = int(match[1]) - 1, int(match[2]), match[3]
            if index < 3:  # the stage opening: conv (0), BN (1), PReLU (2)
                if index == 0 and rest == "bias":
                    biases[f"stages.{stage}.0.1"] = value
                    continue
                out[f"stages.{stage}.0.{index}.{rest}"] = value
                continue
            part, param = rest.split(".", 1) if "." in rest else (rest, "")
            if part in _BLOCK_PARTS and param:
                conv, layer = _BLOCK_PARTS[part]
                unit = f"stages.{stage}.{index - 2}.body.{conv}"
                if part.startswith("conv") and param == "bias":
                    biases[f"{unit}.1"] = value  # not in the released layout; fold it too
                    continue
                out[f"{unit}.{layer}.{param}"] = value
                continue
        elif len(head) == 2 and head[0] in _HEAD:
            out[f"{_HEAD[head[0]]}.{head[1]}"] = value
            continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"{AUTHORS_FORMAT} {path or ''} has tensors this backbone does "
                              f"not know: {', '.join(_PREFIX + k for k in unknown[:5])}", path)
    for bn, bias in biases.items():
        mean = out.get(f"{bn}.running_mean")
        if mean is None or mean.shape != bias.shape:
            raise CheckpointError(f"{AUTHORS_FORMAT} {path or ''}: a conv bias has no matching "
                                  f"BatchNorm to fold into ({bn})", path)
        # BN(conv(x) + b) == BN'(conv(x)) with running_mean' = running_mean - b (eval mode).
        out[f"{bn}.running_mean"] = (mean.double() - bias.double()).to(mean.dtype)
    for key, ref in reference.items():
        value = out.get(key)
        if value is None and key.endswith("num_batches_tracked"):
            out[key] = torch.zeros_like(ref)  # absent from very old torch's BN state
        elif value is not None and key.endswith(".weight") and value.numel() == 1 \
                and ref.numel() > 1 and ".2.weight" in key:
            out[key] = value.expand_as(ref).clone()  # one shared PReLU slope, per channel
    return out


def convert_authors_checkpoint(obj: dict, path: str | Path | None = None) -> dict:
    """The authors' ``{'backbone', 'mlp'}`` dict as one of our checkpoint dicts.

    Returns a dict with ``config``, ``backbone``, ``quantizer`` (our state_dicts, checked by
    loading them into a fresh model), ``epoch`` 0, empty ``classes``/``history`` and
    ``converted_from``; no class weights or optimizer state (they were never saved).
    Raises ``CheckpointError`` (one line) when the tensors do not form the authors' model.
    """
    path = None if path is None else Path(path)
    state = _strip(obj["backbone"])
    mlp = obj["mlp"].detach().float()
    config = infer_authors_config(state, mlp, path)
    model = RetrievalNet(config)
    counts = [len({k.split(".")[1] for k in state if k.startswith(f"layer{s}.")} - {"0", "1", "2"})
              for s in range(1, 5)]
    if tuple(counts) != UNITS_PER_STAGE:
        raise CheckpointError(f"{AUTHORS_FORMAT} {path or ''} has {counts} residual blocks per "
                              f"stage; this backbone has {list(UNITS_PER_STAGE)}", path)
    backbone = _map_backbone({k: v.detach() for k, v in state.items()},
                             model.backbone.state_dict(), path)
    quantizer = OrderedDict(codebooks=model.quantizer.codebooks.clone(), assignment=mlp.clone())
    try:
        model.backbone.load_state_dict(backbone)
        model.quantizer.load_state_dict(quantizer)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CheckpointError(f"{AUTHORS_FORMAT} {path or ''} does not fit the inferred "
                              f"configuration: {(lines[1:] or lines)[0][:300]}", path) from None
    return {
        "config": config.to_dict(),
        "backbone": backbone,
        "quantizer": quantizer,
        "epoch": 0,
        "best_loss": math.inf,
        "best_epoch": 0,
        "history": [],
        "classes": [],
        "converted_from": AUTHORS_FORMAT,
    }
