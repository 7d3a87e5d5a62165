"""A real labelled image set for bench scripts: scikit-learn's handwritten digits as an
identity-folder dataset (``<root>/digits/{train,test}/<digit>/<n>.png``).

    python -m bench.digits_set --data-dir data        # then: opqn_main.py --dataset digits

scikit-learn ships the 1,797 8x8 images inside its wheel, so nothing is downloaded; it is a
bench dependency only (``pip install scikit-learn``), never in requirements.txt. Each image
is upsampled to 35x35 (the 32x32 protocol's stored size) as a grey RGB PNG; ``test_per_class``
images of each digit go to the query split, the rest to the training split (the gallery).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS_NAME = "digits"


def write_digits(data_dir: str | Path, test_per_class: int = 30, size: int = 35,
                 seed: int = 0) -> Path:
    """Write the digits set under ``data_dir/digits`` (kept as it is when complete);
    returns its folder. The query images of each class are drawn with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("bench/digits_set.py needs scikit-learn: pip install scikit-learn")
    root = Path(data_dir) / DIGITS_NAME
    digits = load_digits()
    marker = root / f".complete_{test_per_class}_{size}_{seed}"
    if marker.is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} exists but holds another digits split; remove it first")
    rng = np.random.default_rng(seed)
    grey = (digits.images / 16.0 * 255).clip(0, 255).astype(np.uint8)  # (N, 8, 8), 0..16
    for label in range(10):
        index = np.flatnonzero(digits.target == label)
        test = set(rng.choice(index, size=test_per_class, replace=False).tolist())
        for n in index:
            split = "test" if n in test else "train"
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(grey[n]).resize((size, size), Image.BICUBIC)
            image.convert("RGB").save(folder / f"{n:04d}.png")
    marker.touch()
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--test-per-class", type=int, default=30)
    args = parser.parse_args(argv)
    root = write_digits(args.data_dir, args.test_per_class)
    counts = {s: sum(1 for _ in (root / s).rglob("*.png")) for s in ("train", "test")}
    print(f"{root}: {counts['train']} training (gallery) and {counts['test']} query images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
