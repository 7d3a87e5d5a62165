"""A harder real image set for bench scripts: Fashion-MNIST as an identity-folder dataset
(``<root>/fashion/{train,test}/<class>/<n>.png``), each of its 10 clothing classes an
"identity".

    apt-get install dataset-fashion-mnist        # Debian's package: the four IDX files
    python -m bench.fashion_set --data-dir data --train-per-class 300 --test-per-class 30
    python opqn_main.py --dataset fashion --data-dir data --width 16 --cache

The gallery (``train``) is drawn from Fashion-MNIST's 60,000 training images and the queries
(``test``) from its 10,000 test images, ``--train-per-class`` and ``--test-per-class`` of
each class with ``--seed``, so the two splits never share an image. Each 28x28 grey image
is upsampled to 35x35 (the stored size of the 32x32 protocol) and saved as a grey RGB PNG.
It is a bench dependency only: nothing in requirements.txt, and the suite never needs it.

Fashion-MNIST: Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747 (2017).
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_NAME = "fashion"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype, dims = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file")
        shape = struct.unpack(f">{dims}I", f.read(4 * dims))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} values for the header's shape {shape}")
    return data.reshape(shape)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` of Fashion-MNIST's ``split``."""
    images_file, labels_file = (source / name for name in FILES[split])
    for path in (images_file, labels_file):
        if not path.is_file():
            raise SystemExit(f"{path} not found: apt-get install dataset-fashion-mnist, or "
                             f"pass --source with the four IDX files")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if len(images) != len(labels):
        raise SystemExit(f"{source}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def write_fashion(data_dir: str | Path, train_per_class: int = 300, test_per_class: int = 30,
                  size: int = 35, seed: int = 0, source: Path = DEBIAN_FOLDER) -> Path:
    """Write the set under ``data_dir/fashion`` (kept as it is when already complete with the
    same sizes and seed); returns its folder."""
    root = Path(data_dir) / FASHION_NAME
    marker = root / f".complete_{train_per_class}_{test_per_class}_{size}_{seed}"
    if marker.is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} exists but holds another Fashion-MNIST split; remove it "
                         f"first")
    rng = np.random.default_rng(seed)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an earlier interrupted write
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = load_split(Path(source), split)
        for label, name in enumerate(CLASSES):
            index = np.flatnonzero(labels == label)
            if per_class > len(index):
                raise SystemExit(f"--{split}-per-class {per_class}: class {name} has "
                                 f"{len(index)} {split} images")
            folder = partial / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in sorted(rng.choice(index, size=per_class, replace=False).tolist()):
                image = Image.fromarray(images[n]).resize((size, size), Image.BICUBIC)
                image.convert("RGB").save(folder / f"{n:05d}.png")
    if root.exists():
        root.rmdir()  # empty, checked above
    partial.rename(root)  # all or nothing
    marker.touch()
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--train-per-class", type=int, default=300,
                        help="gallery images per class, from the training file (300)")
    parser.add_argument("--test-per-class", type=int, default=30,
                        help="query images per class, from the test file (30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=DEBIAN_FOLDER,
                        help=f"folder of the four IDX files ({DEBIAN_FOLDER})")
    args = parser.parse_args(argv)
    if args.train_per_class < 1 or args.test_per_class < 1:
        parser.error("--train-per-class and --test-per-class must be positive")
    root = write_fashion(args.data_dir, args.train_per_class, args.test_per_class,
                         seed=args.seed, source=args.source)
    counts = {s: sum(1 for _ in (root / s).rglob("*.png")) for s in ("train", "test")}
    print(f"{root}: {counts['train']} training (gallery) and {counts['test']} query images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
