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
     (``utils.retrieval.encoding.encode_gallery``), encodes 250 queries and evaluates them.

Ratios hold only when both sides run under the same conditions, so the bench fixes them and
prints them: both sides use the same explicit number of CPU threads (``--threads``, default
1), both are warmed up, both are timed ``--repeats`` times in interleaved rounds (baseline,
stable, expected, then again) and every ratio is a ratio of medians of this run.  With one
thread the times are this process's CPU seconds (the time its only thread spent on a core,
which other processes' load does not stretch; the wall-time ratios are printed beside them),
otherwise wall seconds.  A header
names the CPU, the torch / faiss thread counts and the load average; each timed section
reports how many cores other processes kept busy meanwhile (from ``/proc/stat``), and a
warning is printed when the load exceeds the core count.

Why one thread by default: the per-query algorithm is a chain of small tensor ops (six
look-ups, a concatenation, a sum, a sort, a gather, a comparison ... per query on ~100k
elements).  With two or more torch threads each op is an OpenMP parallel region that ends in a
barrier; when another process holds a core, every barrier waits for a descheduled thread, so
the baseline slows down many times more than ``evaluate_adc`` (which runs independent query
blocks in Python threads, one torch thread each, without barriers).  Speed-ups measured with
the library's default threads on a loaded machine are therefore inflated by the load, not by
the engine.  With one thread neither side has barriers, and its CPU time does not count the
moments a busy core made it wait.

Usage: ``python -m bench.bench_eval [--quick] [--device cpu|cuda] [--threads T] [--repeats R]
[--baseline-queries B]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from functools import partial
from statistics import median


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
    """``(wall seconds, CPU seconds of this process over all its threads, fn())``."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def spread(values):
    """max / min of the repeats (1.00 = identical)."""
    return max(values) / max(min(values), 1e-12)


# --------------------------------------------------------------------------------------
# The machine: CPU, threads, load
# --------------------------------------------------------------------------------------


def cpu_description() -> str:
    """CPU model name, usable cores, whether it is a virtual machine, and its wide SIMD sets."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    vm = ", virtual machine" if "hypervisor" in flags else ""
    return (f"{model} ({usable} usable of {os.cpu_count()} cores{vm}; "
            f"{' '.join(simd) if simd else 'no AVX2'})")


def _faiss_threads():
    try:
        import faiss
    except ImportError:
        return None
    return faiss.omp_get_max_threads()


def _machine_seconds():
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat; None
    where it cannot be read.  Busy = user + nice + system + irq + softirq (guest time is
    already inside user); steal = time the hypervisor gave to other guests."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    fields += [0] * (8 - len(fields))
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy / tick, fields[7] / tick


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMeter:
    """Cores kept busy by other processes while a section runs (not the load average, which
    lags by a minute and counts this bench too)."""

    def __init__(self) -> None:
        self.t0, self.own0, self.machine0 = time.perf_counter(), _own_seconds(), _machine_seconds()

    def others(self):
        """(busy cores of other processes, stolen cores), or None."""
        now = _machine_seconds()
        if now is None or self.machine0 is None:
            return None
        wall = max(time.perf_counter() - self.t0, 1e-9)
        own = _own_seconds() - self.own0
        busy = max(now[0] - self.machine0[0] - own, 0.0) / wall
        return busy, max(now[1] - self.machine0[1], 0.0) / wall

    def report(self, threads: int) -> str:
        got = self.others()
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0]
        if got is None:
            text = f"  (load average {load:.1f} on {cores} cores)"
        else:
            busy, steal = got
            text = (f"  (meanwhile other processes kept {busy:.2f} of {cores} cores busy"
                    f"{f', {steal:.2f} stolen by the hypervisor' if steal >= 0.05 else ''}; "
                    f"load average {load:.1f})")
            if busy + steal + threads > cores + 0.25:
                text += (f"\n  WARNING: {threads} bench thread(s) + {busy + steal:.1f} busy cores of "
                         f"others exceed the {cores} cores: wall times are stretched"
                         + (" (CPU times at one thread much less so)" if threads == 1 else
                            "; with several threads the per-query algorithm's barriers make its "
                            "speed-ups inflated: use --threads 1"))
        return text


