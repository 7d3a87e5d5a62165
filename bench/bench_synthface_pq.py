"""Pixel baselines on SynthFace: how well does unsupervised retrieval do without learning?

Generates SynthFace (into a temporary folder, or ``--data-dir``), turns every image into
the project's 32x32 test-time input (resize 35, centre crop 32, normalise with the
32x32 datasets' mean/std), flattens it to a 3072-d vector, and reports mAP over the whole
ranked database (database = train split, queries = test split) for

* unsupervised product quantization (faiss ``IndexPQ`` trained on the train split,
  ranking by asymmetric PQ distance) at 16/24/36/48 bits (2x8, 4x6, 6x6, 8x6), and
* exact L2 nearest neighbour on raw pixels, for reference.

A useful dataset keeps these well below 0.3 (aim <= 0.15) while a CNN trained with
identity labels reaches mAP >= 0.8.

Usage: ``python -m bench.bench_synthface_pq [--data-dir DIR] [--seed 0] [--difficulty 1.0]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


from data.synthface import (  # noqa: E402
    DEFAULT_CROSS_IDENTITIES,
    DEFAULT_NUM_IDENTITIES,
    DEFAULT_TEST_PER_IDENTITY,
    DEFAULT_TRAIN_PER_IDENTITY,
    describe_synthface,
    ensure_synthface,
    synthface_meta,
)

# The project's 32x32 normalisation (docs/paper.md, "Training protocol").
MEAN = np.array([0.639, 0.479, 0.404], dtype=np.float32)
STD = np.array([0.216, 0.183, 0.171], dtype=np.float32)
PQ_CONFIGS = ((2, 8), (4, 6), (6, 6), (8, 6))  # (M sub-quantizers, bits each)


def load_split(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load ``split_dir/<identity>/*.png`` as (N, 3072) float32 vectors and int labels,
    using the test transform: resize 35 (bilinear), centre crop 32, normalise."""
    vecs, labels = [], []
    for label, ident in enumerate(sorted(p for p in split_dir.iterdir() if p.is_dir())):
        for f in sorted(ident.glob("*.png")):
            img = Image.open(f).convert("RGB").resize((35, 35), Image.BILINEAR)
            top = int(round((35 - 32) / 2.0))  # torchvision's CenterCrop offset
            img = img.crop((top, top, top + 32, top + 32))
            x = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
            vecs.append(x.reshape(-1))
            labels.append(label)
    return np.stack(vecs).astype(np.float32), np.asarray(labels)


def mean_average_precision(dist: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray) -> float:
    """mAP over the whole ranked database.  Rank by ascending distance; ties are broken
    by database index (stable sort) so the result does not depend on the sort algorithm.
    AP = mean of the precision at each relevant hit; a query without relevant items
    scores 0 instead of NaN."""
    order = np.argsort(dist, axis=1, kind="stable")
    rel = db_labels[order] == q_labels[:, None]
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    prec_sum = (hits / ranks * rel).sum(axis=1)
    n_rel = rel.sum(axis=1)
    ap = np.where(n_rel > 0, prec_sum / np.maximum(n_rel, 1), 0.0)
    return float(ap.mean())


def pq_distances(xb: np.ndarray, xq: np.ndarray, m: int, nbits: int, seed: int = 0) -> np.ndarray:
    """Train faiss IndexPQ on the database vectors, encode them, and return the
    asymmetric (query vector vs. reconstructed code) squared L2 distance to every item."""
    import faiss

    d = xb.shape[1]
    if d % m:  # pad with zeros so the dimension divides into m sub-vectors
        pad = m - d % m
        xb = np.pad(xb, ((0, 0), (0, pad)))
        xq = np.pad(xq, ((0, 0), (0, pad)))
        d += pad
    index = faiss.IndexPQ(d, m, nbits, faiss.METRIC_L2)
    index.pq.cp.seed = seed
    index.train(np.ascontiguousarray(xb))
    index.add(np.ascontiguousarray(xb))
    # Search the whole database: faiss returns ADC distances; scatter them back into
    # database order so ranking/tie-breaking is done by our own stable sort.
    dist, idx = index.search(np.ascontiguousarray(xq), index.ntotal)
    out = np.empty_like(dist)
    np.put_along_axis(out, idx, dist, axis=1)
    return out


def l2_distances(xb: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """Exact squared L2 distances (queries x database)."""
    return (xq ** 2).sum(1)[:, None] - 2.0 * xq @ xb.T + (xb ** 2).sum(1)[None, :]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help="where to generate (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", type=float, default=1.0)
    ap.add_argument("--identities", type=int, default=DEFAULT_NUM_IDENTITIES)
    ap.add_argument("--train-per-identity", type=int, default=DEFAULT_TRAIN_PER_IDENTITY)
    ap.add_argument("--cross-identities", type=int, default=DEFAULT_CROSS_IDENTITIES)
    args = ap.parse_args(argv)
    # faiss trains each sub-quantizer's k-means on the database: it needs at least
    # 2**nbits training vectors, so check before generating anything.
    need = max(2 ** nbits for _m, nbits in PQ_CONFIGS)
    have = args.identities * args.train_per_identity
    if have < need:
        ap.exit(2, f"{ap.prog}: error: faiss PQ training at {max(b for _m, b in PQ_CONFIGS)} "
                   f"bits per sub-quantizer needs at least {need} training images, but "
                   f"--identities {args.identities} x --train-per-identity "
                   f"{args.train_per_identity} gives {have}: use --identities "
                   f"{-(-need // max(1, args.train_per_identity))} or more\n")

    existing = synthface_meta(args.data_dir) if args.data_dir is not None else None
    wanted = {"seed": args.seed, "num_identities": args.identities,
              "train_per_identity": args.train_per_identity,
              "cross_identities": args.cross_identities, "difficulty": float(args.difficulty)}
    if existing is not None and any(existing.get(k) != v for k, v in wanted.items()):
        # ensure_synthface would replace it: never destroy a dataset the user has trained on.
        ap.exit(2, f"{ap.prog}: error: {args.data_dir}/synthface holds another synthface "
                   f"({describe_synthface(existing)}, seed {existing.get('seed')}); give "
                   f"matching --identities/--train-per-identity/--seed, or another "
                   f"--data-dir\n")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir if args.data_dir is not None else Path(tmp)
        t0 = time.perf_counter()
        root = ensure_synthface(data_dir, seed=args.seed, num_identities=args.identities,
                                train_per_identity=args.train_per_identity,
                                test_per_identity=DEFAULT_TEST_PER_IDENTITY,
                                cross_identities=args.cross_identities, difficulty=args.difficulty)
        print(f"dataset: {root}  (ensure_synthface took {time.perf_counter() - t0:.1f} s)")
        xb, yb = load_split(root / "train")
        xq, yq = load_split(root / "test")
    print(f"database {xb.shape[0]} x {xb.shape[1]}, queries {xq.shape[0]}, identities {len(np.unique(yb))}")
    print(f"chance mAP (random ranking) ~ {np.mean([np.mean(yb == y) for y in yq]):.4f}")
    for m, nbits in PQ_CONFIGS:
        t0 = time.perf_counter()
        mAP = mean_average_precision(pq_distances(xb, xq, m, nbits, args.seed), yq, yb)
        print(f"PQ {m * nbits:2d} bits ({m}x{nbits}): mAP {mAP:.4f}   [{time.perf_counter() - t0:.1f} s]")
    print(f"exact L2 on pixels: mAP {mean_average_precision(l2_distances(xb, xq), yq, yb):.4f}")


if __name__ == "__main__":
    main()
