"""Tests of the pre-decoded image cache ``data.cache``."""
from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from data import cache as cache_mod
from data.cache import CachedImageDataset, cache_dir_for, open_cache, resize_center_crop


def _img(path: Path, seed: int, size: tuple[int, int], mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)
    return path


@pytest.fixture()
def split(tmp_path: Path) -> Path:
    """A split folder with mixed sizes, formats and modes (3 identities, 9 images)."""
    root = tmp_path / "ds" / "train"
    _img(root / "bo" / "1.jpg", 1, (50, 50))
    _img(root / "bo" / "2.png", 2, (36, 80), "RGBA")
    _img(root / "bo" / "3.bmp", 3, (35, 35))
    _img(root / "al" / "1.png", 4, (90, 41), "L")
    _img(root / "al" / "2.jpg", 5, (20, 20))  # upscaled
    _img(root / "al" / "sub" / "3.png", 6, (37, 36))  # nested, as ImageFolder reads it
    _img(root / "cy" / "1.jpg", 7, (121, 120))
    _img(root / "cy" / "2.webp", 8, (64, 64))
    _img(root / "cy" / "3.png", 9, (200, 150))
    return root


def _reference(path: str, size: int) -> np.ndarray:
    """What the file path does: RGB, torchvision Resize(size) + CenterCrop(size)."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    return np.asarray(v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])(rgb))


@pytest.mark.parametrize("size", [35, 120])
def test_cache_equals_decoding_the_files(split: Path, size: int) -> None:
    cache = open_cache(split, size, progress=False)
    assert cache.root == cache_dir_for(split, size) == split.parent / f"train.cache-{size}"
    assert cache.classes == ["al", "bo", "cy"]
    assert isinstance(cache.images, np.memmap)
    assert cache.images.shape == (9, size, size, 3) and cache.images.dtype == np.uint8
    assert cache.labels.dtype == np.int64 and cache.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, path in enumerate(cache.paths):
        assert Path(path).parent.relative_to(split).parts[0] == cache.classes[cache.labels[i]]
        np.testing.assert_array_equal(cache.images[i], _reference(path, size))


def test_resize_center_crop_matches_torchvision() -> None:
    rng = np.random.default_rng(0)
    for w, h in [(40, 41), (41, 40), (36, 100), (100, 37), (3, 90), (77, 35), (35, 35)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = v2.Compose([v2.Resize(35, antialias=True), v2.CenterCrop(35)])(img)
        np.testing.assert_array_equal(np.asarray(resize_center_crop(img, 35)), np.asarray(ref))


def test_reused_then_rebuilt_when_the_split_changes(split: Path, monkeypatch) -> None:
    first = open_cache(split, 35, progress=False)
    builds = []
    real_build = cache_mod._build
    monkeypatch.setattr(cache_mod, "_build",
                        lambda *a, **k: (builds.append(1), real_build(*a, **k)))
    again = open_cache(split, 35, progress=False)
    assert builds == [] and again.fingerprint == first.fingerprint

    new = _img(split / "cy" / "4.png", 10, (40, 40))  # a file added
    grown = open_cache(split, 35, progress=False)
    assert builds == [1] and len(grown) == 10
    i = grown.paths.index(str(new))
    np.testing.assert_array_equal(grown.images[i], _reference(str(new), 35))

    _img(split / "cy" / "4.png", 11, (40, 40))  # a file replaced (new mtime)
    os.utime(new, ns=(1, 1))
    changed = open_cache(split, 35, progress=False)
    assert builds == [1, 1]
    np.testing.assert_array_equal(changed.images[i], _reference(str(new), 35))

    (split / "dd").mkdir()  # a new (empty) identity changes the label set
    assert open_cache(split, 35, progress=False).classes == ["al", "bo", "cy", "dd"]
    open_cache(split, 35, rebuild=True, progress=False)
    assert len(builds) == 4
    assert not [p for p in split.parent.iterdir() if p.name.startswith(".")]


def _install_racing(monkeypatch, root: Path, winner: Path | None) -> list[int]:
    """Make another process install ``winner`` (a cache folder; None: a stray folder) at
    ``root`` just before this process renames its own build there, once."""
    real_rename, raced = os.rename, []

    def rename(src, dst):
        if Path(dst) == root and Path(src).name.startswith(f".{root.name}.build-") and not raced:
            raced.append(1)
            if winner is None:
                (root / "junk").mkdir(parents=True)
            else:
                shutil.copytree(winner, root)
        return real_rename(src, dst)
    monkeypatch.setattr(cache_mod.os, "rename", rename)
    return raced


def test_concurrent_build_of_the_same_split_is_reused(split: Path, tmp_path: Path,
                                                       monkeypatch) -> None:
    other = open_cache(split, 35, cache_dir=tmp_path / "other", progress=False)
    root = cache_dir_for(split, 35)
    raced = _install_racing(monkeypatch, root, tmp_path / "other")
    cache = open_cache(split, 35, progress=False)
    assert raced == [1] and cache.root == root and cache.fingerprint == other.fingerprint
    np.testing.assert_array_equal(cache.images, other.images)
    assert not [p for p in split.parent.iterdir() if p.name.startswith(".")]


def test_concurrent_stray_folder_is_moved_aside(split: Path, monkeypatch) -> None:
    root = cache_dir_for(split, 35)
    raced = _install_racing(monkeypatch, root, None)
    cache = open_cache(split, 35, progress=False)
    assert raced == [1] and not (root / "junk").exists() and len(cache) == 9
    assert not [p for p in split.parent.iterdir() if p.name.startswith(".")]


def test_corrupt_file_left_out_and_reported_once(split: Path, caplog) -> None:
    bad = split / "bo" / "0_bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with caplog.at_level(logging.WARNING, logger="opqn"):
        cache = open_cache(split, 35, progress=False)
        assert len(cache) == 9 and str(bad) not in cache.paths
        assert [p for p, _ in cache.failed] == [str(bad)]
        # rows after the hole moved up: every row still matches its file
        for i, path in enumerate(cache.paths):
            np.testing.assert_array_equal(cache.images[i], _reference(path, 35))
        open_cache(split, 35, progress=False)
    assert sum(str(bad) in r.getMessage() for r in caplog.records) == 1


def test_dataset_items_batches_and_pickling(split: Path) -> None:
    from data.transforms import build_transform

    cache = open_cache(split, 35, progress=False)
    ds = CachedImageDataset(cache)
    image, label = ds[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 35, 35) and image.is_contiguous()
    assert label == 1
    assert torch.equal(image, torch.from_numpy(np.array(cache.images[4])).permute(2, 0, 1))

    images, labels = ds.get_batch([8, 0, 4])
    assert images.shape == (3, 3, 35, 35) and labels.tolist() == [2, 0, 1]
    assert torch.equal(images[1], ds[0][0])

    batches = list(DataLoader(ds, batch_size=4, shuffle=False))  # uses __getitems__
    assert torch.cat([b[1] for b in batches]).tolist() == cache.labels.tolist()
    assert torch.equal(batches[0][0][2], ds[2][0])

    train = CachedImageDataset(cache, build_transform(32, train=True, resized=True))
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == 0
    xb, yb = next(iter(DataLoader(train, batch_size=5)))
    assert xb.shape == (5, 3, 32, 32) and yb.dtype == torch.int64

    # workers get the cache by pickle: the memmap is reopened, not copied
    blob = pickle.dumps(ds)
    assert len(blob) < cache.images.nbytes
    clone = pickle.loads(blob)
    assert torch.equal(clone[3][0], ds[3][0])


def test_missing_or_empty_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_cache(tmp_path / "nope", 35)
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    with pytest.raises(ValueError):
        open_cache(tmp_path / "empty", 35)
