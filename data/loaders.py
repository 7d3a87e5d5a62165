"""Build the train / gallery / query datasets and their data loaders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .datasets import FaceFolder, collate_skip_broken
from .transforms import build_transform


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
                 with_train: bool = True) -> RetrievalSplits:
    """Datasets for one train/test folder pair at ``input_size`` (32 or 112)."""
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
