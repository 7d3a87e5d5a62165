"""Face datasets: presets for the paper's datasets, and a robust identity-folder loader.

A dataset named NAME lives at ``<data-dir>/NAME/{train,test}/<identity>/<image>``. The
training split is the retrieval database and the test split the query set.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

log = logging.getLogger("opqn")

from .folders import IMAGE_EXTENSIONS, scan_identity_folders  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class DatasetPreset:
    """Training protocol of a dataset (docs/paper.md, "Training protocol")."""

    input_size: int = 32
    epochs: int = 200
    lr_step: int = 35  # the learning rate is halved every lr_step epochs
    scale: float = 20.0
    top_k: int = 5  # k of precision@k in the final evaluation
    width: int = 64
    batch_size: int = 256
    cache: bool = False  # read from the pre-decoded uint8 cache by default


PRESETS: dict[str, DatasetPreset] = {
    "facescrub": DatasetPreset(),
    "youtube": DatasetPreset(),
    "cfw": DatasetPreset(),
    "vggface2": DatasetPreset(input_size=112, epochs=160, lr_step=20, scale=40.0, top_k=10),
    # Built-in procedural faces: sized so that the main job finishes on a 2-core CPU.
    "synthface": DatasetPreset(epochs=45, lr_step=15, width=16, batch_size=64, cache=True),
}
# Cross-dataset training (-c) uses the VGGFace2 protocol at 112x112.
CROSS_PRESET = PRESETS["vggface2"]
CROSS_SOURCE = "vggface2"
MONITOR_TOP_K = 50


def dataset_preset(name: str, cross: bool = False) -> DatasetPreset:
    """The preset for a dataset name; unknown names are generic 32x32 folders."""
    if cross:
        if name == "synthface":
            base = PRESETS["synthface"]
            return DatasetPreset(input_size=112, epochs=base.epochs, lr_step=base.lr_step,
                                 scale=40.0, top_k=base.top_k, width=base.width,
                                 batch_size=base.batch_size, cache=base.cache)
        return CROSS_PRESET
    return PRESETS.get(name.lower(), DatasetPreset())


def split_dirs(data_dir: str | Path, name: str, cross_train: bool = False) -> tuple[Path, Path]:
    """(database/train folder, query/test folder) for a dataset.

    With ``cross_train`` the training folders of the cross-dataset protocol are returned:
    ``vggface2/cross_train`` and ``cross_test`` (``synthface`` uses its own disjoint set).
    """
    if cross_train:
        source = "synthface" if name == "synthface" else CROSS_SOURCE
        root = Path(data_dir) / source
        return root / "cross_train", root / "cross_test"
    root = Path(data_dir) / name
    return root / "train", root / "test"


def find_images(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Sorted identity names and ``(path, identity)`` pairs under ``root/<identity>/``, in
    the deterministic order of :func:`data.folders.scan_identity_folders`."""
    classes, files = scan_identity_folders(root)
    return classes, [(os.path.join(root, *rel.split("/")), classes[label])
                     for rel, label in files]


class BrokenImage(NamedTuple):
    """Stands in for a sample whose file could not be decoded."""

    path: str
    reason: str


class FaceFolder(Dataset):
    """Identity-per-folder image dataset with per-sample transforms.

    ``__getitem__`` returns ``(image, label)``, or a :class:`BrokenImage` for a file that
    fails to decode: :func:`collate_skip_broken` takes it out of the batch and
    :func:`report_broken` (in the main process) reports it once and marks it so that later
    epochs skip it without decoding. A bad file never stops an epoch.

    Args:
        root: folder holding one sub-folder per identity.
        transform: applied to each RGB PIL image.
        class_to_idx: label of each identity name. Pass the database's mapping when loading
            queries so that labels agree; identities it lacks get new labels.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        classes, samples = find_images(self.root)
        mapping = dict(class_to_idx or {})
        for name in classes:
            mapping.setdefault(name, len(mapping))
        self.classes = classes
        self.class_to_idx = mapping
        self.samples = [(path, mapping[name]) for path, name in samples]
        self.targets = [label for _path, label in self.samples]
        self.broken: set[str] = set()  # files known to be unreadable: skipped, not retried

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        if path in self.broken:
            return BrokenImage(path, "unreadable")
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except Exception as exc:  # corrupt or unreadable: skip the sample, keep the epoch
            return BrokenImage(path, f"{type(exc).__name__}: {exc}")
        if self.transform is not None:
            image = self.transform(image)
        return image, label



class Batch(NamedTuple):
    """A collated batch: images ``(B, 3, S, S)``, int64 labels ``(B,)`` and the files of the
    batch that failed to decode (left out of it)."""

    images: torch.Tensor
    labels: torch.Tensor
    broken: list


def collate_skip_broken(batch: Sequence) -> Batch:
    """Collate the readable samples; broken ones go to ``Batch.broken``."""
    broken = [item for item in batch if isinstance(item, BrokenImage)]
    good = [item for item in batch if not isinstance(item, BrokenImage)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.int64), broken)
    images, labels = default_collate(good)
    return Batch(images, labels, broken)


def readable_items(dataset: Dataset) -> list[tuple[str, str]] | None:
    """``(image file, identity)`` of a split's readable items, in encoding order (the
    order of its codes): a :class:`FaceFolder` without its broken files, or a cached split
    (failed files never entered the cache). None for any other dataset."""
    names = {label: name for name, label in getattr(dataset, "class_to_idx", {}).items()}
    if isinstance(dataset, FaceFolder):
        return [(p, names[label]) for p, label in dataset.samples if p not in dataset.broken]
    cache = getattr(dataset, "cache", None)
    if cache is not None and hasattr(cache, "paths"):
        return [(p, names[int(label)]) for p, label in zip(cache.paths, dataset.targets)]
    return None


def report_broken(dataset: Dataset, broken: Sequence[BrokenImage]) -> None:
    """Warn once per unreadable file; the dataset then skips it without decoding.

    Called in the main process, so worker processes of later epochs inherit the list."""
    known: set[str] = getattr(dataset, "broken", set())
    for item in broken:
        if item.path not in known:
            known.add(item.path)
            log.warning("skipping unreadable image %s (%s)", item.path, item.reason)



class ImageList(Dataset):
    """Images given as a list of files, for search: ``__getitem__`` returns
    ``(image, position in the list)``, or a :class:`BrokenImage` for a file that fails to
    decode (skipped and reported like in :class:`FaceFolder`). The positions returned by a
    loader tell which files were readable.
    """

    def __init__(self, paths: Sequence[str | Path], transform: Callable | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.broken: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        if path in self.broken:
            return BrokenImage(path, "unreadable")
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except Exception as exc:  # reported by path; the other images go on
            return BrokenImage(path, f"{type(exc).__name__}: {exc}")
        if self.transform is not None:
            image = self.transform(image)
        return image, index


def list_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursively), sorted by relative path."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and ".cache-" not in d)
        found += [Path(dirpath) / f for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())
