"""Checks of the command line, done before any work so that bad input costs nothing."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from data.folders import identity_folders, identity_images


class UsageError(ValueError):
    """A bad command-line value; the message is one line naming the flag and the value."""


@dataclass
class CodeSpec:
    """One model of a run: its code configuration and checkpoint name."""

    bits: int | None
    num_books: int | None
    num_words: int | None
    name: str | None = None  # --save or --load entry


def is_power_of_two(value: int) -> bool:
    return value >= 2 and value & (value - 1) == 0


def _check_positive(flag: str, value) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if value <= 0:
        raise UsageError(f"{flag} must be positive, got {value}")


def _check_list(flag: str, values: list[int] | None) -> None:
    for value in values or []:
        _check_positive(flag, value)


def _complete_spec(bits: int | None, books: int | None, words: int | None,
                   name: str | None) -> CodeSpec:
    """Fill the one value of (L, M, K) that can be derived, and check L = M * log2 K."""
    if words is not None and not is_power_of_two(words):
        raise UsageError(f"--words must be a power of two (2, 4, 8, ...), got {words}")
    if words is not None and words > 2 ** 16:
        raise UsageError(f"--words {words} is too large: at most 16 bits per codebook "
                         f"(--words {2 ** 16}) are supported")
    if bits is not None and books is not None and words is None:
        if bits % books:
            raise UsageError(f"--len {bits} is not a multiple of --num {books}")
        words = 2 ** (bits // books)
        if bits // books > 16:
            raise UsageError(f"--len {bits} with --num {books} gives {bits // books} bits per "
                             f"codebook (at most 16 are supported)")
    elif bits is not None and words is not None and books is None:
        per_book = int(math.log2(words))
        if bits % per_book:
            raise UsageError(f"--len {bits} is not a multiple of log2(--words {words}) = "
                             f"{per_book}")
        books = bits // per_book
    elif books is not None and words is not None and bits is None:
        bits = books * int(math.log2(words))
    if bits is not None and books is not None and words is not None:
        expected = books * int(math.log2(words))
        if bits != expected:
            raise UsageError(f"--len {bits} does not match --num {books} x log2(--words {words}) "
                             f"= {expected} bits")
    return CodeSpec(bits, books, words, name)


def code_specs(lengths: list[int] | None, books: list[int] | None, words: list[int] | None,
               names: list[str] | None, names_flag: str, require_codes: bool) -> list[CodeSpec]:
    """Pair up the parallel lists ``--len/--num/--words/--save|--load`` into models.

    With ``require_codes`` (training) every model needs a complete code configuration;
    otherwise (evaluation) missing values are later taken from the checkpoint.
    """
    _check_list("--len", lengths)
    _check_list("--num", books)
    _check_list("--words", words)
    given = {flag: vals for flag, vals in
             (("--len", lengths), ("--num", books), ("--words", words), (names_flag, names))
             if vals}
    sizes = {len(v) for v in given.values()}
    if len(sizes) > 1:
        detail = ", ".join(f"{flag} has {len(v)}" for flag, v in given.items())
        raise UsageError(f"--len/--num/--words/{names_flag} need one entry per model: {detail}")
    count = sizes.pop() if sizes else 0
    if count == 0:
        raise UsageError("give the code configuration: --len and --num (and --words), "
                         "e.g. --len 36 --num 6 --words 64")
    specs = []
    for i in range(count):
        pick = lambda vals: vals[i] if vals else None  # noqa: E731
        spec = _complete_spec(pick(lengths), pick(books), pick(words), pick(names))
        if require_codes and None in (spec.bits, spec.num_books, spec.num_words):
            raise UsageError("training needs two of --len, --num and --words for each model, "
                             "e.g. --len 36 --num 6 --words 64")
        specs.append(spec)
    return specs


def check_options(args) -> None:
    """Check the scalar flags of ``opqn_main.py`` (an argparse namespace)."""
    _check_positive("--lr", args.lr)
    _check_positive("--bs", args.bs)
    _check_positive("--epochs", args.epochs)
    for flag, value in (("--margin", args.margin), ("--miu", args.miu)):
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
    if args.miu < 0:
        raise UsageError(f"--miu must be zero or positive, got {args.miu}")
    if args.scale is not None:
        _check_positive("--scale", args.scale)
    # Zero must not silently mean "the default" for these.
    for flag, value in (("--topk", args.topk), ("--width", args.width),
                        ("--feature-dim", args.feature_dim),
                        ("--synthface-identities", args.synthface_identities),
                        ("--synthface-images", args.synthface_images)):
        _check_positive(flag, value)
    for flag, value in (("--workers", args.workers), ("--eval-every", args.eval_every)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be zero or positive, got {value}")
    if args.evaluate:
        if not args.load:
            raise UsageError("-e/--evaluate needs --load with one checkpoint per model")
        for flag, given in (("--save", args.save), ("--resume", args.resume)):
            if given:
                raise UsageError(f"{flag} is for training; -e evaluates the models in --load")
    else:
        if args.load:
            raise UsageError("--load is for evaluation (-e); training writes --save")
        if args.export_faiss:
            raise UsageError("--export-faiss works with -e")


def check_feature_dim(feature_dim: int, num_books: int, num_words: int) -> None:
    """D must split into M sub-vectors of dimension d >= K (orthonormal codewords)."""
    if feature_dim <= 0 or feature_dim % num_books:
        raise UsageError(f"--feature-dim {feature_dim} must be a positive multiple of "
                         f"--num {num_books}")
    word_dim = feature_dim // num_books
    if num_words > word_dim:
        raise UsageError(f"--words {num_words} exceeds the sub-vector dimension "
                         f"d = --feature-dim {feature_dim} / --num {num_books} = {word_dim}: at "
                         f"most {word_dim} orthonormal codewords fit (use --feature-dim "
                         f"{num_books * num_words} or more)")


def check_split_dir(path: Path, role: str) -> None:
    """A split folder must exist and hold identity sub-folders with images."""
    cross = path.name.startswith("cross_")
    splits = "cross_train,cross_test" if cross else "train,test"
    protocol = " --protocol cross --exclude-identities IDS" if cross else ""
    layout = (f"expected layout: {path.parent}/{{{splits}}}/<identity>/<image>.jpg "
              f"(build it with: python -m data.prepare RAW_DIR --data-dir {path.parent.parent} "
              f"--name {path.parent.name}"
              f"{protocol})")
    if not path.is_dir():
        raise UsageError(f"{role} folder not found: {path} ({layout})")
    # The loaders' own scan: nested images count, hidden folders do not.
    if any(identity_images(path, name) for name in identity_folders(path)):
        return
    raise UsageError(f"{role} folder has no identity folders with images: {path} ({layout})")


def check_identity_overlap(trained: Iterable[str], evaluated: Iterable[str], checkpoint: Path,
                           allow: bool, shown: int = 5) -> list[str]:
    """The identities a cross-dataset evaluation shares with the model's training set.

    The cross-dataset protocol (SPEC §2) needs disjoint identities, so any overlap is a
    usage error naming the first ``shown`` identities and the count, unless ``allow``
    (--allow-identity-overlap). Returns the sorted overlap.
    """
    overlap = sorted(set(trained) & set(evaluated))
    if overlap and not allow:
        names = ", ".join(overlap[:shown]) + (", ..." if len(overlap) > shown else "")
        raise UsageError(
            f"-c: {len(overlap)} identities of the evaluation set were also training "
            f"identities of {checkpoint} ({names}); the cross-dataset protocol needs disjoint "
            f"identities (pass --allow-identity-overlap to evaluate anyway)")
    return overlap
