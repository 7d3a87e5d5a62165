"""A validation split held out from a training split, for every choice a comparison makes.

The test split answers one question per final model; learning rates and other choices are
made on held-out images of the *training* identities instead:

* ``<root>/<dataset>/<train name>/<identity>/...``: the validation gallery, the training
  images that were not held out (the models of the choice train on it);
* ``<root>/<dataset>/<test name>/<identity>/...``: the validation queries, ``per_identity``
  images of each training identity.

No image is copied: every entry is a symbolic link to the training file (the split is
planned and linked by :mod:`data.prepare`, which also checks by content hash that no
picture is on both sides). The folder has the layout ``opqn_main.py`` reads, so a run
only needs ``--data-dir <root>``. :func:`check_validation_split` is the leak check run
before the folder is used: no query in the gallery, every file inside the training split
and none in the test split. ``validation.json`` records how the split was made, so that a
resumed comparison reuses it only when it is the split it would build again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .folders import scan_identity_folders
from .prepare import PrepareError, output_names, plan_split, write_split

MANIFEST_NAME = "validation.json"


class ValidationSplitError(ValueError):
    """The validation split cannot be built, or it fails the leak check."""


@dataclass(frozen=True)
class ValidationSplit:
    """A built (or reused) validation split: ``data_dir`` is what ``--data-dir`` gets."""

    data_dir: Path
    gallery_dir: Path
    query_dir: Path
    info: dict


def split_listing(split_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of a split's identities and files (relative path, size, mtime): changes
    whenever a file is added, removed or rewritten."""
    root = Path(split_dir)
    classes, files = scan_identity_folders(root)
    h = hashlib.sha256(json.dumps(classes).encode())
    for rel, _label in files:
        st = os.stat(root / rel)
        h.update(f"\n{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def queries_per_identity(train_dir: str | os.PathLike[str], wanted: int) -> int:
    """``wanted``, or a third of the smallest identity's images when that is fewer (at
    least 1): a tiny training split keeps two thirds of every identity for the gallery."""
    _classes, files = scan_identity_folders(train_dir)
    smallest = min(Counter(label for _rel, label in files).values(), default=0)
    return max(1, min(wanted, smallest // 3))


def _real_files(split_dir: Path) -> dict[str, str]:
    """Relative path -> real path of every image of a split (links followed)."""
    _classes, files = scan_identity_folders(split_dir)
    return {rel: os.path.realpath(split_dir / rel) for rel, _label in files}


def _inside(path: str, folder: Path) -> bool:
    return os.path.commonpath([path, os.path.realpath(folder)]) == os.path.realpath(folder)


def check_validation_split(gallery_dir: Path, query_dir: Path, train_dir: Path,
                           test_dirs: tuple[Path, ...]) -> dict:
    """The leak check; returns the split's counts or raises :class:`ValidationSplitError`.

    * no validation query is also in the validation gallery (by the file it links to);
    * every file of both sides lies in the training split, none in a test split
      (``test_dirs``: the split's own test folder, and with -c the evaluated dataset's);
    * every query identity has gallery images (so each query has relevant items).
    """
    gallery, queries = _real_files(gallery_dir), _real_files(query_dir)
    if not gallery or not queries:
        raise ValidationSplitError(f"validation split {gallery_dir.parent} has an empty side "
                                   f"({len(gallery)} gallery, {len(queries)} query images)")
    both = set(gallery.values()) & set(queries.values())
    if both:
        raise ValidationSplitError(f"leak: {len(both)} validation queries are also in the "
                                   f"validation gallery (first: {sorted(both)[0]})")
    for real in (*gallery.values(), *queries.values()):
        for test_dir in test_dirs:
            if _inside(real, test_dir):
                raise ValidationSplitError(f"leak: validation file {real} is in the test "
                                           f"split {test_dir}")
        if not _inside(real, train_dir):
            raise ValidationSplitError(f"validation file {real} is not in the training "
                                       f"split {train_dir}")
    gallery_ids = {rel.split("/", 1)[0] for rel in gallery}
    query_ids = {rel.split("/", 1)[0] for rel in queries}
    if not query_ids <= gallery_ids:
        raise ValidationSplitError(f"validation identities without gallery images: "
                                   f"{', '.join(sorted(query_ids - gallery_ids)[:5])}")
    return {"identities": len(gallery_ids), "gallery_images": len(gallery),
            "query_images": len(queries)}


def _existing_split(root: Path, folder: Path, wanted: dict) -> dict:
    """The manifest of the split already in ``root`` if it was made as ``wanted`` says;
    ``ValidationSplitError`` (one line) otherwise."""
    try:
        made = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ValidationSplitError(f"{root} exists but holds no readable "
                                   f"{folder.name}/{MANIFEST_NAME}; move it away") from None
    differs = sorted(k for k in wanted if made.get(k) != wanted[k])
    if differs:
        raise ValidationSplitError(
            f"the validation split in {root} was made differently ({', '.join(differs)} "
            f"differ, e.g. the training split changed); use another --out, or move it "
            f"away to build it again")
    return made


def build_validation_split(train_dir: str | os.PathLike[str], test_dirs: tuple[Path, ...],
                           root: str | os.PathLike[str], dataset: str, cross: bool,
                           per_identity: int, seed: int = 0,
                           extra_files: tuple[Path, ...] = ()) -> ValidationSplit:
    """Hold out ``per_identity`` images of every identity of ``train_dir`` as queries
    (leak-checked against ``test_dirs``, see :func:`check_validation_split`).

    The split goes to ``<root>/<dataset>/{train,test}`` (``cross_train``/``cross_test`` when
    ``cross``). ``extra_files`` are copied beside the split folders (synthface's
    ``synthface.json``, which ``opqn_main.py`` reads before it uses a synthface folder).
    An existing ``root`` is reused when its ``validation.json`` says it was made the same
    way from the same training files, and refused otherwise; a new one is staged and renamed
    into place, so an interruption never leaves half a split. Identities with fewer than
    ``per_identity + 1`` images are left out (data.prepare's rule). Every split is leak-checked
    before it is returned.
    """
    train_dir, root = Path(train_dir).resolve(), Path(root)
    if per_identity < 1:
        raise ValidationSplitError(f"the validation split needs at least 1 query image per "
                                   f"identity, got {per_identity}")
    wanted = {"split_of": str(train_dir), "per_identity": per_identity, "seed": seed,
              "cross": cross, "train_listing": split_listing(train_dir)}
    split_names = ("cross_train", "cross_test") if cross else ("train", "test")
    gallery_name, query_name = output_names(split_names)[:2]
    folder = root / dataset
    if root.exists():
        info = _existing_split(root, folder, wanted)
    else:
        try:
            plan = plan_split(train_dir, "cross" if cross else "facescrub",
                              test_per_identity=per_identity, exclude_identities=[],
                              seed=seed, recursive=True)
        except PrepareError as exc:
            raise ValidationSplitError(f"validation split of {train_dir}: {exc}") from None
        root.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
        try:
            # Symbolic links only: the leak check follows them back to the training files.
            used = write_split(plan, stage / dataset, link="symlink")
            for extra in extra_files:
                shutil.copy2(extra, stage / dataset / extra.name)
            skipped = [name for name, _have, _need in plan.report.skipped_identities]
            info = {**wanted, "link": sorted(used), "skipped_identities": skipped}
            (stage / dataset / MANIFEST_NAME).write_text(json.dumps(info, indent=2) + "\n",
                                                         encoding="utf-8")
            os.rename(stage, root)
        except OSError:
            shutil.rmtree(stage, ignore_errors=True)
            if not root.exists():
                raise
            # Another process (a comparison split over --methods) put its split there
            # first: use it if it was made the same way.
            info = _existing_split(root, folder, wanted)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    gallery_dir, query_dir = folder / gallery_name, folder / query_name
    counts = check_validation_split(gallery_dir, query_dir, train_dir, test_dirs)
    return ValidationSplit(root, gallery_dir, query_dir, {**info, **counts})
