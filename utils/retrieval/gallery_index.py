"""A saved gallery index for search: the gallery's codes, built once and reused.

The index file (written atomically with :func:`utils.checkpoints.store.save_checkpoint`, read with
``weights_only=True``) holds

* ``codes``: the hard codes ``(N, M)``, uint8 when K <= 256, so 1,000,000 items at 64 bits
  (8x256) take 8 MB, plus
* ``paths``: the N readable gallery files, relative to ``root``, and ``skipped``: the files
  that could not be decoded;
* ``model_fingerprint``: SHA-256 of the model's configuration and weights, and
  ``gallery_fingerprint``: SHA-256 of the gallery folder's absolute path and every image's
  (relative path, size, mtime).

An index is reused only when both fingerprints equal the current ones; otherwise it is
rebuilt, and the caller says which happened. An explicitly named index built by another
model is an error rather than silently overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from data.datasets import list_images
from models import RetrievalNet
from utils.checkpoints.store import CheckpointError, load_checkpoint, save_checkpoint
from utils.errors import UsageError

INDEX_KIND = "opqn-gallery-index"
INDEX_VERSION = 1


@dataclass
class GalleryFiles:
    """The image files of a gallery folder and their fingerprint."""

    root: Path
    paths: list[str]  # relative posix paths, sorted
    fingerprint: str

    def absolute(self, rel: str) -> str:
        return str(self.root / rel)


@dataclass
class GalleryIndex:
    """Codes ``(N, M)`` of the readable gallery files ``paths`` (relative to ``root``)."""

    root: Path
    paths: list[str]
    codes: Tensor
    model_fingerprint: str
    gallery_fingerprint: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def identity(self, position: int) -> str | None:
        """The identity folder of item ``position``, or None for files directly in root."""
        parts = self.paths[position].split("/")
        return parts[0] if len(parts) > 1 else None

    def identities(self) -> set[str]:
        return {p.split("/")[0] for p in self.paths if "/" in p}


def scan_gallery(root: str | Path) -> GalleryFiles:
    """List a gallery folder's images (an ``<identity>/`` layout is optional).

    Raises ``UsageError`` for a missing folder or one without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"gallery folder not found: {root}")
    files = list_images(root)
    if not files:
        raise UsageError(f"gallery folder has no images: {root}")
    digest = hashlib.sha256(json.dumps([INDEX_VERSION, str(root.resolve())]).encode())
    rels = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        st = path.stat()
        digest.update(f"\n{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
        rels.append(rel)
    return GalleryFiles(root, rels, digest.hexdigest())


def model_fingerprint(model: RetrievalNet) -> str:
    """SHA-256 of the model's configuration and every weight and buffer."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().reshape(-1).contiguous()
        digest.update(f"\n{name}:{data.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def save_index(index: GalleryIndex, path: str | Path) -> Path:
    """Write the index atomically."""
    return save_checkpoint({
        "kind": INDEX_KIND, "version": INDEX_VERSION, "root": str(index.root),
        "paths": list(index.paths), "skipped": list(index.skipped),
        "codes": index.codes.cpu().contiguous(),
        "model_fingerprint": index.model_fingerprint,
        "gallery_fingerprint": index.gallery_fingerprint,
    }, path)


def load_index(path: str | Path) -> GalleryIndex:
    """Read an index file; ``CheckpointError`` (one line) for anything else."""
    obj = load_checkpoint(path, required_keys=("kind",))
    if obj.get("kind") != INDEX_KIND or obj.get("version") != INDEX_VERSION:
        raise CheckpointError(f"{path} is not a gallery index of this version "
                              f"(kind {obj.get('kind')!r}, version {obj.get('version')!r})", path)
    codes, paths = obj["codes"], obj["paths"]
    if not isinstance(codes, Tensor) or codes.dim() != 2 or codes.shape[0] != len(paths):
        raise CheckpointError(f"gallery index {path} is inconsistent: codes "
                              f"{getattr(codes, 'shape', None)} for {len(paths)} paths", path)
    return GalleryIndex(Path(obj["root"]), list(paths), codes, obj["model_fingerprint"],
                        obj["gallery_fingerprint"], list(obj.get("skipped", [])))


def open_or_build(model: RetrievalNet, gallery: GalleryFiles, index_path: Path, explicit: bool,
                  encode: Callable[[list[str]], tuple[Tensor, Tensor]],
                  rebuild: bool = False, is_main: bool = True) -> tuple[GalleryIndex, str]:
    """The gallery's index: reused from ``index_path`` when the model and the gallery files
    are unchanged, else built with ``encode`` and saved there.

    Args:
        encode: absolute file paths -> ``(codes (n, M), positions (n,))`` of the readable
            ones (positions index into the given list).
        explicit: ``index_path`` was named by the user: an index there that another model
            built is a ``UsageError`` unless ``rebuild``.
        is_main: only the main process of a torchrun job saves the index (the others get
            what ``encode`` returned to them, see :class:`utils.retrieval.shards.ShardedEncoder`).
    Returns:
        ``(index, status)``, ``status`` saying whether it was reused, built or rebuilt and why.
    """
    fingerprint = model_fingerprint(model)
    status = "built"
    if index_path.exists() and not rebuild:
        stored = load_index(index_path)
        m, k = model.config.num_books, model.config.num_words
        if stored.model_fingerprint != fingerprint:
            if explicit:
                raise UsageError(f"--index {index_path} was built by another model (its codes "
                                 f"are {stored.codes.shape[1]} books wide, this model has {m}x"
                                 f"{k}); use a new --index path or add --rebuild-index")
            status = "rebuilt (the model changed)"
        elif stored.gallery_fingerprint != gallery.fingerprint:
            status = (f"rebuilt (the gallery changed: {len(gallery.paths)} files now, "
                      f"{len(stored) + len(stored.skipped)} when it was built)")
        elif stored.codes.shape[1] != m or (len(stored) and int(stored.codes.max()) >= k):
            raise CheckpointError(f"gallery index {index_path} does not match the model "
                                  f"({tuple(stored.codes.shape)} codes for {m}x{k})", index_path)
        else:
            return stored, "reused"
    elif rebuild and index_path.exists():
        status = "rebuilt (--rebuild-index)"
    absolute = [gallery.absolute(rel) for rel in gallery.paths]
    codes, positions = encode(absolute)
    kept = positions.cpu().tolist()
    readable = set(kept)
    index = GalleryIndex(gallery.root, [gallery.paths[i] for i in kept], codes.cpu(),
                         fingerprint, gallery.fingerprint,
                         [rel for i, rel in enumerate(gallery.paths) if i not in readable])
    if is_main:
        os.makedirs(index_path.parent, exist_ok=True)
        save_index(index, index_path)
    return index, status
