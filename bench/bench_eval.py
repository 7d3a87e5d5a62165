"""Benchmark of the retrieval evaluation engine (utils.retrieval) on synthetic OPQN-like codes.

Prints, in one run:
  1. the authors' per-query loop (score, full sort, AP from hit positions) vs ``evaluate_adc``
     on Q queries x N codes: times, speed-up and mAPs (ties="stable" for the identical-number
     comparison, plus the tie-aware expected mAP);
  2. ``search_adc`` vs a faiss ``IndexPQ`` (inner product, codewords as centroids) top-100;
  3. peak RSS of a subprocess that evaluates 1,000 queries against 1,000,000 codes.

Usage: ``python bench/bench_eval.py [--quick] [--device cpu|cuda]``
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils.retrieval import evaluate_adc, search_adc  # noqa: E402


def clustered_data(n: int, q: int, m: int = 6, k: int = 64, classes: int = 1000, seed: int = 0, device="cpu"):
    """Codes and query tables shaped like a trained model's.

    Each class has a home code; 80% of its items keep it, the rest change 1 or 2 books.  Query
    tables are softmax probabilities peaked (with noise) at the home codeword of the query's
    class.  Returns ``tables (q, m, k) float32, codes (n, m) uint8, query_labels, db_labels``.
    """
    g = torch.Generator().manual_seed(seed)
    home = torch.randint(0, k, (classes, m), generator=g)
    db_labels = torch.randperm(n, generator=g) % classes
    codes = home[db_labels]
    perturb = torch.rand(n, generator=g) < 0.2
    for _ in range(2):
        book = torch.randint(0, m, (n,), generator=g)
        word = torch.randint(0, k, (n,), generator=g)
        rows = perturb.nonzero().flatten()
        codes[rows, book[rows]] = word[rows]
        perturb &= torch.rand(n, generator=g) < 0.5  # about half of them change a second book
    query_labels = torch.randint(0, classes, (q,), generator=g)
    logits = 1.5 * torch.randn(q, m, k, generator=g)
    logits.scatter_add_(2, home[query_labels].unsqueeze(2), torch.full((q, m, 1), 3.5))
    tables = F.softmax(logits, dim=2)
    return tables.to(device), codes.to(torch.uint8).to(device), query_labels.to(device), db_labels.to(device)


def baseline_map(tables, codes, query_labels, db_labels, k: int):
    """The authors' evaluation: per query, look up and sum the book scores for every item,
    sort the whole database (stable, so ties follow the index), AP from the hit positions."""
    m = codes.shape[1]
    index_table = codes.long().t()
    aps, tops = [], []
    for j in range(tables.shape[0]):
        per_book = [F.embedding(index_table[b].view(-1, 1), tables[j, b].view(-1, 1)).squeeze(2) for b in range(m)]
        dist = torch.cat(per_book, dim=1).sum(dim=1)
        _, order = torch.sort(dist, descending=True, stable=True)
        correct = (query_labels[j] == db_labels[order]).float()
        nrel = int(correct.sum().item())
        if nrel == 0:
            continue
        ns = torch.arange(1, nrel + 1, dtype=torch.float32, device=tables.device)
        hits = (torch.nonzero(correct, as_tuple=False) + 1)[:, 0].float()
        aps.append(torch.mean(ns / hits).item())
        tops.append(correct[:k].sum().item() / k)
    return sum(aps) / len(aps), sum(tops) / len(tops)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Wall time of ``fn()`` (CPU time of this process is recorded in ``LAST_CPU``)."""
    global LAST_CPU
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    LAST_CPU = time.process_time() - c0
    return time.perf_counter() - t0, out


LAST_CPU = 0.0


