"""The bar every method must clear on the digits set: unsupervised PQ on its pixels.

Writes the digits set if needed (``bench/digits_set.py``), turns every image into the
project's 32x32 test-time input (resize 35, centre crop 32, normalise), flattens it to a
3072-d vector and reports the mAP over the whole ranked gallery (gallery = train split,
queries = test split) of unsupervised product quantization (faiss ``IndexPQ`` trained on the
gallery, asymmetric distance) at the code lengths of ``bench/bench_synthface_pq.py``, and of
exact L2 on the pixels. The same split and transform as ``opqn_main.py --dataset digits``,
so the numbers compare like for like with a trained model's mAP.

Usage: ``python -m bench.digits_pixel_pq [--data-dir data] [--seed 0]``
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


from bench.bench_synthface_pq import (  # noqa: E402
    PQ_CONFIGS,
    l2_distances,
    load_split,
    mean_average_precision,
    pq_distances,
)
from bench.digits_set import write_digits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--seed", type=int, default=0, help="faiss k-means seed (0)")
    args = p.parse_args(argv)
    root = write_digits(args.data_dir)
    xb, yb = load_split(root / "train")
    xq, yq = load_split(root / "test")
    print(f"{root}: gallery {len(yb)}, queries {len(yq)}, {len(np.unique(yb))} classes; "
          f"chance mAP ~ {np.mean([np.mean(yb == y) for y in yq]):.4f}")
    for m, nbits in PQ_CONFIGS:
        mAP = mean_average_precision(pq_distances(xb, xq, m, nbits, args.seed), yq, yb)
        print(f"unsupervised PQ on pixels, {m * nbits} bits ({m}x{nbits}): mAP {mAP:.4f}")
    print(f"exact L2 on pixels: mAP {mean_average_precision(l2_distances(xb, xq), yq, yb):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
