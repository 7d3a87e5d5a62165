"""Build the train/test (or cross_train/cross_test) split of a face dataset from raw folders.

Usage::

    python -m data.prepare RAW_DIR --name NAME [--data-dir DIR] [--protocol P]
        [--test-per-identity N] [--train-per-identity N] [--exclude-identities FILE|DIR]
        [--seed S] [--recursive] [--from-manifest CSV] [--copy] [--force] [--workers W]
        [--dry-run]

``RAW_DIR`` holds one folder per identity with the images directly inside it (with
``--recursive`` also in sub-folders, e.g. YouTube Faces' per-video folders; the output file
name then joins the sub-path with ``__``). The tool writes
``DIR/NAME/train/<identity>/<file>`` and ``DIR/NAME/test/<identity>/<file>`` (for
``--protocol cross``: ``cross_train`` and ``cross_test``), hard-linking the raw files where the
filesystem allows (else symlinking, else copying; ``--copy`` forces copies), plus a manifest
(``manifest.csv``, or ``cross_manifest.csv`` for the cross split) and a full report
(``prepare_report.txt`` / ``cross_prepare_report.txt``) in ``DIR/NAME``.

Protocol presets (docs/paper.md, "Evaluation protocol"); ``--test-per-identity``/``--train-per-identity`` override them:

========== ============================ ============================================
protocol   per identity                 note
========== ============================ ============================================
facescrub  5 test, the rest train
youtube    40 train + 5 test            extra images of a person are left unused
cfw        10 test, the rest train      paper: ~500 ids, ~55,000/5,000 -> 10 per id
vggface2   50 test, the rest train
cross      50 test, the rest train      needs --exclude-identities; cross_* folders
========== ============================ ============================================

An identity needs ``test + train`` usable images (``test + 1`` when train is "the rest"),
otherwise it is skipped and reported.

Checks, all done before anything is written:

* every file is hashed (SHA-256 of its bytes) and fully decoded with PIL; files that fail
  are reported as corrupt and left out, files without an image extension (the extensions
  torchvision's ImageFolder reads) are reported as non-images and left out;
* leak check by content, not name: duplicate images inside one identity are reduced to one
  copy (the first by path; the others are reported), and an image whose content appears in
  several identities is reported and dropped from all of them (its label is ambiguous and
  keeping it could put the same picture in both splits). The final plan is asserted to
  have no content hash in both splits.

The selection is deterministic: identity ``I`` is shuffled with ``random.Random(f"{seed}:{I}")``
after sorting its files by name, so adding or removing one identity does not change the
split of the others. The manifest (columns ``path,identity,split,sha256,source``; ``path``
relative to ``DIR/NAME``, ``source`` relative to ``RAW_DIR``) reproduces a split exactly
with ``--from-manifest``, which looks the files up in ``RAW_DIR`` and verifies the hashes.

Bad input prints one line ``error: ...`` on stderr and exits with status 2, with nothing
written. The output is staged in a hidden sibling folder and renamed into place at the end,
so a crash leaves no half-written split.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import random
import shutil
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Sequence

from PIL import Image
from tqdm import tqdm

from .folders import IMAGE_EXTENSIONS, identity_folders, is_image_name  # noqa: F401

MANIFEST_COLUMNS: tuple[str, ...] = ("path", "identity", "split", "sha256", "source")
KNOWN_SPLIT_PAIRS: tuple[tuple[str, str], ...] = (("train", "test"), ("cross_train", "cross_test"))

# How many entries per category are echoed on the terminal; the report file has them all.
_MAX_ECHO = 20


class PrepareError(Exception):
    """Bad input: the CLI prints ``error: <message>`` and exits with status 2."""


@dataclass(frozen=True)
class Protocol:
    """A split preset. ``train_per_identity=None`` means "all the remaining images"."""

    name: str
    test_per_identity: int
    train_per_identity: int | None
    split_names: tuple[str, str] = ("train", "test")
    needs_exclusions: bool = False

    def min_images(self) -> int:
        """Usable images an identity needs to take part."""
        return self.test_per_identity + (self.train_per_identity or 1)


PROTOCOLS: dict[str, Protocol] = {
    "facescrub": Protocol("facescrub", 5, None),
    "youtube": Protocol("youtube", 5, 40),
    # The paper gives ~500 identities with ~55,000 train / ~5,000 test images, i.e. 10 test
    # images per identity; override with --test-per-identity if your copy differs.
    "cfw": Protocol("cfw", 10, None),
    "vggface2": Protocol("vggface2", 50, None),
    "cross": Protocol("cross", 50, None, ("cross_train", "cross_test"), needs_exclusions=True),
}


@dataclass(frozen=True)
class PlanEntry:
    """One image of a split; also one manifest row.

    ``path`` is relative to the dataset folder (``<split>/<identity>/<file>``), ``source`` is
    relative to ``RAW_DIR``; both use ``/`` separators.
    """

    path: str
    identity: str
    split: str
    sha256: str
    source: str


@dataclass
class SplitReport:
    """Everything left out of a split, and why. Paths are relative to ``RAW_DIR``."""

    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    non_image: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped, kept)
    cross_identity_duplicates: list[tuple[str, ...]] = field(default_factory=list)
    skipped_identities: list[tuple[str, int, int]] = field(default_factory=list)  # (id, have, need)
    excluded_identities: list[str] = field(default_factory=list)
    unmatched_exclusions: list[str] = field(default_factory=list)
    unused_images: int = 0

    def sections(self) -> Iterator[tuple[str, list[str]]]:
        """(title, lines) per non-empty category, for printing."""
        yield "corrupt or unreadable image (left out)", [f"{p} ({r})" for p, r in self.corrupt]
        yield "not an image file (left out)", list(self.non_image)
        yield "ignored", [f"{p} ({r})" for p, r in self.ignored]
        yield "duplicate within an identity (dropped, kept)", [
            f"{d} (same content as {k})" for d, k in self.duplicates
        ]
        yield "same image in several identities (all copies dropped)", [
            " = ".join(group) for group in self.cross_identity_duplicates
        ]
        yield "identity skipped, too few usable images", [
            f"{i} ({have} usable, needs {need})" for i, have, need in self.skipped_identities
        ]
        yield "identity excluded (listed in --exclude-identities)", list(self.excluded_identities)
        yield "excluded name with no identity folder in RAW_DIR", list(self.unmatched_exclusions)


@dataclass
class SplitPlan:
    """A fully validated split, ready for :func:`write_split`.

    ``entries`` is sorted by (split order, identity, path); ``settings`` records how the plan
    was made (protocol, counts, seed or manifest).
    """

    raw_dir: Path
    split_names: tuple[str, str]
    entries: list[PlanEntry]
    report: SplitReport
    settings: dict[str, object]

    def identities(self) -> list[str]:
        """Sorted identity names that appear in the plan."""
        return sorted({e.identity for e in self.entries})

    def count(self, split: str) -> int:
        """Number of images in ``split``."""
        return sum(1 for e in self.entries if e.split == split)

    def summary(self) -> str:
        """The one-line summary printed at the end of the CLI."""
        r = self.report
        train, test = self.split_names
        return (
            f"summary: identities={len(self.identities())} train_images={self.count(train)} "
            f"test_images={self.count(test)} skipped_identities={len(r.skipped_identities)} "
            f"corrupt_files={len(r.corrupt)} non_image_files={len(r.non_image)} "
            f"duplicates={len(r.duplicates)} "
            f"cross_identity_duplicates={len(r.cross_identity_duplicates)} "
            f"excluded_identities={len(r.excluded_identities)}"
        )


# ----------------------------------------------------------------------------- scanning


_NESTED = "nested folder; only direct files are read (see --recursive)"


def _scan_raw(raw_dir: Path, report: SplitReport, recursive: bool = False) -> dict[str, list[str]]:
    """Identity -> image paths (relative to ``raw_dir``, posix, sorted) of its image files:
    the direct files, or with ``recursive`` also those in sub-folders (e.g. the per-video
    folders of YouTube Faces)."""
    identities: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(raw_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            report.ignored.append((entry.name, "hidden"))
        elif entry.is_dir():
            files: list[str] = []
            stack = [(entry.path, entry.name)]
            while stack:
                folder, prefix = stack.pop()
                for sub in sorted(os.scandir(folder), key=lambda e: e.name):
                    rel = f"{prefix}/{sub.name}"
                    if sub.name.startswith("."):
                        report.ignored.append((rel, "hidden"))
                    elif sub.is_dir():
                        if recursive:
                            stack.append((sub.path, rel))
                        else:
                            report.ignored.append((rel, _NESTED))
                    elif not sub.is_file():
                        report.ignored.append((rel, "not a regular file"))
                    elif is_image_name(sub.name):
                        files.append(rel)
                    else:
                        report.non_image.append(rel)
            identities[entry.name] = sorted(files)
        else:
            report.ignored.append((entry.name, "file outside any identity folder"))
    return identities


def _dest_name(rel: str) -> str:
    """File name inside the output identity folder: nested sources are flattened with
    ``__`` (``id/video1/f.jpg`` -> ``video1__f.jpg``)."""
    return "__".join(PurePosixPath(rel).parts[1:])


def _inspect_file(path: Path, decode: bool = True) -> tuple[str | None, str | None]:
    """(sha256 hex, None) for a good image, (sha256 or None, reason) for a bad one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    digest = hashlib.sha256(data).hexdigest()
    if not decode:
        return digest, None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: verify() alone misses truncated pixel data
            if img.width < 1 or img.height < 1:
                return digest, "empty image"
            if img.mode != "RGB":
                img.convert("RGB")  # what the ImageFolder loader will do
    except Image.UnidentifiedImageError:
        return digest, "not a recognised image format"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return digest, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return digest, None


