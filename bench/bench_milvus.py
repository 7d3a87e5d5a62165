"""Milvus Lite against our ADC engine and faiss's flat index, on one gallery of real images.

The gallery is Fashion-MNIST's 60,000 training images and their 60,000 mirror images (120,000
items by default, ``--n`` fewer); the queries are ``--queries`` of its test images. A model
trained on the Fashion-MNIST identity set (``bench/fashion_set.py``; ``--load``, or trained
here: 36 bits = 6x64, width 16, ``--epochs`` with the cosine schedule) encodes them once. Each
engine then runs in its own process, on the same codes and query tables:

* ``adc``: :func:`utils.retrieval.adc.search_adc` over the codes in memory (no build);
* ``faiss``: the flat faiss index of the head's codes (``IndexPQ``;
  :func:`utils.retrieval.faiss_index.build_head_index`);
* ``milvus``: :class:`utils.retrieval.milvus_gallery.MilvusGallery` in a Milvus Lite file
  (insert, flush and index build, then the search).

For each: build seconds, queries per second (top-10, batches of 256 queries), the process's
peak RSS and its rise above the RSS once the codes were loaded, and the largest difference
between its top-10 scores and the ADC engine's. The last lines print Milvus's ratios against
the two others. Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (a bench dependency
only).

Usage: ``python -m bench.bench_milvus [--n 120000] [--queries 200] [--load CKPT]
[--epochs 5] [--data-dir data]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


from bench.bench_ivf import timed, training_state  # noqa: E402
from bench.fashion_set import DEBIAN_FOLDER, load_split, write_fashion  # noqa: E402

TOPK = 10
QUERY_BATCH = 256
MODEL_NAME = "bench_milvus_fashion_36bits_{epochs}ep.tar"
ENGINES = ("adc", "faiss", "milvus")


def trained_model(args: argparse.Namespace) -> Path:
    """``--load``, else a 36-bit model trained here on the Fashion-MNIST identity set."""
    if args.load:
        return Path(args.load)
    path = Path("checkpoint") / MODEL_NAME.format(epochs=args.epochs)
    state = training_state(path, args.epochs)
    if state == "done":
        return path
    if not list((Path(args.data_dir) / "fashion").glob(".complete_*")):  # any complete split
        write_fashion(args.data_dir, source=args.source)
    import opqn_main

    argv = ["--dataset", "fashion", "--data-dir", args.data_dir, "--len", "36", "--num", "6",
            "--words", "64", "--width", "16", "--epochs", str(args.epochs), "--schedule",
            "cosine", "--eval-every", "0", "--save", path.name, "--no-progress",
            "--resume" if state == "resume" else "--overwrite"]
    if opqn_main.main(argv) != 0:
        raise SystemExit("training the Fashion-MNIST model failed")
    return path


def as_images(pixels: np.ndarray, mirror: bool = False) -> list[Image.Image]:
    """28x28 grey arrays as the RGB PIL images the identity set stores (35x35)."""
    out = []
    for array in pixels:
        image = Image.fromarray(array).resize((35, 35), Image.BICUBIC).convert("RGB")
        out.append(ImageOps.mirror(image) if mirror else image)
    return out


def encode(args: argparse.Namespace, folder: Path) -> str:
    """Codes ``(N, M)``, query tables ``(Q, M, K)`` and faiss query vectors, saved in
    ``folder``; returns the model's path."""
    from tqdm import tqdm

    from utils.checkpoints.loading import load_model
    from utils.checkpoints.store import load_checkpoint
    from utils.retrieval.inference import encode_images

    model_file = trained_model(args)
    model = load_model(load_checkpoint(model_file), torch.device("cpu"))
    train, _ = load_split(args.source, "train")
    test, _ = load_split(args.source, "test")
    half = (args.n + 1) // 2
    chunks = [(train[s:s + 5000], mirror) for mirror in (False, True)
              for s in range(0, min(half, len(train)), 5000)]
    codes = []
    for pixels, mirror in tqdm(chunks, desc="encode gallery", disable=args.no_progress):
        codes.append(encode_images(model, as_images(pixels, mirror)).codes)
    codes = torch.cat(codes)[: args.n]
    queries = encode_images(model, as_images(test[: args.queries]))
    from utils.retrieval.adc import search_adc

    torch.save({"codes": codes, "tables": queries.tables,
                "vectors": model.quantizer.faiss_queries(queries.features),
                "reference": search_adc(queries.tables, codes, TOPK)[0]},
               folder / "data.pt")
    return str(model_file)


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(engine: str, folder: Path, model_file: str) -> None:
    """One engine: build, search, report (JSON on stdout)."""
    from utils.checkpoints.loading import load_model
    from utils.checkpoints.store import load_checkpoint
    from utils.retrieval.adc import search_adc

    data = torch.load(folder / "data.pt", weights_only=True)  # tensors only
    codes, tables = data["codes"], data["tables"]
    head = load_model(load_checkpoint(model_file), torch.device("cpu")).quantizer
    start_rss = rss_mib()
    if engine == "adc":
        t_build = 0.0

        def search(lo, hi):
            return search_adc(tables[lo:hi], codes, TOPK)[0]
    elif engine == "faiss":
        from utils.retrieval.faiss_index import build_head_index, search_head_queries

        index, t_build = timed(build_head_index, head, codes)

        def search(lo, hi):
            return search_head_queries(index, head, data["vectors"][lo:hi], TOPK)[0]
    else:
        from utils.retrieval.milvus_gallery import MilvusGallery, MilvusModel

        def build():
            store = MilvusGallery.open(str(folder / "bench.db"), "bench", MilvusModel(
                "0" * 64, "opqn", codes.shape[1], tables.shape[2], model_file), timeout=3600)
            store.add([f"/gallery/{i:07d}.png" for i in range(codes.shape[0])],
                      [None] * codes.shape[0], codes)
            return store

        store, t_build = timed(build)

        def search(lo, hi):
            return store.search(tables[lo:hi], TOPK)[0]
    nq = tables.shape[0]
    t0 = time.perf_counter()
    scores = torch.cat([search(lo, min(lo + QUERY_BATCH, nq)) for lo in range(0, nq, QUERY_BATCH)])
    t_search = time.perf_counter() - t0
    print(json.dumps({"engine": engine, "build_s": t_build, "qps": nq / t_search,
                      "start_rss_mib": start_rss,
                      "score_gap": float((scores - data["reference"]).abs().max())}))


