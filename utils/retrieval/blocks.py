"""The machinery that keeps the ADC engine memory-bounded and parallel: block sizes under a
byte budget, blocks spread over CPU threads, and the database collapsed to its distinct codes.
Shared by :func:`utils.retrieval.adc.evaluate_adc` and :func:`utils.retrieval.topk.search_adc`.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor

DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024

# Bytes of working memory per (query, code) element of a block: the score (4), its integer
# key and bucket (8 + 8), the candidate mask and gathered values (1 + 8), rounded up.
BYTES_PER_QU = 32
# Blocks never shrink below this many codes (or all codes if fewer): a small budget must not
# turn the scan into a Python loop over single codes.
MIN_BLOCK_U = 2048
# On CPU, small blocks stay in cache and avoid the page-fault cost of huge fresh
# allocations; larger blocks do not run faster.
CPU_BLOCK_ELEMS = 1 << 18
MAX_CPU_WORKERS = 16


# --------------------------------------------------------------------------------------
# Parallelism
# --------------------------------------------------------------------------------------


def cpu_threads() -> int:
    # Python threads share the GIL between ops; beyond ~16 the gain would be eaten by it.
    return max(1, min(torch.get_num_threads(), MAX_CPU_WORKERS))


def cpu_workers(device: torch.device, num_blocks: int) -> int:
    if device.type != "cpu":
        return 1
    return max(1, min(cpu_threads(), num_blocks))


def run_blocks(fn: Callable[[int], None], starts: Sequence[int], workers: int) -> None:
    """Run ``fn(start)`` for every block start.

    On CPU the blocks are spread over ``workers`` Python threads, each running its torch
    ops single-threaded.  The ops of one block are small (a cache-sized block), and torch's
    own intra-op threading would synchronise all cores after each of them; when cores are
    shared with other processes those barriers dominate the run time.  Independent blocks
    per thread scale without barriers.

    torch's thread setting leaks between threads (with the OpenMP backend a worker's
    ``set_num_threads(1)`` is seen by the caller and by threads started later), so every
    worker restores the caller's setting once all workers are done computing, and so does
    the caller.
    """
    if workers <= 1 or len(starts) <= 1:
        for start in starts:
            fn(start)
        return
    saved = torch.get_num_threads()
    tasks: "queue.SimpleQueue[int]" = queue.SimpleQueue()
    for start in starts:
        tasks.put(start)
    errors: List[BaseException] = []
    done = threading.Barrier(workers)

    def worker() -> None:
        torch.set_num_threads(1)
        try:
            while not errors:
                try:
                    start = tasks.get_nowait()
                except queue.Empty:
                    break
                fn(start)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)
        finally:
            done.wait()  # nobody computes any more: restoring cannot slow a sibling down
            torch.set_num_threads(saved)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        torch.set_num_threads(saved)
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------
# Blocks and distinct codes
# --------------------------------------------------------------------------------------


def block_sizes(
    nq: int,
    u: int,
    fixed_per_query: int,
    budget_bytes: int,
    device: torch.device,
    cpu_query_block: int,
    whole_rows: bool = False,
) -> Tuple[int, int]:
    """Queries and codes per block so that the block's working set fits ``budget_bytes``.

    Shared by :func:`evaluate_adc` and :func:`search_adc`.  ``fixed_per_query`` is the
    memory a query needs regardless of the code block (its tables, relevant pairs, items or
    top-k lists; the callers include ``M`` in it).  On CPU, blocks run in parallel threads,
    so the budget is split between them.  ``whole_rows`` prefers all ``u`` codes per block
    (a single top-k per row), paid for with fewer queries per block.  The floors (one query,
    ``MIN_BLOCK_U`` codes) win over the budget.  Returns ``(query_block, code_block)``.
    """
    if budget_bytes <= 0:
        raise ValueError("budget_bytes must be positive")
    if device.type == "cpu":
        budget_bytes = max(1, budget_bytes // cpu_threads())
        # Enough blocks to keep every thread busy.
        qb = min(cpu_query_block, max(1, -(-nq // cpu_threads())))
        elems = CPU_BLOCK_ELEMS if not whole_rows else u * qb
    else:
        qb, elems = max(1, nq), max(1, budget_bytes // BYTES_PER_QU)
    min_u = min(u, MIN_BLOCK_U) if not whole_rows else u
    qb = max(1, min(qb, budget_bytes // (fixed_per_query + BYTES_PER_QU * max(min_u, 1))))
    room = max(0, budget_bytes - qb * fixed_per_query) // (qb * BYTES_PER_QU)
    block_u = max(min(u, MIN_BLOCK_U), min(u, elems // qb, room), 1)
    return qb, block_u


@dataclass
class CodeGroups:
    """The database collapsed to its distinct codes.

    Attributes:
        codes_t: int64 ``(M, U)``, distinct codes (transposed so each book is contiguous).
        inv: int64 ``(N,)``, the distinct-code id of every item.
        cnt: int64 ``(U,)``, items per distinct code.
        by_code: int64 ``(N,)``, item indices sorted by code id, then index.
        first: int64 ``(U,)``, where each code's items start in ``by_code``.
    """

    codes_t: Tensor
    inv: Tensor
    cnt: Tensor
    by_code: Tensor
    first: Tensor

    @property
    def num_unique(self) -> int:
        return int(self.cnt.numel())


def group_codes(codes: Tensor, k: int) -> CodeGroups:
    """Distinct codes of ``codes`` ``(N, M)``, their multiplicities and their items."""
    n, m = codes.shape
    bits = max(1, (k - 1).bit_length())
    codes_l = codes.to(torch.int64)
    # Pack each code into as few int64 words as hold it (62 bits each); one word needs a
    # single 1-D unique, more words are ordered by stable sorts from the last word to the
    # first (a row-wise unique is far slower on large galleries, e.g. 8x256 codes).
    per_word = max(1, 62 // bits)
    words = []
    for w0 in range(0, m, per_word):
        key = torch.zeros(n, dtype=torch.int64, device=codes.device)
        for j in range(w0, min(m, w0 + per_word)):
            key |= codes_l[:, j] << ((j - w0) * bits)
        words.append(key)
    if len(words) == 1:
        _, inv, cnt = torch.unique(words[0], return_inverse=True, return_counts=True)
    else:
        order = torch.arange(n, device=codes.device)
        for key in reversed(words):
            order = order[torch.sort(key[order], stable=True).indices]
        new = torch.zeros(n, dtype=torch.bool, device=codes.device)
        new[:1] = True
        for key in words:
            ordered = key[order]
            new[1:] |= ordered[1:] != ordered[:-1]
        group = torch.cumsum(new.to(torch.int64), 0) - 1  # group id in sorted order
        inv = torch.empty(n, dtype=torch.int64, device=codes.device)
        inv[order] = group
        cnt = torch.bincount(group, minlength=int(group[-1].item()) + 1 if n else 0)
    uniq = torch.empty(cnt.numel(), m, dtype=torch.int64, device=codes.device)
    uniq[inv] = codes_l  # every item writes its own (identical) code row
    by_code = torch.sort(inv, stable=True).indices  # stable: index order inside a code
    first = torch.cumsum(cnt, 0) - cnt
    return CodeGroups(codes_t=uniq.t().contiguous(), inv=inv, cnt=cnt, by_code=by_code, first=first)
