"""Face backbones by name: the paper's ``sphere20`` or any ``timm`` model with a feature map.

Every backbone maps ``(B, 3, S, S)`` images to ``(B, feature_dim)`` features through the same
head as the paper's network: flatten the final feature map, BatchNorm1d, Dropout, Linear to
D, BatchNorm1d(D). Quantization heads (OPQN and the compared methods) take a backbone from
:func:`build_backbone` and never depend on which one it is.

A timm model is created with ``features_only=True`` (its last stage, always NCHW); models
without a feature-pyramid mode fall back to ``forward_features`` when that returns an NCHW
map. The size of the final map is read with a dry forward pass at the preset's input size,
so any stem and stage strides work. At 32x32 a stride-32 network (resnet18, EdgeNeXt) leaves
a 1x1 map: the head then sees one C-vector, a global descriptor. Models that support dilation
can keep a 4x4 map like sphere20's with ``--backbone-args output_stride=8`` (resnet*), at the
price of more FLOPs.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from .backbone import FaceHead, FaceResNet20, check_input_shape

DEFAULT_BACKBONE = "sphere20"


class BackboneError(ValueError):
    """A backbone could not be built; the message is one line naming it and why."""


class PretrainedUnavailable(BackboneError):
    """``--pretrained`` weights could not be fetched (no network, no local copy)."""


class TimmFaceBackbone(nn.Module):
    """A timm network's last feature map followed by :class:`models.backbone.FaceHead`.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``edgenext_x_small``.
        input_size: side S of the square input; the map size is measured at this size.
        feature_dim: D.
        pretrained: load timm's pretrained weights (needs the network or a local HF cache).
        dropout: dropout before the linear layer (0.5, as in the paper's head).
        timm_args: extra keyword arguments of ``timm.create_model`` (e.g. ``output_stride``,
            ``drop_path_rate``); stored in checkpoints.

    Input ``(B, 3, S, S)``; output ``(B, feature_dim)``. ``map_shape`` is ``(C, h, w)``.
    """

    def __init__(self, name: str, input_size: int, feature_dim: int, pretrained: bool = False,
                 dropout: float = 0.5, timm_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.name, self.input_size, self.feature_dim = name, input_size, feature_dim
        self.timm_args = dict(timm_args or {})
        self.body, self._features_only = _create_timm(name, pretrained, self.timm_args)
        self.map_shape = self._dry_map_shape(input_size)
        channels, height, width = self.map_shape
        self.head = FaceHead(channels * height * width, feature_dim, dropout)
        for module in self.head.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def feature_map(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> the last ``(B, C, h, w)`` feature map."""
        if self._features_only:
            return self.body(images)[-1]
        return self.body.forward_features(images)

    def _dry_map_shape(self, input_size: int) -> tuple[int, int, int]:
        was_training = self.body.training
        self.body.eval()
        try:
            with torch.no_grad():
                out = self.feature_map(torch.zeros(1, 3, input_size, input_size))
        except Exception as exc:  # noqa: BLE001 - e.g. a ViT with a fixed image size
            raise BackboneError(f"backbone {self.name!r} cannot take {input_size}x{input_size} "
                                f"inputs ({type(exc).__name__}: {_first_line(exc)})") from None
        finally:
            self.body.train(was_training)
        if not isinstance(out, Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise BackboneError(f"backbone {self.name!r} gives no (B, C, h, w) feature map "
                                f"(got {shape}); choose a convolutional timm model")
        return tuple(int(v) for v in out.shape[1:])  # type: ignore[return-value]

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` images -> ``(B, feature_dim)`` features."""
        check_input_shape(images, self.input_size)
        return self.head(self.feature_map(images))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs every retry of an unreachable host; our error says it once."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        yield
        return
    before = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(before)


def _create_timm(name: str, pretrained: bool, timm_args: dict[str, Any]) -> tuple[nn.Module, bool]:
    """timm model for ``name``: features_only when it has that mode, else the whole net."""
    try:
        import timm
    except ImportError:
        raise BackboneError(f"backbone {name!r} needs timm (pip install timm)") from None
    if not timm.is_model(name):
        raise BackboneError(f"unknown backbone {name!r}: use {DEFAULT_BACKBONE} or a timm model "
                            f"name (python -c \"import timm; print(timm.list_models())\")")
    if pretrained and not timm.models.get_pretrained_cfg(name):
        raise BackboneError(f"timm has no pretrained weights for backbone {name!r}")

    def create(**kw) -> nn.Module:
        try:
            with _quiet_hub():
                return timm.create_model(name, pretrained=pretrained, **timm_args, **kw)
        except TypeError as exc:  # an argument this model does not take
            raise BackboneError(f"backbone {name!r} rejects --backbone-args "
                                f"{timm_args}: {_first_line(exc)}") from None
        except (OSError, ConnectionError, RuntimeError) as exc:
            if pretrained and _looks_like_download_failure(exc):
                raise PretrainedUnavailable(
                    f"--pretrained: cannot fetch timm weights for {name!r} (offline, or not in "
                    f"the local Hugging Face cache; {type(exc).__name__}); run once with "
                    f"network access, or train without --pretrained") from None
            raise

    try:
        return create(features_only=True, out_indices=(-1,)), True
    except BackboneError:
        raise
    except RuntimeError as exc:
        if "features_only" not in str(exc):
            raise
    return create(num_classes=0, global_pool=""), False


def _looks_like_download_failure(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, ConnectionError)):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("connection", "offline", "hub", "download", "resolve"))


def build_backbone(name: str, input_size: int, width: int, feature_dim: int, *,
                   pretrained: bool = False, dropout: float = 0.5,
                   backbone_args: dict[str, Any] | None = None) -> nn.Module:
    """The face backbone called ``name``: ``(B, 3, S, S)`` images -> ``(B, feature_dim)``.

    Args:
        name: ``sphere20`` (the paper's SphereFace-20, :class:`FaceResNet20`) or a timm
            model name with a feature map (``edgenext_x_small``, ``resnet18``, ...).
        input_size: S, the preset's input side (32 or 112).
        width: sphere20's first-stage channels (64 in the paper); timm models have their own
            widths and ignore it.
        feature_dim: D.
        pretrained: timm only: start from timm's pretrained weights.
        dropout: dropout of the head (0.5).
        backbone_args: timm only: extra ``timm.create_model`` keyword arguments.

    The returned module has ``input_size`` and ``feature_dim`` attributes. Raises
    :class:`BackboneError` (one line) for an unknown name or unusable arguments, and
    :class:`PretrainedUnavailable` when pretrained weights cannot be fetched.
    """
    if name == DEFAULT_BACKBONE:
        if pretrained:
            raise BackboneError("--pretrained: there are no pretrained weights for sphere20 "
                                "(the paper trains it from scratch); use a timm backbone")
        if backbone_args:
            raise BackboneError(f"--backbone-args are for timm backbones, not sphere20 "
                                f"(got {backbone_args})")
        return FaceResNet20(feature_dim, input_size, width, dropout)
    return TimmFaceBackbone(name, input_size, feature_dim, pretrained, dropout, backbone_args)


def parse_backbone_args(items: list[str] | None) -> dict[str, Any]:
    """``["output_stride=8", "drop_path_rate=0.1"]`` -> ``{"output_stride": 8, ...}``.

    Values are read as Python literals (numbers, True/False/None, tuples), else kept as
    strings. Raises :class:`BackboneError` for an item without ``=``.
    """
    import ast

    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise BackboneError(f"--backbone-args takes KEY=VALUE items, got {item!r}")
        try:
            parsed_value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed_value = value.strip()
        if not isinstance(parsed_value, (int, float, str, tuple, list, type(None))):
            raise BackboneError(f"--backbone-args {item!r}: values are numbers, strings, "
                                f"True/False/None or tuples")
        parsed[key.strip()] = parsed_value
    return parsed