def run_worker(engine: str, folder: Path, model_file: str) -> dict:
    """The engine in a fresh process; adds its peak RSS (from wait4)."""
    proc = subprocess.Popen([sys.executable, __file__, "--worker", engine, "--folder",
                             str(folder), "--load", model_file], stdout=subprocess.PIPE,
                            text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the {engine} worker failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=120_000, help="gallery items (at most 120,000)")
    p.add_argument("--queries", type=int, default=200, help="query images (test split)")
    p.add_argument("--load", help="a trained checkpoint (default: checkpoint/"
                   f"{MODEL_NAME.format(epochs='<epochs>')}, trained first if absent)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--source", type=Path, default=DEBIAN_FOLDER)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.folder, args.load)
        return
    if not 1 <= args.n <= 120_000 or args.queries < 1:
        p.error("--n must be in 1..120000 and --queries positive")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_milvus_") as tmp:
        folder = Path(tmp)
        model_file, t_encode = timed(encode, args, folder)
        print(f"model {model_file}; gallery N={args.n} (Fashion-MNIST train and mirrored), "
              f"{args.queries} queries, top-{TOPK}; encoded in {t_encode:.0f}s; "
              f"torch threads {torch.get_num_threads()}")
        results = {engine: run_worker(engine, folder, model_file) for engine in ENGINES}
    print("| engine | build s | queries/s | peak RSS MiB | RSS rise MiB | top-10 score gap |")
    print("| --- | --- | --- | --- | --- | --- |")
    for engine, r in results.items():
        print(f"| {engine} | {r['build_s']:.1f} | {r['qps']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] - r['start_rss_mib']:.0f} | {r['score_gap']:.1e} |")
    milvus = results["milvus"]
    for other in ("adc", "faiss"):
        r = results[other]
        build = (f"{milvus['build_s'] / r['build_s']:.1f}x the build time, "
                 if r["build_s"] > 0 else "")
        rate = milvus["qps"] / r["qps"]
        print(f"milvus-lite vs {other}: {build}{rate:.2g}x the query rate (1/{1 / rate:.0f}), "
              f"{milvus['peak_rss_mib'] / r['peak_rss_mib']:.2f}x the peak RSS")
    print(f"{time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()
