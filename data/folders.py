"""Identity-folder scanning shared by the loaders, the cache and the split tool.

A split folder holds one sub-folder per identity; every image file below an identity folder
(nested folders included, like torchvision's ImageFolder) belongs to that identity. The
order is sorted and deterministic everywhere: identities by name, then files by their
relative path, so that labels and sample order agree from machine to machine and between
reading files and reading the cache.
"""
from __future__ import annotations

import os
from pathlib import Path

# The extensions torchvision's ImageFolder accepts, matched case-insensitively.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp",
)


def is_image_name(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS`."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def identity_folders(root: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the (non-hidden) identity sub-folders of a split folder."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def identity_images(root: str | os.PathLike[str], identity: str) -> list[str]:
    """Relative posix paths (``identity/...``) of the image files of one identity, searched
    recursively and sorted; hidden files and folders are left out."""
    found: list[str] = []
    stack = [(Path(root) / identity, identity)]
    while stack:
        folder, rel = stack.pop()
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    stack.append((Path(e.path), f"{rel}/{e.name}"))
                elif is_image_name(e.name) and e.is_file():
                    found.append(f"{rel}/{e.name}")
    return sorted(found)


def scan_identity_folders(root: str | os.PathLike[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, files)`` of a split folder: sorted identity names (index = label) and
    ``(relative posix path, label)`` of every image, sorted by label then path."""
    classes = identity_folders(root)
    files = [(rel, label) for label, name in enumerate(classes)
             for rel in identity_images(root, name)]
    return classes, files
