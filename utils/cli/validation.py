"""Checks of the command line, done before any work so that bad input costs nothing."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from data.folders import identity_folders, identity_images
from models.methods import DEFAULT_METHOD, get_method, method_names
from utils.errors import UsageError  # noqa: F401 (raised here, re-exported for callers)



# Flags that only training reads, which -e refuses: the optimiser's, and those of the model
# and schedule that the checkpoint holds (argparse dests).
OPTIMIZER_FLAGS = ("optimizer", "weight_decay", "adam_betas", "amsgrad")
MODEL_FLAGS = ("pretrained", "backbone_args", "margin_type", "schedule", "warmup")
TRAINING_ONLY_FLAGS = OPTIMIZER_FLAGS + MODEL_FLAGS


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


def hashing_specs(lengths: list[int] | None, names: list[str] | None) -> list[CodeSpec]:
    """Models of a hashing method: ``--len L`` gives L books of 2 words (one bit each)."""
    _check_list("--len", lengths)
    if not lengths:
        raise UsageError("give the code length: --len BITS (e.g. --len 36)")
    if names and len(names) != len(lengths):
        raise UsageError(f"--len/--save need one entry per model: --len has {len(lengths)}, "
                         f"--save has {len(names)}")
    return [CodeSpec(bits, bits, 2, names[i] if names else None)
            for i, bits in enumerate(lengths)]


def _check_method_options(args) -> None:
    method = getattr(args, "method", None) or DEFAULT_METHOD
    numeric = [info.name for name in method_names() for info in get_method(name).param_info()
               if info.choices is None]
    for flag in (*numeric, "weight_decay"):
        value = getattr(args, flag, None)
        if value is None:
            continue
        name = "--" + flag.replace("_", "-")
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{name} must be a finite number >= 0, got {value}")
    betas = getattr(args, "adam_betas", None)
    if betas and not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise UsageError(f"--adam-betas must be two numbers in [0, 1), got {betas}")
    if args.evaluate:
        for flag in OPTIMIZER_FLAGS:
            if getattr(args, flag, None) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is for training; -e evaluates "
                                 f"the models in --load")
        return
    if get_method(method).hashing:
        for flag, given in (("--num", args.num), ("--words", args.words),
                            ("--feature-dim", args.feature_dim)):
            if given:
                raise UsageError(f"{flag} does not apply to --method {method}: a binary hash "
                                 f"of --len L bits has L one-bit codebooks (give --len only)")


def check_options(args) -> None:
    """Check the scalar flags of ``opqn_main.py`` (an argparse namespace)."""
    _check_positive("--lr", args.lr)
    _check_method_options(args)
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
    for flag, value in (("--workers", args.workers), ("--eval-every", args.eval_every),
                        ("--warmup", getattr(args, "warmup", None)),
                        ("--precise-bn", getattr(args, "precise_bn", None))):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be zero or positive, got {value}")
    overwrite = getattr(args, "overwrite", False)
    regenerate = getattr(args, "regenerate_synthface", False)
    if regenerate and args.dataset != "synthface":
        raise UsageError(f"--regenerate-synthface is for --dataset synthface, not "
                         f"{args.dataset}")
    if overwrite and args.resume:
        raise UsageError("--overwrite and --resume contradict each other: --resume continues "
                         "the existing checkpoint, --overwrite replaces it")
    _check_index_type(args)
    _check_milvus(args)
    search_flags = (("--gallery", args.gallery), ("--query", args.query),
                    ("--index", args.index), ("--rebuild-index", args.rebuild_index))
    if args.search:
        if args.evaluate:
            raise UsageError("--search and -e/--evaluate are separate modes: give one")
        if not args.load or len(args.load) != 1:
            raise UsageError("--search needs --load with exactly one checkpoint")
        _check_positive("--grid-rows", args.grid_rows)
        for flag, given in (("--save", args.save), ("--resume", args.resume),
                            ("--export-faiss", args.export_faiss)):
            if given:
                raise UsageError(f"{flag} does not apply to --search")
        return
    for flag, given in search_flags:
        if given:
            raise UsageError(f"{flag} works with --search")
    if args.evaluate:
        if not args.load:
            raise UsageError("-e/--evaluate needs --load with one checkpoint per model")
        if regenerate:
            raise UsageError("--regenerate-synthface is for training: -e never regenerates "
                             "the data a model is evaluated on")
        for flag, given in (("--save", args.save), ("--resume", args.resume),
                            ("--overwrite", overwrite)):
            if given:
                raise UsageError(f"{flag} is for training; -e evaluates the models in --load")
        # The checkpoint holds the model (backbone, margin) and -e does not train.
        for flag, given in ((f"--{dest.replace('_', '-')}", getattr(args, dest, None))
                            for dest in MODEL_FLAGS):
            if given:
                raise UsageError(f"{flag} is for training; -e reads the model from the "
                                 f"checkpoint in --load")
    else:
        if args.load:
            raise UsageError("--load is for evaluation (-e); training writes --save")
        if args.export_faiss:
            raise UsageError("--export-faiss works with -e")


def _check_milvus(args) -> None:
    """--milvus with --search or -e; its companions only with it."""
    uri = getattr(args, "milvus", None)
    companions = (("--milvus-collection", getattr(args, "milvus_collection", None)),
                  ("--where", getattr(args, "where", None)),
                  ("--milvus-delete", getattr(args, "milvus_delete", None)))
    if not uri:
        for flag, given in companions:
            if given:
                raise UsageError(f"{flag} works with --milvus")
        return
    if not args.search and not args.evaluate:
        raise UsageError("--milvus works with --search or -e")
    timeout = getattr(args, "milvus_timeout", 30.0)
    if not (math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"--milvus-timeout must be a positive number of seconds, got "
                         f"{timeout}")
    if getattr(args, "index_type", "flat") != "flat":
        raise UsageError("--milvus searches with Milvus's own index: drop --index-type")
    if args.search:
        if args.index:
            raise UsageError("--index names a local index file; with --milvus the gallery "
                             "lives in the collection")
        if getattr(args, "milvus_delete", None) and args.gallery:
            raise UsageError("--milvus-delete and --gallery contradict each other: adding "
                             "the folder would put the deleted images back")
        if getattr(args, "where", None) is not None and not args.where.strip():
            raise UsageError("--where is empty: give a Milvus filter expression")
        return
    for flag, given in companions[1:]:
        if given:
            raise UsageError(f"{flag} works with --search --milvus")
    if getattr(args, "milvus_collection", None) and args.load and len(args.load) > 1:
        raise UsageError("--milvus-collection names one collection: -e with several models "
                         "writes one collection per model (opqn_<checkpoint name>)")


def _check_index_type(args) -> None:
    """--index-type ivf with --search or --export-faiss; --nlist/--nprobe only with it."""
    index_type = getattr(args, "index_type", "flat")
    nlist, nprobe = getattr(args, "nlist", None), getattr(args, "nprobe", None)
    _check_positive("--nlist", nlist)
    _check_positive("--nprobe", nprobe)
    if index_type != "ivf":
        for flag, given in (("--nlist", nlist), ("--nprobe", nprobe)):
            if given is not None:
                raise UsageError(f"{flag} applies to --index-type ivf")
        return
    if not args.search and not args.export_faiss:
        raise UsageError("--index-type ivf works with --search or -e --export-faiss")
    if nlist is not None and nprobe is not None and nprobe > nlist:
        raise UsageError(f"--nprobe {nprobe} exceeds --nlist {nlist}: at most every list "
                         f"can be scanned")


def check_feature_dim(feature_dim: int, num_books: int, num_words: int,
                      method: str = DEFAULT_METHOD) -> None:
    """D must split into M sub-vectors; with orthonormal codewords (OPQN) also d >= K."""
    if feature_dim <= 0 or feature_dim % num_books:
        raise UsageError(f"--feature-dim {feature_dim} must be a positive multiple of "
                         f"--num {num_books}")
    word_dim = feature_dim // num_books
    if num_words > word_dim and get_method(method).orthonormal:
        raise UsageError(f"--words {num_words} exceeds the sub-vector dimension "
                         f"d = --feature-dim {feature_dim} / --num {num_books} = {word_dim}: at "
                         f"most {word_dim} orthonormal codewords fit (use --feature-dim "
                         f"{num_books * num_words} or more; a method that learns its codewords "
                         f"allows K > d)")


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


def quantizer_memory_bytes(feature_dim: int, num_books: int, num_words: int) -> int:
    """Bytes that building and training the quantization head take, from (D, M, K) alone.

    V_m: ``M x d x K`` float32 weights plus their gradient and SGD momentum (3 copies); the
    codebooks: ``M x d x K`` float64 while they are built, then float32; the ``d x d`` float64
    DCT matrix they are built from. Nothing else grows with K as fast.
    """
    word_dim = feature_dim // num_books
    books = num_books * word_dim * num_words
    return books * (3 * 4 + 8 + 4) + word_dim * word_dim * 8


def _gib(size: float) -> str:
    return f"{size / 2 ** 30:.1f} GiB"


def check_quantizer_memory(spec: CodeSpec, feature_dim: int, limit_bytes: int, where: str,
                           feature_dim_for: Callable[[int, int], int] | None = None) -> None:
    """Refuse a code configuration whose V_m and codebooks cannot fit in ``limit_bytes``.

    ``feature_dim_for(M, K)`` gives D for another K (to suggest the largest K that fits);
    ``where`` names the memory the limit is taken from, for the message.
    """
    need = quantizer_memory_bytes(feature_dim, spec.num_books, spec.num_words)
    if need <= limit_bytes:
        return
    fits = None
    words = 2
    while words < spec.num_words:
        dim = feature_dim_for(spec.num_books, words) if feature_dim_for else feature_dim
        if dim // spec.num_books < words or \
                quantizer_memory_bytes(dim, spec.num_books, words) > limit_bytes:
            break
        fits, words = words, words * 2
    hint = (f"with --num {spec.num_books} use --words {fits} or fewer (--len "
            f"{spec.num_books * int(math.log2(fits))})" if fits else "use fewer codewords")
    raise UsageError(
        f"--len {spec.bits} --num {spec.num_books} --words {spec.num_words} (D = {feature_dim}, "
        f"d = {feature_dim // spec.num_books}) needs about {_gib(need)} for V_m (with its "
        f"gradient and momentum) and the codebooks alone, more than the {_gib(limit_bytes)} "
        f"allowed ({where}); {hint}")


def check_no_overwrite(best: Path, last: Path, resume: bool, overwrite: bool) -> None:
    """Training must not replace an existing checkpoint unless told to.

    ``--resume`` continues it (its ``.last`` file), ``--overwrite`` replaces it; without
    either an existing file of the model is an error naming it.
    """
    if resume or overwrite:
        return
    for path in (best, last):
        if path.exists():
            raise UsageError(f"checkpoint {path} already exists and training would overwrite "
                             f"it: add --resume to continue that run, --overwrite to replace "
                             f"it, or choose another --save name")


def check_batch_fits(num_images: int, batch: int | None, default_batch: int,
                     split: Path) -> None:
    """Every training batch is full (an epoch's last partial batch is dropped, so that
    batch statistics never rest on a handful of images), so the split must hold at least
    one batch (batches below 2 images are refused earlier, by
    utils.training.loop.check_per_rank_batch)."""
    size = batch or default_batch
    flag = f"--bs {size}" if batch else f"the default batch of {size} (--bs)"
    if num_images < size:
        hint = (f"give --bs {num_images} or less" if num_images >= 2
                else "it needs at least 2 images")
        raise UsageError(f"the training split {split} has {num_images} images, fewer than "
                         f"one batch with {flag}: {hint}")


def check_identity_overlap(trained: Iterable[str], evaluated: Iterable[str], checkpoint: Path,
                           allow: bool, shown: int = 5) -> list[str]:
    """The identities a cross-dataset evaluation shares with the model's training set.

    The cross-dataset protocol (docs/paper.md, "Evaluation protocol") needs disjoint identities, so any overlap is a
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
