"""A small real image set for checking that every method trains: scikit-learn's digits.

``sklearn.datasets.load_digits`` ships 1,797 labelled 8x8 grey images of the digits 0-9 in
the scikit-learn wheel (no download). This script writes them as an identity-folder dataset
that ``opqn_main.py --dataset digits`` reads with the generic 32x32 preset:

    DIR/digits/train/<digit>/<index>.png     # the gallery (database)
    DIR/digits/test/<digit>/<index>.png      # the queries

each image upsampled (bilinear) to 32x32 and stored as RGB. The split is drawn per class
with ``--seed``. It then reports the like-for-like baseline every method must beat:
unsupervised product quantization (faiss ``IndexPQ``) on the test-time pixels, at the
code lengths of ``bench/bench_synthface_pq.py``.

Usage: ``python bench/digits_set.py [--data-dir data] [--train-per-class 140]
[--test-per-class 30] [--seed 0] [--force]``; scikit-learn is needed for this script only
(it is not in requirements.txt).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from bench.bench_synthface_pq import (  # noqa: E402
    PQ_CONFIGS,
    l2_distances,
    load_split,
    mean_average_precision,
    pq_distances,
)

NAME = "digits"
SIDE = 32


def split_indices(labels: np.ndarray, train: int, test: int,
                  seed: int) -> tuple[list[int], list[int]]:
    """Per class, ``test`` query and ``train`` gallery indices drawn with ``seed``.

    Raises ValueError when a class holds fewer than ``train + test`` images.
    """
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < train + test:
            raise ValueError(f"digit {c} has {len(members)} images, fewer than "
                             f"--train-per-class {train} + --test-per-class {test}")
        test_idx += members[:test].tolist()
        train_idx += members[test:test + train].tolist()
    return train_idx, test_idx


def to_rgb(image: np.ndarray) -> Image.Image:
    """An 8x8 image with values 0..16 -> a ``SIDE`` x ``SIDE`` RGB PIL image."""
    grey = Image.fromarray(np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8), "L")
    return grey.resize((SIDE, SIDE), Image.BILINEAR).convert("RGB")


def write_digits(data_dir: Path, train: int, test: int, seed: int, force: bool) -> Path:
    """Write ``data_dir/digits/{train,test}/<digit>/*.png``; returns the dataset folder."""
    from sklearn.datasets import load_digits

    root = data_dir / NAME
    if root.exists():
        if not force:
            raise FileExistsError(f"{root} exists (use --force to replace it)")
        shutil.rmtree(root)
    digits = load_digits()
    train_idx, test_idx = split_indices(digits.target, train, test, seed)
    for split, indices in (("train", train_idx), ("test", test_idx)):
        for i in indices:
            folder = root / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            to_rgb(digits.images[i]).save(folder / f"{i:04d}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--train-per-class", type=int, default=140)
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing digits set")
    args = p.parse_args(argv)
    if args.train_per_class < 1 or args.test_per_class < 1:
        p.error("--train-per-class and --test-per-class must be at least 1")
    try:
        root = write_digits(args.data_dir, args.train_per_class, args.test_per_class,
                            args.seed, args.force)
    except (FileExistsError, ValueError) as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    xb, yb = load_split(root / "train")
    xq, yq = load_split(root / "test")
    print(f"wrote {root}: gallery {len(yb)}, queries {len(yq)}, {len(np.unique(yb))} classes")
    print(f"chance mAP (random ranking) ~ {np.mean([np.mean(yb == y) for y in yq]):.4f}")
    for m, nbits in PQ_CONFIGS:
        if len(yb) < 2 ** nbits:
            continue  # faiss k-means needs at least K training vectors
        mAP = mean_average_precision(pq_distances(xb, xq, m, nbits, args.seed), yq, yb)
        print(f"unsupervised PQ on pixels, {m * nbits} bits ({m}x{nbits}): mAP {mAP:.4f}")
    print(f"exact L2 on pixels: mAP {mean_average_precision(l2_distances(xb, xq), yq, yb):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
