"""Build the train / gallery / query datasets and their data loaders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .cache import CachedImageDataset, open_cache
from .datasets import FaceFolder, collate_skip_broken
from .transforms import build_transform, stored_size


@dataclass
class RetrievalSplits:
    """``train``: augmented training images; ``gallery``: the same folder with the test
    transform (the retrieval database); ``queries``: the test folder (the query set).
    Labels agree across the three (the queries reuse the gallery's identity mapping)."""

    train: Dataset
    gallery: Dataset
    queries: Dataset

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def build_splits(train_dir: str | Path, test_dir: str | Path, input_size: int,
                 with_train: bool = True, cache: bool = False,
                 progress: bool = True) -> RetrievalSplits:
    """Datasets for one train/test folder pair at ``input_size`` (32 or 112).

    With ``cache`` the images are decoded and resized once into a uint8 memory map beside
    each split (:mod:`data.cache`), rebuilt when the split changes, and read from there.
    """
    if cache:
        size = stored_size(input_size)
        train_cache = open_cache(train_dir, size, progress=progress)
        test_cache = open_cache(test_dir, size, progress=progress)
        test_tf = build_transform(input_size, train=False, resized=True)
        gallery = CachedImageDataset(train_cache, test_tf)
        queries = CachedImageDataset(test_cache, test_tf, class_to_idx=gallery.class_to_idx)
        train = CachedImageDataset(
            train_cache, build_transform(input_size, train=True, resized=True)) \
            if with_train else gallery
        return RetrievalSplits(train, gallery, queries)
    test_tf = build_transform(input_size, train=False)
    gallery = FaceFolder(train_dir, test_tf)
    queries = FaceFolder(test_dir, test_tf, class_to_idx=gallery.class_to_idx)
    train = FaceFolder(train_dir, build_transform(input_size, train=True)) if with_train else gallery
    return RetrievalSplits(train, gallery, queries)


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                shuffle: bool = False, generator: torch.Generator | None = None,
                sampler: DistributedSampler | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader that tolerates unreadable images and pins memory for CUDA."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_skip_broken,
        generator=generator,
        drop_last=drop_last,
        prefetch_factor=4 if workers > 0 else None,
    )