def _load_warning(load: float, cores: int, why: str = "") -> str:
    return f"\n  WARNING: load average above the {cores} cores{why}" if load > cores else ""


def print_machine(requested: int, device) -> None:
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = "?"
    faiss_threads = _faiss_threads()
    print(f"[machine] CPU: {cpu_description()}")
    print(f"  torch {torch.__version__} (kernels {capability}), device {device}; threads: torch "
          f"{torch.get_num_threads()} intra-op (both sides), faiss "
          f"{'not installed' if faiss_threads is None else faiss_threads}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; --threads {requested}"
          + (" (the libraries' defaults)" if requested <= 0 else ""))
    print(f"  load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"
          + _load_warning(load[0], cores, ": other jobs share this machine"), flush=True)


def print_load_end(start: float) -> None:
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    print(f"[machine] load average at end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; whole run "
          f"{time.perf_counter() - start:.0f} s"
          + _load_warning(load[0], cores))


ROWS = (("95% of books keep a class's word", 0.95), ("70% keep it", 0.70), ("random codes", 0.0))


def use_cpu_clock(threads: int, device) -> bool:
    """Whether speed-ups are taken from CPU time: only with one CPU thread, where the CPU time
    of this process is the time its single thread spent on a core, which other processes'
    load does not stretch (wall time is stretched by every moment the thread waits for a core).
    With more threads, CPU time would count OpenMP spin-waiting, and on a GPU the work is not
    on the CPU: wall time then."""
    return threads == 1 and device.type == "cpu"


def clock_name(cpu_clock: bool) -> str:
    return "CPU seconds of the one bench thread" if cpu_clock else "wall seconds"


def bench_eval(n, q, k, device, baseline_queries, repeats, threads):
    qb = min(q, baseline_queries) if baseline_queries else q
    cpu_clock = use_cpu_clock(threads, device)
    clock = clock_name(cpu_clock)
    print(f"[eval] Q={q:,} queries vs N={n:,} items, M=6 K=64, device={device}; the per-query "
          f"algorithm runs {qb:,} of the queries per repeat (its time is scaled to Q when fewer)")
    print(f"  times: medians of {repeats} interleaved repeats of each side, in {clock}; "
          f"spread = max/min of the repeats (authors / stable / expected)")
    print(f"  {'items sharing codes':<34}{'U':>8}{'authors':>10}{'stable':>9}{'x':>7}"
          f"{'expected':>10}{'x':>7}  mAP authors / stable / expected; |dP@k|; spread")
    meter = LoadMeter()
    other_lines = []
    for name, keep in ROWS:
        tables, codes, ql, dl = class_codes(n, q, keep, device=device)
        uniq = torch.unique(codes.long(), dim=0).shape[0]
        # Warm-up of both sides on the full database (library start-up, allocator growth).
        for ties in ("stable", "expected"):
            evaluate_adc(tables[:4], codes, ql[:4], dl, k=k, ties=ties)
        baseline_map(tables[:2], codes, ql[:2], dl, k)
        wall = {"base": [], "stable": [], "expected": []}
        cpu = {"base": [], "stable": [], "expected": []}
        res = {}
        for _ in range(repeats):  # interleaved, so that a change of load hits every side
            w, c, (map_base, p_base) = timed(
                partial(baseline_map, tables[:qb], codes, ql[:qb], dl, k), device)
            wall["base"].append(w * q / qb)
            cpu["base"].append(c * q / qb)
            for ties in ("stable", "expected"):
                w, c, res[ties] = timed(partial(evaluate_adc, tables, codes, ql, dl, k=k, ties=ties), device)
                wall[ties].append(w)
                cpu[ties].append(c)
        main_t, other_t = (cpu, wall) if cpu_clock else (wall, cpu)
        med = {side: median(v) for side, v in main_t.items()}
        omed = {side: median(v) for side, v in other_t.items()}
        # The identical-number check: stable ties on exactly the baseline's queries.
        sub = res["stable"] if qb == q else evaluate_adc(tables[:qb], codes, ql[:qb], dl, k=k, ties="stable")
        print(f"  {name:<34}{uniq:>8,}{med['base']:>9.2f}s{med['stable']:>8.2f}s"
              f"{med['base'] / med['stable']:>6.1f}x{med['expected']:>9.2f}s"
              f"{med['base'] / med['expected']:>6.1f}x  {map_base:.6f} / {sub['mAP']:.6f} / "
              f"{res['expected']['mAP']:.6f}; {abs(sub['precision_at_k'] - p_base):.1e}; "
              f"{spread(main_t['base']):.2f}/{spread(main_t['stable']):.2f}/"
              f"{spread(main_t['expected']):.2f}", flush=True)
        other_lines.append(f"{omed['base'] / omed['stable']:.1f}x / {omed['base'] / omed['expected']:.1f}x")
    print(f"  speed-ups from {'wall' if cpu_clock else 'CPU'} time instead (stable / expected, rows "
          f"in order): {'; '.join(other_lines)}"
          + ("" if cpu_clock else " (CPU time counts every thread, spin-waits included)"))
    print(meter.report(threads))
    return tables, codes