def bench_eval(n, q, k, device):
    tables, codes, ql, dl = clustered_data(n, q, device=device)
    uniq = torch.unique(codes.long(), dim=0).shape[0]
    print(f"[eval] N={n:,} Q={q:,} M=6 K=64, {uniq:,} distinct codes, device={device}")
    # Warm-up on a small slice so that one-off library start-up is not timed for either side.
    evaluate_adc(tables[:4], codes, ql[:4], dl, k=k, ties="stable")
    baseline_map(tables[:2], codes, ql[:2], dl, k)
    t_base, (map_base, p_base) = timed(lambda: baseline_map(tables, codes, ql, dl, k), device)
    c_base = LAST_CPU
    t_st, res_st = timed(lambda: evaluate_adc(tables, codes, ql, dl, k=k, ties="stable"), device)
    c_st = LAST_CPU
    t_ex, res_ex = timed(lambda: evaluate_adc(tables, codes, ql, dl, k=k, ties="expected"), device)
    c_ex = LAST_CPU
    print(f"  (wall time; process CPU time in brackets; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"  baseline per-query loop : {t_base:8.3f} s [{c_base:7.2f}]  mAP={map_base:.6f}  P@{k}={p_base:.6f}")
    print(f"  evaluate_adc stable     : {t_st:8.3f} s [{c_st:7.2f}]  mAP={res_st['mAP']:.6f}  "
          f"P@{k}={res_st['precision_at_k']:.6f}  speed-up x{t_base / t_st:.1f}")
    print(f"  evaluate_adc expected   : {t_ex:8.3f} s [{c_ex:7.2f}]  mAP={res_ex['mAP']:.6f}  "
          f"P@{k}={res_ex['precision_at_k']:.6f}  speed-up x{t_base / t_ex:.1f}")
    print(f"  |mAP stable - baseline| = {abs(res_st['mAP'] - map_base):.2e}   "
          f"|P@k stable - baseline| = {abs(res_st['precision_at_k'] - p_base):.2e}")
    return tables, codes


def bench_search(tables, codes, topk, device):
    try:
        import faiss  # noqa: F401
        from utils.faiss_index import build_faiss_index, soft_quantized_queries
    except ImportError:
        print("[search] faiss not installed: skipped")
        return
    m, kw = tables.shape[1], tables.shape[2]
    g = torch.Generator().manual_seed(1)
    codebooks = torch.linalg.qr(torch.randn(m, kw, kw, generator=g)).Q  # orthonormal, d = K
    index = build_faiss_index(codebooks, codes.cpu())
    x = soft_quantized_queries(tables.cpu(), codebooks).numpy()
    index.search(x[:2], topk)
    search_adc(tables[:2], codes, topk)
    t_f, (dist, ids) = timed(lambda: index.search(x, topk), torch.device("cpu"))
    t_o, (s, i) = timed(lambda: search_adc(tables, codes, topk), device)
    max_diff = (torch.from_numpy(dist) - s.cpu()).abs().max().item()
    print(f"[search] top-{topk}, Q={tables.shape[0]:,} N={codes.shape[0]:,} (faiss threads={faiss.omp_get_max_threads()},"
          f" torch threads={torch.get_num_threads()})")
    print(f"  faiss IndexPQ search    : {t_f:8.3f} s")
    print(f"  search_adc              : {t_o:8.3f} s  ratio faiss/ours x{t_f / t_o:.1f}   max |score diff| {max_diff:.1e}")


def rss_child(n, q):
    """Runs in a subprocess: evaluate q queries against n codes and report memory."""
    tables, codes, ql, dl = clustered_data(n, q)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = evaluate_adc(tables, codes, ql, dl, k=5, ties="expected")
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_before_mb": before / 1024, "rss_peak_mb": after / 1024, "seconds": dt, "mAP": res["mAP"]}))


def bench_rss(n, q):
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", str(n), str(q)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    info = json.loads(out)
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"[memory] evaluate_adc (expected) Q={q:,} vs N={n:,} in a subprocess: {info['seconds']:.2f} s, "
          f"mAP={info['mAP']:.6f}")
    print(f"  RSS after data generation {info['rss_before_mb']:.0f} MB, peak {peak_children:.0f} MB "
          f"(ru_maxrss of children; limit 2048 MB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (N=20k, Q=200; memory test N=200k)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch/faiss CPU threads (default: library default)")
    ap.add_argument("--rss-child", nargs=2, type=int, metavar=("N", "Q"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    device = torch.device(args.device)
    n, q, n_big = (20_000, 200, 200_000) if args.quick else (100_000, 1_000, 1_000_000)
    tables, codes = bench_eval(n, q, args.k, device)
    bench_search(tables, codes, args.topk, device)
    bench_rss(n_big, 1_000)


if __name__ == "__main__":
    main()