def _parallel_map(
    fn: Callable[[Path], tuple[str | None, str | None]],
    paths: Sequence[Path],
    workers: int,
    desc: str,
) -> list[tuple[str | None, str | None]]:
    """``fn`` over ``paths`` on a thread pool (hashlib and PIL decoding release the GIL)."""
    results: list[tuple[str | None, str | None]] = []
    chunk = 4096  # bounded number of pending futures on huge folders
    # disable=None: no bar when stderr is not a terminal (tests, logs).
    with tqdm(total=len(paths), desc=desc, unit="file", disable=None) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), chunk):
            for res in pool.map(fn, paths[start:start + chunk]):
                results.append(res)
                bar.update(1)
    return results


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- exclusions


def normalize_identity(name: str) -> str:
    """Key used to match identity names across datasets: case-folded, with runs of spaces,
    underscores, hyphens and dots treated as one separator (``Aaron_Eckhart`` ==
    ``aaron eckhart``)."""
    out: list[str] = []
    for ch in name.strip().casefold():
        if ch in " _-.\t":
            if out and out[-1] != "_":
                out.append("_")
        else:
            out.append(ch)
    return "".join(out).strip("_")


def read_identity_list(source: str | os.PathLike[str]) -> list[str]:
    """Identity names from a text file (one per line; blank lines and ``#`` comments skipped)
    or from a folder (its sub-folder names, e.g. a prepared dataset's ``train/``)."""
    path = Path(source)
    if path.is_dir():
        return identity_folders(path)
    if not path.is_file():
        raise PrepareError(f"--exclude-identities: no such file or folder: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PrepareError(f"--exclude-identities: cannot read {path}: {exc}") from exc
    names = [ln.strip() for ln in text.splitlines()]
    return [n for n in names if n and not n.startswith("#")]


# ----------------------------------------------------------------------------- planning


def _check_raw_dir(raw_dir: str | os.PathLike[str]) -> Path:
    raw = Path(raw_dir)
    if not raw.exists():
        raise PrepareError(f"RAW_DIR does not exist: {raw}")
    if not raw.is_dir():
        raise PrepareError(f"RAW_DIR is not a folder: {raw}")
    return raw.resolve()


def resolve_protocol(
    protocol: str = "facescrub",
    test_per_identity: int | None = None,
    train_per_identity: int | None = None,
) -> Protocol:
    """The preset ``protocol`` with explicit per-identity counts overriding its own."""
    if protocol not in PROTOCOLS:
        raise PrepareError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
    base = PROTOCOLS[protocol]
    test = base.test_per_identity if test_per_identity is None else test_per_identity
    train = base.train_per_identity if train_per_identity is None else train_per_identity
    if test < 1:
        raise PrepareError(f"--test-per-identity must be at least 1, got {test}")
    if train is not None and train < 1:
        raise PrepareError(f"--train-per-identity must be at least 1, got {train}")
    return Protocol(base.name, test, train, base.split_names, base.needs_exclusions)


def plan_split(
    raw_dir: str | os.PathLike[str],
    protocol: str = "facescrub",
    *,
    test_per_identity: int | None = None,
    train_per_identity: int | None = None,
    exclude_identities: Iterable[str] | str | os.PathLike[str] | None = None,
    seed: int = 0,
    recursive: bool = False,
    workers: int | None = None,
) -> SplitPlan:
    """Scan, hash, verify and split ``raw_dir`` (one folder per identity).

    ``exclude_identities`` is a list of names, or a path accepted by
    :func:`read_identity_list`; it is required by the ``cross`` protocol. ``recursive``
    also reads images in sub-folders of an identity folder (flattened in the output). Raises
    :class:`PrepareError` on bad input, including a plan that would hold no identity.
    Reads files, writes nothing.
    """
    raw = _check_raw_dir(raw_dir)
    proto = resolve_protocol(protocol, test_per_identity, train_per_identity)
    if isinstance(exclude_identities, (str, os.PathLike)):
        excluded_names = read_identity_list(exclude_identities)
    else:
        excluded_names = list(exclude_identities or [])
    if proto.needs_exclusions and exclude_identities is None:
        raise PrepareError(
            "--protocol cross needs --exclude-identities (the target datasets' identities)"
        )

    report = SplitReport()
    identities = _scan_raw(raw, report, recursive)
    if not any(identities.values()):
        raise PrepareError(f"RAW_DIR has no identity folders with image files: {raw}")

    # Exclusions first, so that excluded identities are not even hashed.
    if excluded_names:
        keys = {normalize_identity(n): n for n in excluded_names}
        present = {normalize_identity(i) for i in identities}
        for ident in list(identities):
            if normalize_identity(ident) in keys:
                report.excluded_identities.append(ident)
                del identities[ident]
        report.unmatched_exclusions = sorted(n for k, n in keys.items() if k not in present)
        if not any(identities.values()):
            raise PrepareError("every identity with images is listed in --exclude-identities")

    rels = [rel for files in identities.values() for rel in files]
    results = _parallel_map(
        lambda rel: _inspect_file(raw / rel), [Path(r) for r in rels],
        workers or _default_workers(), "hash+verify",
    )
    digest_of: dict[str, str] = {}
    for rel, (digest, problem) in zip(rels, results):
        if problem is not None or digest is None:
            report.corrupt.append((rel, problem or "unreadable"))
        else:
            digest_of[rel] = digest

    # Within an identity: keep the first file (by name) of each content.
    unique: dict[str, list[str]] = {}
    for ident, files in identities.items():
        first_with: dict[str, str] = {}
        keep: list[str] = []
        for rel in files:
            d = digest_of.get(rel)
            if d is None:
                continue
            if d in first_with:
                report.duplicates.append((rel, first_with[d]))
            else:
                first_with[d] = rel
                keep.append(rel)
        unique[ident] = keep

    # Across identities: the same picture under two names is dropped everywhere.
    owners: dict[str, list[str]] = defaultdict(list)
    for ident, files in unique.items():
        for rel in files:
            owners[digest_of[rel]].append(rel)
    shared = {d for d, paths in owners.items() if len({p.split("/", 1)[0] for p in paths}) > 1}
    report.cross_identity_duplicates = sorted(tuple(owners[d]) for d in shared)

    train_name, test_name = proto.split_names
    need = proto.min_images()
    entries: list[PlanEntry] = []
    largest = 0
    for ident in sorted(unique):
        usable = [rel for rel in unique[ident] if digest_of[rel] not in shared]
        largest = max(largest, len(usable))
        if len(usable) < need:
            report.skipped_identities.append((ident, len(usable), need))
            continue
        order = list(usable)  # already sorted by name
        random.Random(f"{seed}:{ident}").shuffle(order)
        test = order[:proto.test_per_identity]
        rest = order[proto.test_per_identity:]
        train = rest if proto.train_per_identity is None else rest[:proto.train_per_identity]
        report.unused_images += len(rest) - len(train)
        for split, chosen in ((train_name, train), (test_name, test)):
            for rel in chosen:
                entries.append(PlanEntry(
                    path=f"{split}/{ident}/{_dest_name(rel)}", identity=ident,
                    split=split, sha256=digest_of[rel], source=rel,
                ))

    if not entries:
        counts = f"{proto.test_per_identity} test + " + (
            f"{proto.train_per_identity} train" if proto.train_per_identity else "at least 1 train"
        )
        raise PrepareError(
            f"no identity has enough usable images for {counts} per identity "
            f"(the largest has {largest}); nothing would be produced"
        )

    settings: dict[str, object] = {
        "protocol": proto.name,
        "test_per_identity": proto.test_per_identity,
        "train_per_identity": proto.train_per_identity if proto.train_per_identity else "rest",
        "seed": seed,
        "recursive": recursive,
        "raw_dir": str(raw),
    }
    plan = SplitPlan(raw, proto.split_names, _sorted_entries(entries, proto.split_names),
                     report, settings)
    _assert_no_leak(plan)
    return plan


def _sorted_entries(entries: list[PlanEntry], split_names: tuple[str, str]) -> list[PlanEntry]:
    order = {s: i for i, s in enumerate(split_names)}
    return sorted(entries, key=lambda e: (order[e.split], e.identity, e.path))


def _assert_no_leak(plan: SplitPlan) -> None:
    """Raise if a content hash is in both splits or a destination path repeats."""
    train_name, test_name = plan.split_names
    train = {e.sha256 for e in plan.entries if e.split == train_name}
    leaked = [e.path for e in plan.entries if e.split == test_name and e.sha256 in train]
    if leaked:
        raise PrepareError(
            f"leak: {len(leaked)} test image(s) have the same content as a train image "
            f"(first: {leaked[0]})"
        )
    seen: set[str] = set()
    for e in plan.entries:
        if e.path in seen:
            raise PrepareError(f"two images would be written to the same path: {e.path}")
        seen.add(e.path)


# ----------------------------------------------------------------------------- manifest


def _safe_relative(text: str, what: str) -> PurePosixPath:
    p = PurePosixPath(text)
    unsafe = any(part in ("", ".", "..") for part in p.parts)
    if not text or p.is_absolute() or "\\" in text or unsafe or text != str(p):
        raise PrepareError(f"manifest: bad {what} {text!r} (must be a plain relative path)")
    return p


def read_manifest(path: str | os.PathLike[str]) -> list[PlanEntry]:
    """Read and validate a manifest CSV written by :func:`write_split`.

    Checks the header, that splits form one known pair (train/test or
    cross_train/cross_test), that every ``path`` is ``<split>/<identity>/<file>`` and that
    ``source`` is a relative path without ``..``. Raises :class:`PrepareError`.
    """
    mpath = Path(path)
    try:
        with open(mpath, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
                raise PrepareError(
                    f"manifest {mpath}: expected columns {','.join(MANIFEST_COLUMNS)}, "
                    f"got {','.join(reader.fieldnames or [])}"
                )
            rows = [PlanEntry(**{k: r[k] for k in MANIFEST_COLUMNS}) for r in reader]
    except FileNotFoundError as exc:
        raise PrepareError(f"manifest not found: {mpath}") from exc
    except (OSError, UnicodeDecodeError, csv.Error, TypeError) as exc:
        raise PrepareError(f"cannot read manifest {mpath}: {exc}") from exc
    if not rows:
        raise PrepareError(f"manifest {mpath} has no rows")
    splits = {r.split for r in rows}
    if not any(splits <= set(pair) for pair in KNOWN_SPLIT_PAIRS):
        raise PrepareError(f"manifest {mpath}: unexpected splits {sorted(splits)}")
    for r in rows:
        p = _safe_relative(r.path, "path")
        _safe_relative(r.source, "source")
        if len(p.parts) != 3 or p.parts[0] != r.split or p.parts[1] != r.identity:
            raise PrepareError(f"manifest: path {r.path!r} is not {r.split}/{r.identity}/<file>")
        if len(r.sha256) != 64 or any(c not in "0123456789abcdef" for c in r.sha256):
            raise PrepareError(f"manifest: bad sha256 for {r.path!r}")
    return rows


def _manifest_split_names(rows: Sequence[PlanEntry]) -> tuple[str, str]:
    splits = {r.split for r in rows}
    for pair in KNOWN_SPLIT_PAIRS:
        if splits <= set(pair):
            return pair
    raise PrepareError(f"unexpected splits {sorted(splits)}")


def plan_from_manifest(
    raw_dir: str | os.PathLike[str],
    manifest: str | os.PathLike[str],
    *,
    workers: int | None = None,
) -> SplitPlan:
    """Rebuild a plan from a manifest, finding each ``source`` under ``raw_dir`` and checking
    its SHA-256. Raises :class:`PrepareError` if files are missing or changed."""
    raw = _check_raw_dir(raw_dir)
    rows = read_manifest(manifest)
    split_names = _manifest_split_names(rows)
    results = _parallel_map(
        lambda p: _inspect_file(p, decode=False), [raw / r.source for r in rows],
        workers or _default_workers(), "hash",
    )
    missing = [r.source for r, (d, _) in zip(rows, results) if d is None]
    changed = [r.source for r, (d, _) in zip(rows, results) if d is not None and d != r.sha256]
    if missing or changed:
        first = (missing or changed)[0]
        raise PrepareError(
            f"{len(missing)} manifest file(s) missing from RAW_DIR and {len(changed)} with "
            f"different content (first: {first})"
        )
    settings: dict[str, object] = {"manifest": str(Path(manifest).resolve()), "raw_dir": str(raw)}
    plan = SplitPlan(raw, split_names, _sorted_entries(rows, split_names), SplitReport(), settings)
    _assert_no_leak(plan)
    return plan


# ----------------------------------------------------------------------------- writing


def output_names(split_names: tuple[str, str]) -> tuple[str, str, str, str]:
    """(train dir, test dir, manifest file, report file) names inside the dataset folder."""
    prefix = split_names[0][: -len("train")] if split_names[0].endswith("train") else ""
    return split_names[0], split_names[1], f"{prefix}manifest.csv", f"{prefix}prepare_report.txt"


def check_output(out_dir: str | os.PathLike[str], split_names: tuple[str, str],
                 force: bool = False, raw_dir: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`PrepareError` if writing the split would overwrite something without
    ``force``, or if the output would overlap ``raw_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"output exists and is not a folder: {out}")
    if raw_dir is not None:
        raw = Path(raw_dir).resolve()
        for name in output_names(split_names)[:2]:
            target = (out / name).resolve()
            if raw == target or target in raw.parents or raw in target.parents:
                raise PrepareError(f"RAW_DIR and the output {target} overlap")
    if force:
        return
    for name in output_names(split_names):
        target = out / name
        if target.is_dir() and any(os.scandir(target)):
            raise PrepareError(f"output {target} exists and is not empty (use --force to replace)")
        if target.exists() and not target.is_dir():
            raise PrepareError(f"output {target} exists (use --force to replace)")


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 folders; give the renamed result the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


class _Placer:
    """Puts a file in place by hard link, symlink or copy, remembering what works."""

    def __init__(self, link: str) -> None:
        modes = {"auto": ["hardlink", "symlink", "copy"], "hardlink": ["hardlink"],
                 "symlink": ["symlink"], "copy": ["copy"]}
        if link not in modes:
            raise ValueError(f"link must be one of {sorted(modes)}, got {link!r}")
        self.modes = modes[link]
        self.used: dict[str, int] = defaultdict(int)

    def place(self, src: Path, dst: Path) -> None:
        while True:
            mode = self.modes[0]
            try:
                if mode == "hardlink":
                    os.link(src, dst)
                elif mode == "symlink":
                    os.symlink(src.resolve(), dst)
                else:
                    shutil.copy2(src, dst)
                self.used[mode] += 1
                return
            except OSError:
                if len(self.modes) == 1:
                    raise
                self.modes.pop(0)  # e.g. EXDEV across filesystems: stop trying this mode


def _report_text(plan: SplitPlan) -> str:
    lines = [f"# data.prepare report; {k}={v}" for k, v in plan.settings.items()]
    lines.append(plan.summary())
    if plan.report.unused_images:
        lines.append(f"unused images (beyond the per-identity counts): {plan.report.unused_images}")
    for title, items in plan.report.sections():
        if items:
            lines.append(f"\n## {title}: {len(items)}")
            lines.extend(items)
    return "\n".join(lines) + "\n"


def write_manifest(entries: Iterable[PlanEntry], path: str | os.PathLike[str]) -> None:
    """Write entries as a manifest CSV (columns ``path,identity,split,sha256,source``)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for e in entries:
            writer.writerow([e.path, e.identity, e.split, e.sha256, e.source])


def write_split(
    plan: SplitPlan,
    out_dir: str | os.PathLike[str],
    *,
    link: str = "auto",
    force: bool = False,
) -> dict[str, int]:
    """Materialise ``plan`` under ``out_dir`` (the dataset folder, e.g. ``data/facescrub``).

    Writes the two split folders, the manifest and the report into a hidden staging folder
    next to ``out_dir``, then renames them into place (replacing old ones only with
    ``force``). ``link`` is ``"auto"`` (hard link, else symlink, else copy), ``"hardlink"``,
    ``"symlink"`` or ``"copy"``. Returns how many files each method placed.
    """
    out = Path(out_dir)
    check_output(out, plan.split_names, force, plan.raw_dir)
    train_dir, test_dir, manifest_name, report_name = output_names(plan.split_names)
    placer = _Placer(link)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    try:
        _chmod_like_mkdir(stage)
        made: set[Path] = set()
        for e in tqdm(plan.entries, desc="writing", unit="file", disable=None):
            dst = stage / e.path
            if dst.parent not in made:
                dst.parent.mkdir(parents=True, exist_ok=True)
                made.add(dst.parent)
            placer.place(plan.raw_dir / e.source, dst)
        for name in (train_dir, test_dir):
            (stage / name).mkdir(exist_ok=True)  # an empty split still gets its folder
        write_manifest(plan.entries, stage / manifest_name)
        (stage / report_name).write_text(_report_text(plan), encoding="utf-8")

        if not out.exists():
            os.rename(stage, out)  # one atomic step
        else:
            trash = stage / ".replaced"
            trash.mkdir()
            for name in (train_dir, test_dir, manifest_name, report_name):
                if (out / name).exists() or (out / name).is_symlink():
                    os.rename(out / name, trash / name)
                os.rename(stage / name, out / name)
            shutil.rmtree(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return dict(placer.used)


# ----------------------------------------------------------------------------- CLI


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line on stderr and status 2, like every other bad-input error of the tool.
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m data.prepare``."""
    p = _ArgumentParser(
        prog="python -m data.prepare",
        description="Split a folder of per-identity face images into train/test folders "
                    "with a content-hash leak check and a reproducible manifest.",
    )
    p.add_argument("raw_dir", metavar="RAW_DIR", help="one folder per identity, images inside")
    p.add_argument("--name", required=True, help="dataset name: output goes to DIR/NAME")
    p.add_argument("--data-dir", default="./data", metavar="DIR", help="default: ./data")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                   help="split preset (default facescrub): facescrub 5 test/id + rest train; "
                        "youtube 40 train + 5 test; cfw 10 test + rest; vggface2 50 test + rest; "
                        "cross 50 test + rest into cross_train/cross_test")
    p.add_argument("--test-per-identity", type=int, default=None, metavar="N")
    p.add_argument("--train-per-identity", type=int, default=None, metavar="N",
                   help="default: the preset's (all remaining images for most)")
    p.add_argument("--exclude-identities", default=None, metavar="FILE|DIR",
                   help="identities to leave out (required by --protocol cross): a text file, "
                        "one name per line, or a folder whose sub-folders are identities")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recursive", action="store_true",
                   help="also read images in sub-folders of each identity folder (e.g. YouTube "
                        "Faces' per-video folders); output names join the parts with '__'")
    p.add_argument("--from-manifest", default=None, metavar="CSV",
                   help="rebuild exactly the split in this manifest (hashes are verified)")
    p.add_argument("--copy", action="store_true", help="copy files instead of hard-linking")
    p.add_argument("--force", action="store_true", help="replace an existing split")
    p.add_argument("--workers", type=int, default=None, help="threads for hashing/decoding")
    p.add_argument("--dry-run", action="store_true", help="plan and report, write nothing")
    return p