def bench_vggface2(device, sample_queries, baseline_queries, repeats, threads):
    """evaluate_adc on a sample of queries against VGGFace2's gallery size at 8x256."""
    n, q_full, m, k, classes = 709_662, 139_350, 8, 256, 2_787
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, k, (n, m), generator=g).to(torch.uint8).to(device)
    dl = (torch.randperm(n, generator=g) % classes).to(device)
    ql = torch.randint(0, classes, (sample_queries,), generator=g).to(device)
    tables = F.softmax(2.0 * torch.randn(sample_queries, m, k, generator=g), 2).to(device)
    cpu_clock = use_cpu_clock(threads, device)
    pick = 1 if cpu_clock else 0  # timed() gives (wall, cpu, out)
    print(f"[vggface2 scale] {sample_queries} queries vs {n:,} random 8x256 codes, "
          f"extrapolated to {q_full:,} queries (device={device}); medians of {repeats} "
          f"interleaved repeats, in {clock_name(cpu_clock)}")
    meter = LoadMeter()
    baseline_map(tables[:1], codes, ql[:1], dl, 10)  # warm-up
    evaluate_adc(tables[:1], codes, ql[:1], dl, k=10, ties="expected")
    one, sample, base = {"expected": [], "stable": []}, {"expected": [], "stable": []}, []
    for _ in range(repeats):
        for ties in ("expected", "stable"):
            # One-off work (grouping 709k codes, label index) is timed apart from the
            # per-query cost: a 1-query run, then the sample; projection = one-off +
            # per-query x Q.
            t1 = timed(partial(evaluate_adc, tables[:1], codes, ql[:1], dl, k=10, ties=ties), device)[pick]
            t = timed(partial(evaluate_adc, tables, codes, ql, dl, k=10, ties=ties), device)[pick]
            one[ties].append(t1)
            sample[ties].append(t)
        t = timed(partial(baseline_map, tables[:baseline_queries], codes, ql[:baseline_queries], dl, 10),
                  device)[pick]
        base.append(t / baseline_queries)
    totals = {}
    for ties in ("expected", "stable"):
        t1, t = median(one[ties]), median(sample[ties])
        per_query = max(t - t1, 0.0) / max(sample_queries - 1, 1)
        totals[ties] = t1 + per_query * (q_full - 1)
        print(f"  evaluate_adc {ties:<8}: {t:7.2f} s for {sample_queries} (one-off {t1:.2f} s, "
              f"{1000 * per_query:.1f} ms/query; spread {spread(sample[ties]):.2f}) -> "
              f"{totals[ties] / 60:7.1f} min projected", flush=True)
    per_base = median(base)
    print(f"  per-query algorithm  : {per_base * baseline_queries:7.2f} s for {baseline_queries} "
          f"({1000 * per_base:.0f} ms/query; spread {spread(base):.2f}) -> "
          f"{per_base * q_full / 3600:7.1f} h projected; speed-up "
          f"{per_base * q_full / totals['expected']:.1f}x expected, "
          f"{per_base * q_full / totals['stable']:.1f}x stable", flush=True)
    print(meter.report(threads))


