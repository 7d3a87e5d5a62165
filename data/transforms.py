"""Per-sample train and test transforms for the two input sizes (SPEC §2).

Resizing happens per sample, so datasets of mixed image sizes batch correctly.
"""
from __future__ import annotations

from typing import Callable

import torch
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


def normalization(input_size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` for an input size."""
    return (SMALL_MEAN, SMALL_STD) if input_size == 32 else (LARGE_MEAN, LARGE_STD)


def build_transform(input_size: int, train: bool, resized: bool = False) -> Callable:
    """Transform from a PIL image (or a uint8 ``(3, H, W)`` tensor) to a float tensor
    ``(3, input_size, input_size)``.

    Args:
        input_size: 32 or 112.
        train: random crop and horizontal flip when True, centre crop otherwise.
        resized: the input is already at the stored size (a pre-decoded cache), so the
            resize step is skipped.
    """
    size = stored_size(input_size)
    mean, std = normalization(input_size)
    steps: list = [v2.ToImage()]
    if not resized:
        steps.append(v2.Resize(size, antialias=True))
    if train:
        steps += [v2.RandomCrop(input_size), v2.RandomHorizontalFlip()]
    else:
        steps.append(v2.CenterCrop(input_size))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)