def _echo_report(plan: SplitPlan, report_path: Path | None) -> None:
    for title, items in plan.report.sections():
        if not items:
            continue
        print(f"warning: {title}: {len(items)}", file=sys.stderr)
        for item in items[:_MAX_ECHO]:
            print(f"  {item}", file=sys.stderr)
        if len(items) > _MAX_ECHO:
            where = f" (all in {report_path})" if report_path else ""
            print(f"  ... and {len(items) - _MAX_ECHO} more{where}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        name = args.name
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise PrepareError(f"--name must be a plain folder name, got {name!r}")
        if args.workers is not None and args.workers < 1:
            raise PrepareError("--workers must be at least 1")
        out = Path(args.data_dir) / name
        if args.from_manifest:
            clash = [flag for flag, v in (
                ("--protocol", args.protocol), ("--test-per-identity", args.test_per_identity),
                ("--train-per-identity", args.train_per_identity),
                ("--exclude-identities", args.exclude_identities)) if v is not None]
            if clash:
                raise PrepareError(f"--from-manifest fixes the split; drop {', '.join(clash)}")
            raw = _check_raw_dir(args.raw_dir)
            split_names = _manifest_split_names(read_manifest(args.from_manifest))
            if not args.dry_run:
                check_output(out, split_names, args.force, raw)
            plan = plan_from_manifest(raw, args.from_manifest, workers=args.workers)
        else:
            protocol = args.protocol or "facescrub"
            proto = resolve_protocol(protocol, args.test_per_identity, args.train_per_identity)
            raw = _check_raw_dir(args.raw_dir)
            if args.exclude_identities is not None:
                # read early so that a bad list fails before the expensive hashing
                read_identity_list(args.exclude_identities)
            if not args.dry_run:
                check_output(out, proto.split_names, args.force, raw)
            plan = plan_split(
                raw, protocol, test_per_identity=args.test_per_identity,
                train_per_identity=args.train_per_identity,
                exclude_identities=args.exclude_identities, seed=args.seed,
                recursive=args.recursive, workers=args.workers,
            )
        report_path = None if args.dry_run else out / output_names(plan.split_names)[3]
        _echo_report(plan, report_path)
        if args.dry_run:
            print("dry run: nothing written")
        else:
            used = write_split(plan, out, link="copy" if args.copy else "auto", force=args.force)
            how = ", ".join(f"{n} by {m}" for m, n in sorted(used.items())) or "no files"
            print(f"wrote {out} ({how}); manifest {out / output_names(plan.split_names)[2]}")
        print(plan.summary())
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
