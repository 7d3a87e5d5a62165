"""An inverted-file (IVF) faiss index over a model's own codes: search that scans a few lists.

The flat index (:func:`utils.retrieval.faiss_index.build_head_index`) scans every code. The
IVF index splits the gallery into ``nlist`` lists by a coarse quantizer and scans only the
``nprobe`` lists nearest to the query. It holds the codes the model chose, unchanged: faiss never
re-encodes an item, because OPQN picks codes by its learned assignment, not by the nearest
codeword.

* ``"ip"`` / ``"l2"`` heads (opqn, gpq / l2q, dpq): ``faiss.IndexIVFPQ`` with
  ``by_residual = False``; its PQ centroids are the head's codewords (``pq.train`` is never
  called) and the codes go in with ``add_sa_codes``. The coarse quantizer is k-means on the
  items' reconstructions ``sum_m c_{m,code_m}``, and an item goes to the list that the same
  quantizer would route a query to. Both are computed book by book (:func:`kmeans_codes`,
  :func:`route`): a reconstruction is one codeword per book, so its inner product with a
  centroid is a sum of ``M`` table entries, not ``D`` multiply-adds. For inner product the
  centroids stay the lists' means (not normalised): a query's inner product with a mean is
  the list's mean score, and at equal nprobe that found far more of the exhaustive top-10
  than spherical k-means did (``spherical=True``; docs/scaling.md).
* ``"hamming"`` (dcdh): ``faiss.IndexBinaryIVF`` over the bits (the bits are the vectors,
  so training and adding cannot change them).

With ``nprobe = nlist`` every list is scanned and the scores equal the flat index's.
Galleries larger than memory are built as IVF shards that share one trained quantizer and
are merged into on-disk inverted lists (:func:`merge_on_disk`), searched memory-mapped.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from models.methods import QuantHead

from .faiss_index import _faiss, pack_bits, pack_codes, set_pq_centroids

FaissIndex = Any  # faiss.IndexIVFPQ or faiss.IndexBinaryIVF (faiss is imported lazily)

__all__ = [
    "INDEX_TYPES",
    "default_nlist",
    "default_nprobe",
    "reconstruct",
    "route",
    "kmeans_codes",
    "train_ivf",
    "add_to_ivf",
    "build_ivf_index",
    "set_nprobe",
    "merge_on_disk",
    "read_ivf",
]

INDEX_TYPES = ("flat", "ivf")
# k-means sample: faiss's guidance is 39 to 256 points per centroid; 64 keeps training a few
# seconds at nlist 1024 on 2 cores with the same list balance.
POINTS_PER_CENTROID = 64
MIN_POINTS_PER_LIST = 39  # below this faiss's k-means warns that it lacks training points
KMEANS_ITERATIONS = 20
# Items added per block (codes packed and routed together).
ROUTE_BLOCK = 65536
# Routing scores held at once: (items, nlist) float32 of at most this many entries (2 MiB:
# a block that stays in cache routes about twice as fast as 64 MiB blocks).
ROUTE_SCORES = 1 << 19


def default_nlist(n: int) -> int:
    """A power of two near ``sqrt(n)``, lowered until every list can get
    ``MIN_POINTS_PER_LIST`` items (k-means needs them), at least 1.

    Building costs ``nlist * M`` table look-ups per item (k-means and routing, book by
    book), a query ``nlist * D`` for its routing; this stays below the ``4 * sqrt(n)`` often
    used for short vectors to bound the build time, although finer lists reach the same
    recall in fewer scanned codes (the benchmark uses ``4 * sqrt(n)``; docs/scaling.md, "Pick nlist
    and nprobe")."""
    if n < 1:
        raise ValueError("an IVF index needs at least one item")
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    while nlist > 1 and nlist * MIN_POINTS_PER_LIST > n:
        nlist //= 2
    return nlist


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query by default: 1/16 of them (the recall table of docs/scaling.md)."""
    return max(1, nlist // 16)


def reconstruct(head: QuantHead, codes: Tensor) -> np.ndarray:
    """The items' points for the coarse quantizer: ``(N, M*d')`` float32, the concatenated
    codewords ``c_{m,code_m}`` of ``head.faiss_centroids()`` (``(M, d', K)``)."""
    words = head.faiss_centroids().detach().to("cpu", torch.float32).permute(0, 2, 1)  # M,K,d
    idx = codes.to("cpu", torch.int64)
    parts = [words[m, idx[:, m]] for m in range(words.shape[0])]
    return torch.cat(parts, dim=1).numpy()


def _best_lists(tables: Tensor, codes: Tensor) -> Tensor:
    """``argmax_j sum_m tables[m, code_m, j]`` for each row of ``codes`` ``(n, M)``;
    ``tables`` ``(M, K, nlist)`` float32. The M rows are gathered and added by
    ``embedding_bag`` (one fused pass), in blocks of ``ROUTE_SCORES`` scores that stay in
    cache."""
    m, k, nlist = tables.shape
    flat = tables.reshape(m * k, nlist)
    keys = codes.to("cpu", torch.int64) + torch.arange(m) * k  # book m's rows start at m*K
    out = torch.empty(keys.shape[0], dtype=torch.int64)
    block = max(1, ROUTE_SCORES // nlist)
    for i in range(0, keys.shape[0], block):
        scores = torch.nn.functional.embedding_bag(keys[i : i + block], flat, mode="sum")
        out[i : i + scores.shape[0]] = scores.argmax(1)
    return out


def _tables(words: Tensor, cent: Tensor, l2: bool) -> Tensor:
    """Per-book routing tables ``(M, K, nlist)`` float32 of centroids ``cent``
    ``(nlist, M, d)`` for codewords ``words`` ``(M, K, d)`` (float64 both): entry
    ``[m, k, j] = <c_{m,k}, cent_{j,m}>``; for ``l2`` doubled, with ``-||cent_j||^2`` in
    book 0 (so the best list has the highest sum)."""
    tables = torch.einsum("mkd,jmd->mkj", words, cent)
    if l2:
        tables = 2 * tables
        tables[0] -= (cent * cent).sum((1, 2))
    return tables.to(torch.float32).contiguous()


def _words(head: QuantHead) -> Tensor:
    """The head's codewords ``(M, K, d')`` float64 (``faiss_centroids()`` is ``(M, d', K)``)."""
    return head.faiss_centroids().detach().to("cpu", torch.float64).permute(0, 2, 1)


def route(index: FaissIndex, head: QuantHead, codes: Tensor) -> np.ndarray:
    """The list of each of ``codes`` ``(n, M)``: the coarse quantizer's best centroid for the
    item's reconstruction, as :meth:`quantizer.search` would pick it for a query, ``(n,)``
    int64.

    The reconstruction is a concatenation of codewords, so its inner product with centroid
    ``j`` is ``sum_m <c_{m,code_m}, centroid_{j,m}>``: per book a ``(K, nlist)`` table,
    and an item's scores are ``M`` table rows added, not ``nlist x D``
    multiply-adds: the same scores up to float rounding, for a small fraction of the work
    at D = 516, M = 6. For the L2 quantizer the score is ``2 <x, c_j> - ||c_j||^2``
    (``||x||^2`` is the same for every list)."""
    return _best_lists(_routing_tables(index, head), codes).numpy()


def _routing_tables(index: FaissIndex, head: QuantHead) -> Tensor:
    """:func:`_tables` of the index's coarse centroids for the head's codewords."""
    quantizer = index.quantizer
    words = _words(head)
    m, _, d = words.shape
    cent = torch.from_numpy(quantizer.reconstruct_n(0, quantizer.ntotal)).to(torch.float64)
    l2 = quantizer.metric_type != _faiss().METRIC_INNER_PRODUCT
    return _tables(words, cent.view(-1, m, d), l2)


def kmeans_codes(words: Tensor, codes: Tensor, nlist: int, niter: int = 20, seed: int = 0,
                 spherical: bool = False) -> Tensor:
    """Lloyd's k-means of the reconstructions of ``codes`` ``(n, M)`` under codewords
    ``words`` ``(M, K, d)``, computed book by book; returns the centroids
    ``(nlist, M * d)`` float32.

    A reconstruction is one codeword per book, so a centroid (a mean of reconstructions) is
    per book a mixture of the K codewords: it is kept as those mixture weights ``(nlist, M,
    K)`` (the share of the list's items holding each word), the assignment uses
    :func:`_best_lists` tables and the update is a histogram. This is the k-means that
    ``faiss.Kmeans`` runs on the dense reconstructions (L2 assignment; ``spherical``:
    inner product with unit-norm centroids), at a small fraction of its cost. Initial
    centroids are ``nlist`` random items; a list left empty restarts from a random item of
    the largest list, as faiss splits a big cluster.
    """
    n = codes.shape[0]
    m, k, d = words.shape
    idx = codes.to("cpu", torch.int64)
    gen = torch.Generator().manual_seed(seed)
    books = torch.arange(m)
    weights = torch.zeros(nlist, m, k, dtype=torch.float64)
    weights[torch.arange(nlist)[:, None], books, idx[torch.randperm(n, generator=gen)[:nlist]]] = 1
    gram = torch.einsum("mkd,mld->mkl", words, words)  # (M, K, K): <c_{m,k}, c_{m,l}>
    flat = (idx + books * k).reshape(-1)  # item i, book m -> column m*K + code

    def unit_norm(w: Tensor) -> Tensor:  # ||c_j||^2 = sum_m w_m^T G_m w_m
        norm = torch.einsum("jmk,mkl,jml->j", w, gram, w).clamp_min(1e-30)
        return w / norm.sqrt()[:, None, None]

    for _ in range(niter):
        if spherical:
            weights = unit_norm(weights)
        # Entry [m, k, j] = <c_{m,k}, centroid_{j,m}> = (G_m w_{j,m})_k.
        tables = torch.einsum("mkl,jml->mkj", gram, weights)
        if not spherical:
            tables = 2 * tables
            tables[0] -= torch.einsum("jmk,mkj->j", weights, tables) / 2
        assign = _best_lists(tables.to(torch.float32).contiguous(), idx)
        sizes = torch.bincount(assign, minlength=nlist)
        counts = torch.zeros(nlist, m * k, dtype=torch.float64)
        counts.index_put_((assign.repeat_interleave(m), flat),
                          torch.ones(n * m, dtype=torch.float64), accumulate=True)
        weights = counts.view(nlist, m, k) / sizes.clamp_min(1)[:, None, None]
        for j in torch.nonzero(sizes == 0).flatten().tolist():
            big = int(sizes.argmax())
            members = torch.nonzero(assign == big).flatten()
            pick = int(members[torch.randint(members.numel(), (1,), generator=gen)])
            weights[j] = 0
            weights[j, books, idx[pick]] = 1
            sizes[big] -= 1  # the next empty list may pick another big one
            assign[pick] = j
    if spherical:
        weights = unit_norm(weights)
    return torch.einsum("jmk,mkd->jmd", weights, words).reshape(nlist, m * d).to(torch.float32)


def _sample(n: int, size: int, seed: int) -> Tensor:
    if n <= size:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:size].sort().values


def train_ivf(head: QuantHead, codes: Tensor, nlist: int, seed: int = 0,
              spherical: bool = False) -> FaissIndex:
    """An empty IVF index for ``head`` whose coarse quantizer is trained on ``codes``
    ``(n, M)`` (a sample of the gallery is enough: at most ``POINTS_PER_CENTROID * nlist``
    rows are used). ``spherical`` normalises the centroids (inner-product heads only; off
    by default, see the module docstring).

    Returns ``faiss.IndexIVFPQ`` (``"ip"``/``"l2"``) or ``faiss.IndexBinaryIVF``
    (``"hamming"``), ``ntotal = 0``, ``nprobe = 1``.
    Raises ValueError when ``nlist`` exceeds the number of codes.
    """
    faiss = _faiss()
    metric = getattr(head, "faiss_metric", None)
    n = codes.shape[0]
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist {nlist} must lie in [1, {n}] (the codes it is trained on)")
    rows = codes[_sample(n, POINTS_PER_CENTROID * nlist, seed)]
    if metric == "hamming":
        packed = pack_bits(rows)
        dbits = packed.shape[1] * 8
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dbits), dbits, nlist)
        index.cp.seed = seed
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.max_points_per_centroid = POINTS_PER_CENTROID
        index.train(packed)  # trains the quantizer only: binary codes are stored as given
        return index
    if metric not in ("ip", "l2"):
        raise ValueError(f"faiss cannot express the score of method {getattr(head, 'method', '?')}")
    centroids = head.faiss_centroids().detach().cpu()
    m, d, k = centroids.shape
    nbits = k.bit_length() - 1
    ip = metric == "ip"
    means = kmeans_codes(_words(head), rows, nlist, KMEANS_ITERATIONS, seed, spherical and ip)
    quantizer = faiss.IndexFlatIP(m * d) if ip else faiss.IndexFlatL2(m * d)
    quantizer.add(np.ascontiguousarray(means.numpy()))
    faiss_metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
    index = faiss.IndexIVFPQ(quantizer, m * d, nlist, m, nbits, faiss_metric)
    index.by_residual = False  # the stored code is the model's code, not a residual's
    set_pq_centroids(index.pq, centroids)
    index.is_trained = True  # never index.train(): it would replace the codewords
    return index


