"""Pre-decoded image cache: decode and resize every image of a split once, then memory-map it.

Decoding JPEGs dominates the input pipeline of the small 32x32 models; a uint8 array of the
already resized images removes that cost and leaves only the cheap random crop, flip and
normalisation per sample.

Layout: the cache of ``<split_dir>`` (e.g. ``data/facescrub/train``) at stored size ``S`` is
the sibling folder ``<split_dir>.cache-<S>`` (``data/facescrub/train.cache-35``), outside the
identity folders so that folder scanners never see it (``data/*/`` is git-ignored). It holds

* ``images.u8``: raw uint8 array ``(N, S, S, 3)`` (RGB, HWC, C order), memory-mapped;
* ``labels.npy``: int64 ``(N,)``, the index of the identity in ``classes``;
* ``meta.json``: format version, ``S``, the fingerprint, ``classes`` (sorted identity folder
  names, index = label, the torchvision ``ImageFolder`` convention), ``paths`` (relative to
  the split folder, row order) and ``failed`` (files that did not decode, left out).

Each image is converted to RGB, its shorter side resized to ``S`` with PIL bilinear
resampling (which antialiases when shrinking) and the centre ``S x S`` cropped, with the
size and crop-offset arithmetic of torchvision's ``Resize(S)`` + ``CenterCrop(S)``
(:func:`data.transforms.resize_center_crop`). Reading the files applies the very same
function first (``data.transforms.build_transform``), so the cache and the files give equal
tensors, for non-square images too.

The fingerprint hashes the format version, ``S``, the class names and every file's relative
path, size and mtime; :func:`open_cache` rebuilds when it differs (a file added, removed or
replaced) or when ``rebuild=True``. A build writes into a hidden temporary sibling folder
and renames it into place, so an interrupted build never leaves a cache that looks valid.

``python -m data.cache SPLIT_DIR --size S [--rebuild]`` builds (or checks) a cache ahead of
training.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from .folders import scan_identity_folders
from .transforms import STORED_SIZE
from .transforms import resize_center_crop  # noqa: F401 (re-exported)

log = logging.getLogger("opqn")

CACHE_VERSION = 1
_RESIZE_METHOD = "rgb;pil-bilinear-shorter-side;center-crop-torchvision"
_IMAGES = "images.u8"
_LABELS = "labels.npy"
_META = "meta.json"


def decode_resized(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Decode one file as the cache stores it: uint8 ``(size, size, 3)`` RGB."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    return np.asarray(resize_center_crop(rgb, size), dtype=np.uint8)


def cache_dir_for(split_dir: str | os.PathLike[str], size: int) -> Path:
    """Default cache folder of a split: the sibling ``<split_dir>.cache-<size>``."""
    split = Path(split_dir)
    return split.parent / f"{split.name}.cache-{size}"


FileRecord = tuple[str, int, int, int]  # (relative posix path, label, bytes, mtime in ns)


def scan_split(split_dir: str | os.PathLike[str]) -> tuple[list[str], list[FileRecord]]:
    """Identity folders and image files of a split.

    Returns ``(classes, files)``: ``classes`` are the sorted sub-folder names (index =
    label) and ``files`` are ``(relative posix path, label, size in bytes, mtime in ns)``,
    sorted by class then path, searching each class folder recursively like ImageFolder.
    """
    root = Path(split_dir)
    classes, found = scan_identity_folders(root)
    files: list[FileRecord] = []
    for rel, label in found:
        st = os.stat(root / rel)  # follows symlinks: the linked file's size and mtime
        files.append((rel, label, st.st_size, st.st_mtime_ns))
    return classes, files


def split_fingerprint(classes: Sequence[str], files: Sequence[FileRecord],
                      size: int) -> str:
    """SHA-256 over the format version, ``size``, class names and (path, bytes, mtime)."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, _RESIZE_METHOD, size, list(classes)]).encode())
    for rel, _label, nbytes, mtime in files:
        h.update(f"\n{rel}\0{nbytes}\0{mtime}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class DecodedCache:
    """A built cache, opened read-only.

    Attributes:
        images: ``np.memmap`` uint8 ``(N, S, S, 3)``, RGB, HWC (opened lazily per process,
            so pickling the cache to DataLoader workers does not copy the array).
        labels: ``np.ndarray`` int64 ``(N,)``.
        classes: sorted identity names; ``classes[label]`` is the identity.
        paths: source file of each row (``split_dir/<relative path>``).
        failed: ``(path, reason)`` of files that did not decode and were left out.
        size: ``S``. root: the cache folder. split_dir: the split it was built from.
    """

    def __init__(self, root: Path, split_dir: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.split_dir = split_dir
        self.size: int = int(meta["size"])
        self.classes: list[str] = list(meta["classes"])
        self.paths: list[str] = [str(split_dir / rel) for rel in meta["paths"]]
        self.failed: list[tuple[str, str]] = [(str(split_dir / p), r) for p, r in meta["failed"]]
        self.fingerprint: str = meta["fingerprint"]
        self.labels: np.ndarray = np.load(root / _LABELS).astype(np.int64, copy=False)
        if self.labels.shape != (len(self.paths),):
            raise ValueError(f"cache {root} is inconsistent: labels {self.labels.shape} "
                             f"for {len(self.paths)} paths")
        self._images: np.memmap | None = None

    @property
    def images(self) -> np.memmap:
        if self._images is None:
            self._images = np.memmap(self.root / _IMAGES, dtype=np.uint8, mode="r",
                                     shape=(len(self.paths), self.size, self.size, 3))
        return self._images

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def targets(self) -> list[int]:
        """Labels as a list (the ``FaceFolder``/ImageFolder attribute name)."""
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None  # reopen the memmap in the worker instead of copying it
        return state

    def __repr__(self) -> str:
        return (f"DecodedCache({str(self.split_dir)!r}, size={self.size}, n={len(self)}, "
                f"classes={len(self.classes)}, root={str(self.root)!r})")

    def summary(self) -> str:
        """One line for people: where the cache is, what it holds, what it left out."""
        return (f"cache {self.root}: {len(self)} images of {len(self.classes)} identities at "
                f"{self.size}x{self.size} from {self.split_dir}, {len(self.failed)} "
                f"unreadable file(s) left out")


def _read_meta(root: Path) -> dict[str, Any] | None:
    try:
        with open(root / _META, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _is_valid(root: Path, fingerprint: str, size: int) -> dict[str, Any] | None:
    """The meta of a complete cache matching ``fingerprint``, else None."""
    meta = _read_meta(root)
    if not meta or meta.get("version") != CACHE_VERSION or meta.get("size") != size \
            or meta.get("fingerprint") != fingerprint:
        return None
    try:
        nbytes = (root / _IMAGES).stat().st_size
    except OSError:
        return None
    if nbytes != len(meta["paths"]) * size * size * 3 or not (root / _LABELS).is_file():
        return None
    return meta


def _build(split: Path, root: Path, size: int, classes: list[str],
           files: list[FileRecord], fingerprint: str,
           workers: int, progress: bool) -> None:
    n = len(files)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the cache private
        row_bytes = size * size * 3
        images = np.memmap(tmp / _IMAGES, dtype=np.uint8, mode="w+", shape=(n, size, size, 3))
        ok = np.zeros(n, dtype=bool)
        failed: list[tuple[str, str]] = []

        def work(i: int) -> str | None:
            # PIL decoding and resizing release the GIL, so threads scale across cores.
            try:
                images[i] = decode_resized(split / files[i][0], size)
            except Exception as exc:  # corrupt or unreadable: leave it out, keep going
                return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            return None

        chunk = 4096
        with tqdm(total=n, desc=f"caching {split} at {size}px", unit="img",
                  disable=None if progress else True) as bar, \
                ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, n, chunk):
                for i, err in zip(range(start, min(n, start + chunk)),
                                  pool.map(work, range(start, min(n, start + chunk)))):
                    if err is None:
                        ok[i] = True
                    else:
                        failed.append((files[i][0], err))
                        log.warning("cache: skipping unreadable image %s (%s)",
                                    split / files[i][0], err)
                    bar.update(1)

        kept = np.flatnonzero(ok)
        if len(kept) < n:
            # Close the gaps left by failed files: rows only move down, and each chunk is
            # read (fancy indexing copies) before it is written.
            dst = 0
            for start in range(0, len(kept), chunk):
                src = kept[start:start + chunk]
                images[dst:dst + len(src)] = images[src]
                dst += len(src)
        images.flush()
        del images
        os.truncate(tmp / _IMAGES, len(kept) * row_bytes)
        np.save(tmp / _LABELS, np.asarray([files[i][1] for i in kept], dtype=np.int64))
        meta = {
            "version": CACHE_VERSION, "size": size, "fingerprint": fingerprint,
            "resize": _RESIZE_METHOD, "split_dir": str(split.resolve()),
            "shape": [int(len(kept)), size, size, 3], "dtype": "uint8",
            "classes": classes, "paths": [files[i][0] for i in kept], "failed": failed,
        }
        with open(tmp / _META, "w", encoding="utf-8") as fh:
            json.dump(meta, fh)

        _install(tmp, root, fingerprint, size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, root: Path, fingerprint: str, size: int, attempts: int = 5) -> None:
    """Rename the finished build ``tmp`` to ``root``, moving an older cache aside first.

    Several processes may build the same split at once (jobs started together on one
    dataset): when another one installs its cache between our move and our rename, a cache
    of the same fingerprint is kept and ours dropped; anything else is moved aside again.
    """
    for _ in range(attempts):
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            try:
                os.rename(root, old / "cache")
            except FileNotFoundError:  # another process moved it first
                pass
        try:
            os.rename(tmp, root)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if _is_valid(root, fingerprint, size) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)  # open memmaps of readers stay valid
    raise RuntimeError(f"cache {root}: other processes kept replacing it; build it once "
                       f"alone (python -m data.cache) and start the jobs again")


def open_cache(
    split_dir: str | os.PathLike[str],
    size: int,
    rebuild: bool = False,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> DecodedCache:
    """Open the decoded cache of ``split_dir`` at stored size ``size``, building it first
    when it is missing, stale (the split changed) or ``rebuild`` is True.

    Args:
        split_dir: a split folder with one sub-folder per identity.
        size: stored side ``S`` (35 for the 32x32 datasets, 120 for 112x112).
        rebuild: rebuild even if the cache looks current.
        cache_dir: where to keep it; default :func:`cache_dir_for`.
        workers: decoding threads (default: the CPU count, at most 16).
        progress: show a tqdm bar while building (only on a terminal).

    Raises ``FileNotFoundError`` if ``split_dir`` is missing and ``ValueError`` if it has no
    images or none decodes.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    split = Path(split_dir)
    if not split.is_dir():
        raise FileNotFoundError(f"split folder not found: {split}")
    root = Path(cache_dir) if cache_dir is not None else cache_dir_for(split, size)
    classes, files = scan_split(split)
    if not files:
        raise ValueError(f"no image files under {split}")
    fingerprint = split_fingerprint(classes, files, size)
    meta = None if rebuild else _is_valid(root, fingerprint, size)
    if meta is None:
        n_workers = workers or max(1, min(16, os.cpu_count() or 1))
        _build(split, root, size, classes, files, fingerprint, n_workers, progress)
        meta = _read_meta(root)
        if meta is None:
            raise RuntimeError(f"cache {root} was built but cannot be read back")
    if not meta["paths"]:
        raise ValueError(f"no image under {split} could be decoded")
    return DecodedCache(root, split, meta)


class CachedImageDataset(Dataset):
    """``(image, label)`` samples from a :class:`DecodedCache`.

    Without ``transform`` the image is a contiguous ``torch.uint8`` tensor ``(3, S, S)``;
    otherwise it is ``transform(that tensor)`` (e.g. ``data.transforms.build_transform(32,
    train=True, resized=True)``). Labels are Python ints, as in ``FaceFolder``.

    ``__getitems__`` serves a whole DataLoader batch with one gather from the memory map
    (the DataLoader calls it automatically when batching) and still returns a list of
    samples, so the default collate function applies. :meth:`get_batch` returns stacked
    uint8 images for fully batched pipelines.
    """

    def __init__(self, cache: DecodedCache, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None) -> None:
        self.cache = cache
        self.transform = transform
        self.classes = cache.classes
        if class_to_idx is None:
            self.class_to_idx = cache.class_to_idx
            self._labels = cache.labels
        else:
            # Queries reuse the gallery's labels; identities it lacks get new ones.
            mapping = dict(class_to_idx)
            for name in cache.classes:
                mapping.setdefault(name, len(mapping))
            self.class_to_idx = mapping
            remap = np.array([mapping[name] for name in cache.classes], dtype=np.int64)
            self._labels = remap[cache.labels] if len(cache.labels) else cache.labels
        self.targets = self._labels.tolist()

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        arr = np.array(self.cache.images[index])  # copy: the memmap is read-only
        image = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self._labels[index])

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Untransformed batch: uint8 ``(B, 3, S, S)`` images and int64 ``(B,)`` labels."""
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # read the file front to back
        batch = np.empty((len(idx), self.cache.size, self.cache.size, 3), dtype=np.uint8)
        batch[order] = self.cache.images[idx[order]]
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        return images, torch.from_numpy(self._labels[idx])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, int]]:
        images, labels = self.get_batch(indices)
        tf = self.transform
        return [(tf(img) if tf is not None else img, int(lab))
                for img, lab in zip(images, labels.tolist())]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data.cache SPLIT_DIR --size S [--rebuild]``: build or check a cache."""
    p = argparse.ArgumentParser(prog="python -m data.cache", description=main.__doc__)
    p.add_argument("split_dir")
    p.add_argument("--size", type=int, required=True, help="stored size: 35 or 120")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    # The sizes the loaders read (data.transforms.STORED_SIZE): any other would never be used.
    sizes = sorted(STORED_SIZE.values())
    if args.size not in sizes:
        p.exit(2, f"{p.prog}: error: --size {args.size}: the training pipeline reads "
                  f"caches of size {' or '.join(map(str, sizes))} (35 for 32x32 models, 120 "
                  f"for 112x112)\n")
    if args.workers is not None and args.workers < 1:
        p.exit(2, f"{p.prog}: error: --workers must be positive, got {args.workers}\n")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        cache = open_cache(args.split_dir, args.size, args.rebuild, workers=args.workers)
    except (FileNotFoundError, ValueError) as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    print(cache.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
