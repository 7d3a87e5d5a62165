"""Benchmark of the retrieval evaluation engine (utils.retrieval.adc) on synthetic OPQN-like codes.

Prints, in one run (ratios measured in the same run, so that machine load hits both sides):
  1. ``evaluate_adc`` (both tie modes) vs the authors' per-query algorithm (score, full sort,
     AP from hit positions) on Q queries x N items, M=6, K=64, for three rows made by one
     generator: 95% of books keep their class's word, 70% keep it, and random codes;
     times, speed-ups, mAP and P@k of both sides;
  2. a VGGFace2-scale projection: a sample of queries against 709,662 random 8x256 codes,
     extrapolated to 139,350 queries, for ``evaluate_adc`` and the per-query algorithm;
  3. ``search_adc`` vs a faiss ``IndexPQ`` (inner product, codewords as centroids) top-100;
  4. peak RSS of a subprocess that encodes a synthetic 1,000,000-item gallery batch by batch
     (``utils.retrieval.encoding.encode_gallery``), encodes 1,000 queries and evaluates them.

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

from utils.retrieval.adc import evaluate_adc, search_adc  # noqa: E402


def class_codes(n: int, q: int, keep: float, m: int = 6, k: int = 64, classes: int = 1000,
                seed: int = 0, device="cpu"):
    """Codes and query tables shaped like a trained model's, from one generator.

    Each class has a home code; every book of an item keeps its class's word with
    probability ``keep`` and takes a random word otherwise (``keep=0``: random codes).  Query
    tables are softmax probabilities peaked (with noise) at the home codeword of the query's
    class.  Returns ``tables (q, m, k) float32, codes (n, m) uint8, query_labels, db_labels``.
    """
    g = torch.Generator().manual_seed(seed)
    home = torch.randint(0, k, (classes, m), generator=g)
    db_labels = torch.randperm(n, generator=g) % classes
    random_words = torch.randint(0, k, (n, m), generator=g)
    kept = torch.rand(n, m, generator=g) < keep
    codes = torch.where(kept, home[db_labels], random_words)
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


ROWS = (("95% of books keep a class's word", 0.95), ("70% keep it", 0.70), ("random codes", 0.0))


def bench_eval(n, q, k, device, baseline_queries):
    qb = min(q, baseline_queries) if baseline_queries else q
    print(f"[eval] Q={q:,} queries vs N={n:,} items, M=6 K=64, device={device}; the per-query "
          f"algorithm runs {qb:,} of the queries (its time is scaled to Q when fewer)")
    print(f"  {'items sharing codes':<34}{'U':>8}{'authors':>10}{'stable':>9}{'x':>6}"
          f"{'expected':>10}{'x':>6}  mAP authors / stable / expected; |dP@k|")
    for name, keep in ROWS:
        tables, codes, ql, dl = class_codes(n, q, keep, device=device)
        uniq = torch.unique(codes.long(), dim=0).shape[0]
        # Warm-up on a small slice so that one-off library start-up is not timed.
        evaluate_adc(tables[:4], codes, ql[:4], dl, k=k, ties="stable")
        baseline_map(tables[:2], codes, ql[:2], dl, k)
        t_base, (map_base, p_base) = timed(lambda: baseline_map(tables[:qb], codes, ql[:qb], dl, k), device)
        t_base *= q / qb
        t_st, res_st = timed(lambda: evaluate_adc(tables, codes, ql, dl, k=k, ties="stable"), device)
        t_ex, res_ex = timed(lambda: evaluate_adc(tables, codes, ql, dl, k=k, ties="expected"), device)
        # The identical-number check: stable ties on exactly the baseline's queries.
        sub = res_st if qb == q else evaluate_adc(tables[:qb], codes, ql[:qb], dl, k=k, ties="stable")
        print(f"  {name:<34}{uniq:>8,}{t_base:>9.2f}s{t_st:>8.2f}s{t_base / t_st:>5.1f}x"
              f"{t_ex:>9.2f}s{t_base / t_ex:>5.1f}x  {map_base:.6f} / {sub['mAP']:.6f} / "
              f"{res_ex['mAP']:.6f}; {abs(sub['precision_at_k'] - p_base):.1e}", flush=True)
    print(f"  (wall time; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return tables, codes


def bench_vggface2(device, sample_queries, baseline_queries):
    """evaluate_adc on a sample of queries against VGGFace2's gallery size at 8x256."""
    n, q_full, m, k, classes = 709_662, 139_350, 8, 256, 2_787
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, k, (n, m), generator=g).to(torch.uint8).to(device)
    dl = (torch.randperm(n, generator=g) % classes).to(device)
    ql = torch.randint(0, classes, (sample_queries,), generator=g).to(device)
    tables = F.softmax(2.0 * torch.randn(sample_queries, m, k, generator=g), 2).to(device)
    print(f"[vggface2 scale] {sample_queries} queries vs {n:,} random 8x256 codes, "
          f"extrapolated to {q_full:,} queries (device={device})")
    for ties in ("expected", "stable"):
        # One-off work (grouping 709k codes, label index) is timed apart from the per-query
        # cost: a 1-query run, then the sample; projection = one-off + per-query x Q.
        t1, _ = timed(lambda: evaluate_adc(tables[:1], codes, ql[:1], dl, k=10, ties=ties), device)
        t, res = timed(lambda: evaluate_adc(tables, codes, ql, dl, k=10, ties=ties), device)
        per_query = max(t - t1, 0.0) / max(sample_queries - 1, 1)
        total = t1 + per_query * (q_full - 1)
        print(f"  evaluate_adc {ties:<8}: {t:7.2f} s for {sample_queries} (one-off {t1:.2f} s, "
              f"{1000 * per_query:.1f} ms/query) -> {total / 60:7.1f} min projected", flush=True)
    t, _ = timed(lambda: baseline_map(tables[:baseline_queries], codes, ql[:baseline_queries], dl, 10), device)
    print(f"  per-query algorithm  : {t:7.2f} s for {baseline_queries} -> "
          f"{t * q_full / baseline_queries / 3600:7.1f} h projected", flush=True)