def add_to_ivf(index: FaissIndex, head: QuantHead, codes: Tensor,
               ids: Tensor | None = None) -> None:
    """Add ``codes`` ``(n, M)`` unchanged to ``index`` (from :func:`train_ivf`), with int64
    ``ids`` ``(n,)`` (default: ``ntotal, ntotal + 1, ...``), in blocks of ``ROUTE_BLOCK``."""
    faiss = _faiss()
    n = codes.shape[0]
    if ids is None:
        ids = torch.arange(index.ntotal, index.ntotal + n)
    if ids.shape != (n,):
        raise ValueError(f"{n} codes but ids of shape {tuple(ids.shape)}")
    binary = isinstance(index, faiss.IndexBinary)
    tables = None if binary else _routing_tables(index, head)  # the same for every block
    for i in range(0, n, ROUTE_BLOCK):
        block = codes[i : i + ROUTE_BLOCK]
        block_ids = np.ascontiguousarray(ids[i : i + ROUTE_BLOCK].numpy().astype(np.int64))
        if binary:
            index.add_with_ids(pack_bits(block), block_ids)
            continue
        # Route by the reconstruction, as a query is routed; then store list number and code.
        width = index.coarse_code_size()
        lists = _best_lists(tables, block).numpy()
        coarse = lists.astype("<i8").view(np.uint8).reshape(-1, 8)[:, :width]
        packed = pack_codes(block, index.pq.nbits)
        index.add_sa_codes(np.ascontiguousarray(np.concatenate([coarse, packed], axis=1)),
                           block_ids)


