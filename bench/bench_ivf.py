"""IVF over OPQN codes against exhaustive search, on a gallery of N items (default 1M).

The gallery's codes follow a trained synthface model's statistics. The model (``--load``,
or one trained here for ``--epochs`` on synthface, 36 bits = 6x64) encodes synthface's
training split; per identity and per book that gives a distribution over the K words. A
synthetic identity takes, for each book, the distribution of a random real identity (the
first identities are the real ones, whole), and its ``--per-identity`` items draw their
words from those distributions. The script prints, for the real codes and for the generated
gallery, the fraction of distinct codes and the within-identity agreement per book (the
share of an identity's items that have its most frequent word in that book). The queries
are the same model's query tables of synthface's test split.

Measured in the same run, on the same codes and tables:

* exhaustive ranking: faiss ``IndexPQ`` (flat) and ``utils.retrieval.adc.search_adc``;
* ``IndexIVFPQ`` over the unchanged codes (:func:`utils.retrieval.ivf_index.build_ivf_index`) at each
  ``--nprobe``: recall@10 and queries per second. Recall@10 counts the IVF's top-10 items
  whose score reaches the exhaustive 10th score (identical codes tie, so item identities
  alone would under-count);
* build time (k-means and adding), index memory (the serialised index) and the peak RSS.

The flat search is timed before the IVF is built and again after the sweep, and the ratios
use the faster of the two, so that a busy moment of a shared machine never favours the IVF.
Flat and IVF search the same batch of queries with the same faiss threads.

The last line reads
``ivf: N=<n> nlist=<nlist> nprobe=<nprobe> recall@10=<r> speed-up vs flat=<x>x`` for the
smallest swept nprobe reaching ``--target-recall`` (else the largest).

Usage: ``python -m bench.bench_ivf [--n 1000000] [--nlist 4096] [--nprobe 1 2 4 ... 256]
[--load CKPT] [--epochs 12] [--data-dir data]``. Without ``--load`` it uses
``checkpoint/bench_ivf_36bits_<epochs>ep.tar`` and first trains it (as ``python opqn_main.py
--dataset synthface --len 36 --num 6 --words 64 --epochs 12 --schedule cosine --eval-every 0
--save bench_ivf_36bits_12ep.tar``) unless a finished training for those epochs is there
(the last-epoch checkpoint beside it says so); an interrupted training is resumed. The
default nlist is a power of two near ``4 sqrt(N)`` (:func:`bench_nlist`).
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


from data.datasets import FaceFolder  # noqa: E402
from utils.checkpoints.store import (CheckpointError, last_checkpoint_path,  # noqa: E402
                              load_checkpoint)
from utils.retrieval.faiss_index import _faiss, build_head_index, search_head_queries  # noqa: E402
from utils.retrieval.inference import encode_images  # noqa: E402
from utils.retrieval.ivf_index import (MIN_POINTS_PER_LIST, build_ivf_index, default_nlist,  # noqa: E402
                             set_nprobe)
from utils.retrieval.adc import search_adc  # noqa: E402
from utils.checkpoints.loading import load_model  # noqa: E402

TOPK = 10
SMOOTHING = 0.01  # pseudo-count per word: unseen words stay possible, rarely
SAMPLE_BLOCK = 1 << 20
MODEL_NAME = "bench_ivf_36bits_{epochs}ep.tar"
DEFAULT_EPOCHS = 12


def model_path(epochs: int) -> Path:
    """The default model's file: one per epoch count, so that changing ``--epochs`` never
    reuses a model trained for another."""
    return Path("checkpoint") / MODEL_NAME.format(epochs=epochs)


def training_state(path: Path, epochs: int) -> str:
    """``"done"`` when ``path`` holds a finished ``epochs``-epoch training of this script,
    ``"resume"`` when only an interrupted one is there (its last checkpoint planned
    ``epochs`` epochs but completed fewer), else ``"train"`` (absent, unreadable, or trained
    for another number of epochs: stale)."""
    try:
        last = load_checkpoint(last_checkpoint_path(path))
    except CheckpointError:
        return "train"
    if last.get("train_settings", {}).get("epochs") != epochs:
        return "train"
    if int(last.get("epoch", 0)) < epochs:
        return "resume"
    return "done" if path.exists() else "train"


def trained_model(args: argparse.Namespace) -> Path:
    """``--load``, else ``checkpoint/bench_ivf_36bits_<epochs>ep.tar``, trained here on
    synthface (36 bits, 6x64, ``--epochs``, cosine schedule) unless a finished training for
    those epochs is there; an interrupted one is resumed."""
    if args.load:
        return Path(args.load)
    path = model_path(args.epochs)
    state = training_state(path, args.epochs)
    if state == "done":
        return path
    import opqn_main

    argv = ["--dataset", "synthface", "--data-dir", args.data_dir, "--len", "36", "--num", "6",
            "--words", "64", "--epochs", str(args.epochs), "--schedule", "cosine",
            "--eval-every", "0", "--seed", str(args.seed), "--save", path.name, "--no-progress"]
    # A stale or broken file of that name is replaced.
    argv.append("--resume" if state == "resume" else "--overwrite")
    code = opqn_main.main(argv)
    if code != 0:
        raise SystemExit(f"training the synthface model failed (exit {code})")
    return path


def code_stats(codes: torch.Tensor, identity: torch.Tensor, k: int) -> tuple[float, list]:
    """Distinct-code fraction, and per book the mean over identities of the share of its
    items holding its most frequent word."""
    distinct = torch.unique(codes.to(torch.int64), dim=0).shape[0] / codes.shape[0]
    ids, inv = torch.unique(identity, return_inverse=True)
    sizes = torch.bincount(inv, minlength=ids.numel()).float()
    agreement = []
    for m in range(codes.shape[1]):
        counts = torch.zeros(ids.numel() * k)
        counts.index_add_(0, inv * k + codes[:, m].long(), torch.ones(codes.shape[0]))
        agreement.append(float((counts.view(-1, k).max(1).values / sizes).mean()))
    return distinct, agreement


def identity_distributions(codes: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(R, M, K)`` float64: per real identity and book, the smoothed word distribution."""
    r, m = int(labels.max()) + 1, codes.shape[1]
    counts = torch.zeros(r, m, k, dtype=torch.float64)
    for book in range(m):
        counts[:, book].index_put_((labels.long(), codes[:, book].long()),
                                   torch.ones(codes.shape[0], dtype=torch.float64),
                                   accumulate=True)
    counts += SMOOTHING
    return counts / counts.sum(-1, keepdim=True)


