"""Precise BatchNorm: recompute every BatchNorm's running statistics after training.

During training a BatchNorm layer keeps an exponential moving average (momentum 0.1, so the
last ~10 batches) of batch statistics taken from *augmented* images, with Dropout active
before the face head's last BatchNorm1d, while the weights still move at the current
learning rate. Evaluation normalises un-augmented images, without Dropout, with those
averages. :func:`recompute_bn_statistics` replaces them by the population statistics of
the finished weights: one float32 pass over the training images under the evaluation
transform, Dropout off, each BatchNorm normalising with its batch statistics (as in
training) while its running mean and variance accumulate an exact image-weighted average.
pycls and detectron2 call this step precise BN.

Why the project needs it: under bf16 training the stored averages cost OPQN 7-10 mAP points
on real images, although the learned weights are good (see docs/training.md, "Mixed precision").
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.precision import fp32_zone

# Default number of training images of the recomputation (pycls uses 8,192): enough for
# the mean and variance of every channel, and a small fraction of an epoch.
DEFAULT_PRECISE_BN_IMAGES = 16384


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (1d, 2d, 3d, SyncBatchNorm) of ``model`` that tracks statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def precise_bn_subset(dataset, max_images: int, seed: int = 0):
    """``dataset`` itself, or a seeded random subset of ``max_images`` of it (the images of
    a folder are sorted by identity, so a prefix would hold only the first identities)."""
    if max_images <= 0:
        raise ValueError(f"max_images must be positive, got {max_images}")
    if len(dataset) <= max_images:
        return dataset
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)[:max_images]
    return Subset(dataset, sorted(chosen.tolist()))


def _batches(loader: Iterable, progress: bool) -> Iterable[Tensor]:
    for batch in tqdm(loader, desc="precise BN", leave=False, disable=not progress):
        images = batch if isinstance(batch, Tensor) else batch.images
        if images.shape[0] >= 2:  # train-mode BatchNorm needs two samples per channel
            yield images


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, loader: DataLoader | Iterable,
                            device: torch.device, progress: bool = True) -> dict:
    """Replace the running mean and variance of every BatchNorm of ``model`` by their
    average over ``loader``'s batches (float tensors ``(B, ...)`` that ``model`` takes, or
    :class:`data.datasets.Batch` of images), computed in float32 with autocast off.

    Each batch's statistics enter with weight B / (images so far), so the running mean is
    the exact mean over all images and the running variance the image-weighted mean of the
    batches' unbiased variances. ``model`` keeps its mode and momenta.

    Returns:
        ``{"images": n, "batches": b, "layers": number of BatchNorm layers}``.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return {"images": 0, "batches": 0, "layers": 0}
    was_training = model.training
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
    # Dropout off as at evaluation; the BatchNorms normalise with batch statistics.
    model.eval()
    for layer in layers:
        layer.train()
    seen = batches = 0
    try:
        with fp32_zone():
            for images in _batches(loader, progress):
                size = images.shape[0]
                for layer in layers:
                    layer.momentum = size / (seen + size)
                model(images.to(device, non_blocking=True).float())
                seen += size
                batches += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    if not seen:
        raise RuntimeError("precise BN: no batch of at least 2 readable images")
    return {"images": seen, "batches": batches, "layers": len(layers)}