def build_ivf_index(head: QuantHead, codes: Tensor, nlist: int | None = None,
                    nprobe: int | None = None, seed: int = 0,
                    spherical: bool = False) -> FaissIndex:
    """An in-memory IVF index of a gallery's ``codes`` ``(N, M)``, item ids ``0..N-1``.

    ``nlist`` defaults to :func:`default_nlist`, ``nprobe`` to :func:`default_nprobe`;
    ``spherical`` as in :func:`train_ivf`.
    """
    nlist = nlist or default_nlist(codes.shape[0])
    index = train_ivf(head, codes, nlist, seed, spherical)
    add_to_ivf(index, head, codes)
    set_nprobe(index, nprobe or default_nprobe(nlist))
    return index


def set_nprobe(index: FaissIndex, nprobe: int) -> int:
    """Scan ``min(nprobe, nlist)`` lists per query; returns the value set."""
    nprobe = max(1, min(int(nprobe), index.nlist))
    index.nprobe = nprobe
    return nprobe


def merge_on_disk(trained: FaissIndex, shard_files: Sequence[Union[str, os.PathLike]],
                  ivfdata: Union[str, os.PathLike]) -> FaissIndex:
    """Merge IVF shard files (all from the same :func:`train_ivf` index) into ``trained``
    (left empty by the caller), with the inverted lists in the file ``ivfdata``.

    The shards are read memory-mapped, so their lists never need to fit in memory together.
    Float indexes go through ``faiss.contrib.ondisk.merge_ondisk``; binary ones (which that
    helper cannot unwrap) through the same ``OnDiskInvertedLists`` steps.
    """
    faiss = _faiss()
    names = [os.fspath(f) for f in shard_files]
    if os.path.exists(ivfdata):
        os.remove(ivfdata)  # OnDiskInvertedLists appends to an existing file
    if not isinstance(trained, faiss.IndexBinary):
        from faiss.contrib.ondisk import merge_ondisk

        merge_ondisk(trained, names, os.fspath(ivfdata))
        return trained
    shards = [faiss.read_index_binary(name, faiss.IO_FLAG_MMAP) for name in names]
    lists = faiss.InvertedListsPtrVector()
    for shard in shards:
        shard.own_invlists = False  # the merge reads them after the shard object is gone
        lists.push_back(shard.invlists)
    ondisk = faiss.OnDiskInvertedLists(trained.nlist, trained.code_size, os.fspath(ivfdata))
    trained.ntotal = ondisk.merge_from_multiple(lists.data(), lists.size(), False)
    trained.replace_invlists(ondisk, True)
    ondisk.this.disown()
    return trained


def read_ivf(path: Union[str, os.PathLike]) -> FaissIndex:
    """Read an IVF index file (float or binary); on-disk inverted lists are looked for beside
    it (so the folder may move) and memory-mapped by faiss: the lists stay on disk."""
    faiss = _faiss()
    try:
        return faiss.read_index(os.fspath(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError:  # a binary index (dcdh)
        return faiss.read_index_binary(os.fspath(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