def synthetic_gallery(dist: torch.Tensor, n: int, per_identity: int, gen: torch.Generator,
                      progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes (n, M) uint8, identity (n,))``: identity ``j`` draws book ``m``'s word from
    the distribution of real identity ``profile[j, m]`` (the first R identities are the real
    ones, unmixed)."""
    r, m, k = dist.shape
    identities = -(-n // per_identity)
    profile = torch.randint(0, r, (identities, m), generator=gen)
    real = min(r, identities)
    profile[:real] = torch.arange(real)[:, None]
    cdf = dist.cumsum(-1).float()
    cdf[..., -1] = 1.0
    identity = torch.arange(n) // per_identity
    codes = torch.empty(n, m, dtype=torch.uint8)
    for start in tqdm(range(0, n, SAMPLE_BLOCK), desc="sample codes", leave=False,
                      disable=not progress):
        ident = identity[start : start + SAMPLE_BLOCK]
        for book in range(m):
            rows = cdf[profile[ident, book], book]  # (b, K)
            u = torch.rand(ident.numel(), 1, generator=gen)
            codes[start : start + ident.numel(), book] = \
                torch.searchsorted(rows, u).clamp_max(k - 1).squeeze(1).to(torch.uint8)
    return codes, identity


def bench_nlist(n: int) -> int:
    """The benchmark's nlist: a power of two near ``4 sqrt(n)`` (4,096 at 1M), within
    :func:`utils.retrieval.ivf_index.default_nlist`'s rule of at least 39 items a list. Four times
    the library's default: routing items is cheap (per-book tables) and the query's
    ``nlist x D`` routing is a small part of its time, while finer lists find the same
    recall in fewer scanned codes (docs/scaling.md, "Pick nlist and nprobe")."""
    nlist = 4 * default_nlist(n)
    while nlist > 1 and nlist * MIN_POINTS_PER_LIST > n:
        nlist //= 2
    return nlist


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def tie_aware_recall(scores: torch.Tensor, exact_kth: torch.Tensor) -> float:
    """Mean share of the top-k whose score reaches the exhaustive k-th score."""
    hit = scores >= exact_kth[:, None] - 1e-6
    return float(hit.float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="gallery items (default 1M)")
    p.add_argument("--nlist", type=int, help="IVF lists (default: a power of two near "
                   "4 sqrt(N), 4,096 at 1M; see bench_nlist)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                   help="lists scanned per query, swept")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--per-identity", type=int, default=30, help="items per identity (30)")
    p.add_argument("--load", help="a trained synthface checkpoint (default: checkpoint/"
                   f"{MODEL_NAME.format(epochs='<epochs>')}, trained first if absent)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"epochs when the default model is trained here ({DEFAULT_EPOCHS}, "
                        "cosine schedule: minutes on 2 cores; more epochs give tighter "
                        "identities)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--adc-queries", type=int, default=100,
                   help="queries timed with search_adc (it is the slowest)")
    p.add_argument("--spherical", action="store_true",
                   help="spherical k-means for the coarse quantizer (normalised centroids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args()
    t_start = time.perf_counter()
    faiss = _faiss()
    torch.manual_seed(args.seed)
    model_file, t_train = timed(trained_model, args)
    model = load_model(load_checkpoint(model_file), torch.device("cpu"))
    head = model.quantizer
    k = model.config.num_words
    train = FaceFolder(Path(args.data_dir) / "synthface" / "train")
    test = FaceFolder(Path(args.data_dir) / "synthface" / "test", class_to_idx=train.class_to_idx)
    db = encode_images(model, [path for path, _ in train.samples])
    qs = encode_images(model, [path for path, _ in test.samples])
    labels = torch.tensor(train.targets)
    distinct, agreement = code_stats(db.codes, labels, k)
    print(f"model: {model_file} ({t_train:.0f}s to train or find), {model.config.method} "
          f"{model.config.bits} bits ({model.config.num_books}x{k}); {db.codes.shape[0]} real "
          f"codes of {int(labels.max()) + 1} identities")
    print(f"real codes: distinct {distinct:.3f}; within-identity agreement per book "
          f"{' '.join(f'{a:.3f}' for a in agreement)}")

    gen = torch.Generator().manual_seed(args.seed)
    (codes, identity), t_gen = timed(synthetic_gallery, identity_distributions(db.codes, labels, k),
                                     args.n, args.per_identity, gen, not args.no_progress)
    distinct, agreement = code_stats(codes[:min(args.n, 2_000_000)],
                                     identity[:min(args.n, 2_000_000)], k)
    print(f"gallery: N={args.n} in {int(identity[-1]) + 1} identities ({t_gen:.1f}s); "
          f"distinct {distinct:.3f}; within-identity agreement per book "
          f"{' '.join(f'{a:.3f}' for a in agreement)}")

    tables = qs.tables
    vectors = head.faiss_queries(qs.features)
    nq = tables.shape[0]
    flat, t_flat_build = timed(build_head_index, head, codes)
    (exact, _), t_flat = timed(search_head_queries, flat, head, vectors, TOPK)
    nadc = min(args.adc_queries, nq)
    (adc, _), t_adc = timed(search_adc, tables[:nadc], codes, TOPK)
    gap = float((adc - exact[:nadc]).abs().max())
    print(f"flat IndexPQ: {nq / t_flat:.1f} queries/s (built in {t_flat_build:.1f}s); "
          f"search_adc: {nadc / t_adc:.1f} queries/s; top-{TOPK} scores differ by {gap:.1e}")

    nlist = args.nlist or bench_nlist(args.n)
    ivf, t_build = timed(build_ivf_index, head, codes, nlist, 1, args.seed, args.spherical)
    size = faiss.serialize_index(ivf).nbytes
    sizes = np.array([ivf.invlists.list_size(i) for i in range(nlist)])
    kind = " (spherical k-means)" if args.spherical else ""
    print(f"IVF: nlist={nlist}{kind} built in {t_build:.1f}s; index {size / 2**20:.1f} MiB "
          f"({size / args.n:.1f} bytes/item); list sizes median {int(np.median(sizes))}, "
          f"max {sizes.max()}, empty {int((sizes == 0).sum())}")
    timings = []
    for nprobe in sorted(set(args.nprobe)):
        if nprobe > nlist:
            continue
        set_nprobe(ivf, nprobe)
        (scores, _), t_ivf = timed(search_head_queries, ivf, head, vectors, TOPK)
        timings.append((nprobe, tie_aware_recall(scores, exact[:, -1]), t_ivf))
    # The flat search again, after the sweep: on a shared machine one timing can catch a
    # busy moment, so the ratios use the faster of the two (never in the IVF's favour).
    _, t_flat_after = timed(search_head_queries, flat, head, vectors, TOPK)
    del flat
    t_flat = min(t_flat, t_flat_after)
    print(f"flat IndexPQ again after the sweep: {nq / t_flat_after:.1f} queries/s; the ratios "
          f"use the faster, {nq / t_flat:.1f} queries/s")
    print("| nprobe | recall@10 | queries/s | vs flat | vs search_adc |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for nprobe, recall, t_ivf in timings:
        qps = nq / t_ivf
        rows.append((nprobe, recall, t_flat / t_ivf))
        print(f"| {nprobe} | {recall:.4f} | {qps:.1f} | {t_flat / t_ivf:.1f}x | "
              f"{qps / (nadc / t_adc):.1f}x |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.2f} GiB; faiss threads {faiss.omp_get_max_threads()}; "
          f"{time.perf_counter() - t_start:.0f}s in all")
    good = [row for row in rows if row[1] >= args.target_recall]
    nprobe, recall, speed = good[0] if good else rows[-1]
    print(f"ivf: N={args.n} nlist={nlist} nprobe={nprobe} recall@10={recall:.4f} "
          f"speed-up vs flat={speed:.1f}x")


if __name__ == "__main__":
    main()
