"""Encode your own images with a trained model: the Python API's entry point.

:func:`encode_images` takes image files or PIL images, applies the model's own evaluation
transform (resize, centre crop and the normalisation it was trained with) and returns the
features, the database codes and the query tables, so that API users cannot feed
unnormalised or wrongly sized pixels by mistake.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
from PIL import Image
from torch import Tensor, nn

from data.transforms import build_transform
from utils.precision import run_fp32

ImageLike = Union[str, os.PathLike, Image.Image]

__all__ = ["EncodedImages", "encode_images", "model_input_size"]


@dataclass
class EncodedImages:
    """What a model makes of N images.

    Attributes:
        features: float32 ``(N, D)`` backbone features.
        codes: ``(N, M)`` hard codes for a database (uint8 when K <= 256).
        tables: float32 ``(N, M, K)`` lookup tables for querying with
            :func:`utils.retrieval.adc.search_adc` / ``evaluate_adc``.
    """

    features: Tensor
    codes: Tensor
    tables: Tensor

    def __len__(self) -> int:
        return self.features.shape[0]


def model_input_size(model: nn.Module) -> int:
    """The input size (32 or 112) the model was trained at."""
    config = getattr(model, "config", None)
    size = getattr(config, "input_size", None) or getattr(
        getattr(model, "backbone", None), "input_size", None)
    if size is None:
        raise ValueError("cannot tell the model's input size: expected a model with "
                         ".config.input_size (e.g. from utils.checkpoints.load_model)")
    return int(size)


def _open(item: ImageLike, position: int) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        try:
            with Image.open(Path(item)) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read image {item}: {exc}") from None
    raise TypeError(f"images[{position}] is a {type(item).__name__}; expected a path or a "
                    f"PIL image")


@torch.no_grad()
def encode_images(model: nn.Module, images: Sequence[ImageLike] | ImageLike,
                  batch_size: int = 256) -> EncodedImages:
    """Features, codes and query tables of ``images`` under ``model``'s evaluation transform.

    Args:
        model: a trained model (``utils.checkpoints.load_model``): ``model(x)`` gives features
            and ``model.quantizer`` has ``encode`` and ``lookup_tables``.
        images: image paths or PIL images (one, or a sequence), any size; each is resized
            and centre-cropped to the model's input size and normalised as in training.
        batch_size: images per forward pass.

    Returns:
        :class:`EncodedImages` with ``features (N, D)``, ``codes (N, M)`` and
        ``tables (N, M, K)``, on the model's device.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    items = list(images)
    if not items:
        raise ValueError("encode_images needs at least one image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    transform = build_transform(model_input_size(model), train=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = torch.stack([transform(_open(item, start + i))
                                 for i, item in enumerate(chunk)])
            features.append(model(batch.to(device)).float())
    finally:
        model.train(was_training)
    feats = torch.cat(features)
    # The head verbs of utils.retrieval.encoding, in fp32 as there: codes for the database, tables
    # for the queries.
    return EncodedImages(feats, run_fp32(model.quantizer.encode, feats),
                         run_fp32(model.quantizer.query_tables, feats))