def bench_search(tables, codes, topk, device, repeats, threads):
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
    cpu_clock = use_cpu_clock(threads, device)
    pick = 1 if cpu_clock else 0
    meter = LoadMeter()
    t_fs, t_os = [], []
    for _ in range(repeats):
        got_f = timed(lambda: index.search(x, topk), torch.device("cpu"))
        got_o = timed(lambda: search_adc(tables, codes, topk), device)
        t_fs.append(got_f[pick])
        t_os.append(got_o[pick])
    (dist, _ids), (s, _i) = got_f[2], got_o[2]
    t_f, t_o = median(t_fs), median(t_os)
    max_diff = (torch.from_numpy(dist) - s.cpu()).abs().max().item()
    print(f"[search] top-{topk}, Q={tables.shape[0]:,} N={codes.shape[0]:,} (faiss threads={faiss.omp_get_max_threads()},"
          f" torch threads={torch.get_num_threads()}); medians of {repeats}, in "
          f"{clock_name(cpu_clock)}")
    print(f"  faiss IndexPQ search    : {t_f:8.3f} s  (spread {spread(t_fs):.2f})")
    print(f"  search_adc              : {t_o:8.3f} s  (spread {spread(t_os):.2f})  ratio faiss/ours "
          f"x{t_f / t_o:.1f}   max |score diff| {max_diff:.1e}")
    print(meter.report(threads))


class _FeatureLoader:
    """Batches of random 'images' that an identity backbone turns into features: the
    gallery is never held as features, only generated one batch at a time."""

    def __init__(self, n: int, dim: int, classes: int, batch: int, seed: int) -> None:
        self.n, self.dim, self.classes, self.batch, self.seed = n, dim, classes, batch, seed
        self.dataset = None

    def __len__(self) -> int:
        return (self.n + self.batch - 1) // self.batch

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
    from models import RetrievalNet, NetConfig
    from utils.retrieval.encoding import encode_gallery, encode_queries

    config = NetConfig(num_books=6, num_words=64, feature_dim=516, num_classes=1000)
    model = RetrievalNet(config)
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


def bench_rss(n, q, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", str(n), str(q),
           "--threads", str(threads)]
    meter = LoadMeter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    info = json.loads(out)
    print(f"[memory] encode_gallery of N={n:,} items (D=516, 6x64) batch by batch + {q:,} queries"
          f" + evaluate_adc, in a subprocess (same threads): encode {info['encode_seconds']:.1f} s, "
          f"evaluate {info['seconds']:.2f} s")
    print(f"  RSS after start-up {info['rss_before_mb']:.0f} MB, peak {info['rss_peak_mb']:.0f} MB;"
          f" codes {info['codes_mb']:.1f} MB (the N x D float32 features would be "
          f"{n * 516 * 4 / 2**30:.1f} GB)")
    print(meter.report(threads), flush=True)


def set_threads(threads: int) -> int:
    """Use ``threads`` CPU threads in torch and faiss (0: the libraries' defaults); returns
    the torch thread count in force."""
    if threads > 0:
        torch.set_num_threads(threads)
        try:
            import faiss

            faiss.omp_set_num_threads(threads)
        except ImportError:
            pass
    return torch.get_num_threads()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (N=20k, Q=200; memory test N=200k)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and faiss CPU threads, the same for both sides (default: 1; 0: the "
                         "libraries' defaults, whose ratios depend on the machine's load)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed repeats of every side, interleaved; medians are reported (default: 3)")
    ap.add_argument("--baseline-queries", type=int, default=100,
                    help="run the per-query algorithm on this many queries per repeat, scaling "
                         "its time to Q (default: 100; 0: all)")
    ap.add_argument("--vgg-queries", type=int, default=64, help="sample of the VGGFace2 projection "
                    "(default: 64)")
    ap.add_argument("--rss-child", nargs=2, type=int, metavar=("N", "Q"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    threads = set_threads(args.threads)
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    start = time.perf_counter()
    device = torch.device(args.device)
    print_machine(args.threads, device)
    n, q, n_big = (20_000, 200, 200_000) if args.quick else (100_000, 1_000, 1_000_000)
    bench_rss(n_big, 250, threads)  # first, while this process is small
    tables, codes = bench_eval(n, q, args.k, device, args.baseline_queries, args.repeats, threads)
    bench_vggface2(device, 16 if args.quick else args.vgg_queries, 2 if args.quick else 8,
                   args.repeats, threads)
    bench_search(tables, codes, args.topk, device, args.repeats, threads)
    print_load_end(start)


if __name__ == "__main__":
    main()