def bench_search(tables, codes, topk, device):
    try:
        import faiss  # noqa: F401
        from utils.retrieval.faiss_index import build_faiss_index, soft_quantized_queries
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


class _FeatureLoader:
    """Batches of random 'images' that an identity backbone turns into features: the
    gallery is never held as features, only generated one batch at a time."""

    def __init__(self, n: int, dim: int, classes: int, batch: int, seed: int) -> None:
        self.n, self.dim, self.classes, self.batch, self.seed = n, dim, classes, batch, seed
        self.dataset = None

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __iter__(self):
        from data.datasets import Batch

        g = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.n, self.batch):
            size = min(self.batch, self.n - start)
            labels = torch.randint(0, self.classes, (size,), generator=g)
            yield Batch(torch.randn(size, self.dim, generator=g), labels, [])


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited from
    the parent across fork + exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(n, q):
    """Runs in a subprocess: encode an n-item gallery and q queries batch by batch through
    utils.retrieval.encoding (identity backbone, real OPQN head), evaluate, report memory."""
    from models import OPQN, OPQNConfig
    from utils.retrieval.encoding import encode_gallery, encode_queries

    config = OPQNConfig(num_books=6, num_words=64, feature_dim=516, num_classes=1000)
    model = OPQN(config)
    model.backbone = torch.nn.Identity()  # features stand in for images
    cpu = torch.device("cpu")
    before = _peak_rss_mb()
    t0 = time.perf_counter()
    codes, dl = encode_gallery(model, _FeatureLoader(n, 516, 1000, 4096, 0), cpu, progress=False)
    tables, ql = encode_queries(model, _FeatureLoader(q, 516, 1000, 4096, 1), cpu, progress=False)
    t1 = time.perf_counter()
    res = evaluate_adc(tables, codes, ql, dl, k=5, ties="expected")
    dt = time.perf_counter() - t1
    after = _peak_rss_mb()
    print(json.dumps({"rss_before_mb": before, "rss_peak_mb": after,
                      "encode_seconds": t1 - t0, "seconds": dt, "mAP": res["mAP"],
                      "codes_mb": codes.numel() * codes.element_size() / 2**20}))


def bench_rss(n, q):
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", str(n), str(q)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    info = json.loads(out)
    print(f"[memory] encode_gallery of N={n:,} items (D=516, 6x64) batch by batch + {q:,} queries"
          f" + evaluate_adc, in a subprocess: encode {info['encode_seconds']:.1f} s, evaluate "
          f"{info['seconds']:.2f} s")
    print(f"  RSS after start-up {info['rss_before_mb']:.0f} MB, peak {info['rss_peak_mb']:.0f} MB;"
          f" codes {info['codes_mb']:.1f} MB (the N x D float32 features would be "
          f"{n * 516 * 4 / 2**30:.1f} GB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (N=20k, Q=200; memory test N=200k)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch/faiss CPU threads (default: library default)")
    ap.add_argument("--baseline-queries", type=int, default=0,
                    help="run the per-query algorithm on this many queries only, scaling its "
                         "time to Q (default: all)")
    ap.add_argument("--vgg-queries", type=int, default=256, help="sample of the VGGFace2 projection")
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
    bench_rss(n_big, 1_000)  # first, while this process is small
    tables, codes = bench_eval(n, q, args.k, device, args.baseline_queries)
    bench_vggface2(device, 16 if args.quick else args.vgg_queries, 2 if args.quick else 8)
    bench_search(tables, codes, args.topk, device)


if __name__ == "__main__":
    main()
