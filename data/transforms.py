"""Per-sample train and test transforms for the two input sizes (docs/paper.md, "Training protocol").

Resizing happens per sample, so datasets of mixed image sizes batch correctly. Every image
is first brought to a stored ``S x S`` square (shorter side resized to S, centre crop):
the same function fills the pre-decoded cache, so reading files and reading the cache give
the same tensors, also for non-square images. For square images this is the paper's
"resize to S".
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

# Channel statistics used by the paper for the 32x32 datasets.
SMALL_MEAN = (0.639, 0.479, 0.404)
SMALL_STD = (0.216, 0.183, 0.171)
LARGE_MEAN = (0.5, 0.5, 0.5)
LARGE_STD = (0.5, 0.5, 0.5)

# Images are resized (shorter side) to the stored size, then cropped to the input size.
STORED_SIZE = {32: 35, 112: 120}


def stored_size(input_size: int) -> int:
    """Size to which images are resized before cropping: 35 for 32, 120 for 112."""
    if input_size not in STORED_SIZE:
        raise ValueError(f"input size must be one of {sorted(STORED_SIZE)}, got {input_size}")
    return STORED_SIZE[input_size]


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bilinear), then the centre ``size x size`` crop.

    Reproduces torchvision ``Resize(size)`` followed by ``CenterCrop(size)`` on a PIL image:
    the longer side becomes ``int(size * long / short)`` and the crop offset is
    ``int(round((side - size) / 2))``. Returns an RGB image when given one.
    """
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    if (left, top, new_w, new_h) != (0, 0, size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


class ResizeCenterSquare:
    """PIL image (or uint8 ``(3, H, W)`` tensor) -> RGB PIL image ``S x S`` by
    :func:`resize_center_crop`; a class, not a lambda, so that DataLoader workers can
    pickle it."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            img = v2.functional.to_pil_image(img)
        return resize_center_crop(img.convert("RGB"), self.size)

    def __repr__(self) -> str:
        return f"ResizeCenterSquare(size={self.size})"


def normalization(input_size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` for an input size."""
    return (SMALL_MEAN, SMALL_STD) if input_size == 32 else (LARGE_MEAN, LARGE_STD)


def build_transform(input_size: int, train: bool, resized: bool = False) -> Callable:
    """Transform from a PIL image (or a uint8 ``(3, H, W)`` tensor) to a float tensor
    ``(3, input_size, input_size)``.

    Args:
        input_size: 32 or 112.
        train: random crop and horizontal flip when True, centre crop otherwise.
        resized: the input is already the stored ``S x S`` square (a pre-decoded cache),
            so the resize step is skipped.
    """
    size = stored_size(input_size)
    mean, std = normalization(input_size)
    steps: list = [] if resized else [ResizeCenterSquare(size)]
    steps.append(v2.ToImage())
    if train:
        steps += [v2.RandomCrop(input_size), v2.RandomHorizontalFlip()]
    else:
        steps.append(v2.CenterCrop(input_size))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)
