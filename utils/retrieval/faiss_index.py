"""Export OPQN codes to a FAISS ``IndexPQ`` that scores exactly like OPQN's ADC.

OPQN's codewords are orthonormal: book ``m`` holds ``K`` orthonormal columns
``codebooks[m, :, k]`` (tensor ``(M, d, K)``).  The soft-quantized query sub-vector
``s_m = codebooks[m] @ P_m`` therefore has inner product ``P_m[k]`` with codeword ``k``, so an
``IndexPQ`` with these codewords as centroids and the inner-product metric, queried with the
concatenated ``s_m``, returns ``sum_m P_m[code_m]``: the OPQN score (up to float rounding).

faiss is imported lazily, so the rest of the project works without it.
"""
from __future__ import annotations

import os
from typing import Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "build_faiss_index",
    "soft_quantized_queries",
    "save_faiss_index",
    "load_faiss_index",
    "search_faiss",
    "pack_codes",
    "pack_bits",
    "set_pq_centroids",
    "search_head_queries",
    "build_head_index",
    "search_head_index",
]


def _faiss():
    try:
        import faiss  # noqa: WPS433 (lazy on purpose)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "faiss is required for the FAISS export; install it with `pip install faiss-cpu` "
            "(or faiss-gpu)"
        ) from exc
    return faiss


def _check_codebooks(codebooks: Tensor) -> Tuple[int, int, int, int]:
    if not isinstance(codebooks, Tensor) or codebooks.dim() != 3:
        raise ValueError(f"codebooks must be an (M, d, K) tensor, got {getattr(codebooks, 'shape', type(codebooks))}")
    m, d, k = codebooks.shape
    if k < 2 or k & (k - 1):
        raise ValueError(f"K must be a power of two >= 2 for IndexPQ, got K={k}")
    return m, d, k, k.bit_length() - 1


def pack_codes(codes: Tensor, nbits: int) -> np.ndarray:
    """Pack ``(N, M)`` codeword indices into FAISS's PQ code layout.

    FAISS writes the ``M`` indices one after another, ``nbits`` bits each, least-significant
    bit first, into ``ceil(M * nbits / 8)`` bytes per vector.

    Returns:
        uint8 array ``(N, ceil(M * nbits / 8))``.
    """
    c = codes.detach().cpu().numpy().astype(np.int64, copy=False)
    n, m = c.shape
    if nbits == 8:
        return np.ascontiguousarray(c.astype(np.uint8))
    bits = ((c[:, :, None] >> np.arange(nbits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.ascontiguousarray(np.packbits(bits.reshape(n, m * nbits), axis=1, bitorder="little"))


def build_faiss_index(codebooks: Tensor, codes: Tensor, chunk: int = 1 << 20,
                      metric: str = "ip"):
    """An ``IndexPQ`` (inner product) whose centroids are the codewords, holding ``codes``.

    Args:
        codebooks: float tensor ``(M, d, K)``; codeword ``k`` of book ``m`` is
            ``codebooks[m, :, k]``.  ``K`` must be a power of two.
        codes: integer tensor ``(N, M)`` with values in ``[0, K)`` (uint8 or int64).
        chunk: codes added per call (bounds the temporary packing memory).

    Returns:
        ``faiss.IndexPQ`` with ``d = M * d``, ``M`` sub-quantizers, ``nbits = log2 K``,
        ``METRIC_INNER_PRODUCT`` (``metric="ip"``) or ``METRIC_L2`` (``metric="l2"``) and
        ``ntotal = N``; item ids are row indices of ``codes``.
    """
    faiss = _faiss()
    m, d, k, nbits = _check_codebooks(codebooks)
    if codes.dim() != 2 or codes.shape[1] != m:
        raise ValueError(f"codes must be (N, {m}), got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point:
        raise TypeError("codes must be an integer tensor")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"code values must lie in [0, {k})")
    faiss_metric = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}[metric]
    index = faiss.IndexPQ(m * d, m, nbits, faiss_metric)
    set_pq_centroids(index.pq, codebooks)
    index.is_trained = True
    for i in range(0, codes.shape[0], chunk):
        _append_codes(faiss, index, pack_codes(codes[i : i + chunk], nbits))
    return index


def set_pq_centroids(pq, codebooks: Tensor) -> None:
    """Copy the codewords ``(M, d, K)`` into a faiss ``ProductQuantizer`` (layout M, K, d),
    so that faiss decodes and scores the model's own codes; the PQ is never trained."""
    faiss = _faiss()
    cent = codebooks.detach().to("cpu", torch.float32).permute(0, 2, 1).contiguous().numpy()
    faiss.copy_array_to_vector(cent.ravel(), pq.centroids)
    if hasattr(pq, "sync_transposed_centroids"):
        pq.sync_transposed_centroids()


def _append_codes(faiss, index, packed: np.ndarray) -> None:
    """Append packed PQ codes to ``index`` without re-encoding vectors."""
    if hasattr(index, "add_sa_codes_c") or hasattr(index, "add_sa_codes"):
        try:
            index.add_sa_codes(packed)  # faiss >= 1.7.3 (IndexFlatCodes)
            return
        except RuntimeError:  # pragma: no cover - index type without add_sa_codes support
            pass
    # Older faiss: write the flat code array directly.  # pragma: no cover
    old = faiss.vector_to_array(index.codes)
    faiss.copy_array_to_vector(np.concatenate([old, packed.ravel()]), index.codes)
    index.ntotal += packed.shape[0]


def soft_quantized_queries(tables: Tensor, codebooks: Tensor) -> Tensor:
    """Soft-quantized query vectors: concat over ``m`` of ``codebooks[m] @ tables[:, m]``.

    Args:
        tables: float tensor ``(Q, M, K)`` (OPQN: softmax probabilities ``P_m``).
        codebooks: float tensor ``(M, d, K)``.

    Returns:
        float tensor ``(Q, M * d)`` on the device of ``tables``.
    """
    q, m, k = tables.shape
    if codebooks.shape[0] != m or codebooks.shape[2] != k:
        raise ValueError(f"tables {tuple(tables.shape)} do not match codebooks {tuple(codebooks.shape)}")
    cb = codebooks.to(device=tables.device, dtype=tables.dtype)
    return torch.einsum("mdk,qmk->qmd", cb, tables).reshape(q, m * codebooks.shape[1])


def save_faiss_index(index, path: Union[str, os.PathLike]) -> None:
    """Write ``index`` to ``path`` with ``faiss.write_index`` (binary indexes included)."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexBinary):
        faiss.write_index_binary(index, os.fspath(path))
    else:
        faiss.write_index(index, os.fspath(path))


def load_faiss_index(path: Union[str, os.PathLike]):
    """Read an index written by ``save_faiss_index``."""
    faiss = _faiss()
    try:
        return faiss.read_index(os.fspath(path))
    except RuntimeError:  # a binary index (dcdh)
        return faiss.read_index_binary(os.fspath(path))


def search_faiss(index, tables: Tensor, codebooks: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Top-``k`` search of ``index`` with OPQN score tables.

    Args:
        index: an index from ``build_faiss_index`` (or ``load_faiss_index``).
        tables: float tensor ``(Q, M, K)``.
        codebooks: float tensor ``(M, d, K)`` used to build the index.
        topk: results per query.

    Returns:
        ``(scores, indices)``: CPU float32 ``(Q, topk)`` (descending) and int64 ``(Q, topk)``;
        missing results (``topk > ntotal``) have index ``-1``.
    """
    x = soft_quantized_queries(tables, codebooks).detach().to("cpu", torch.float32).contiguous().numpy()
    dist, idx = index.search(x, topk)
    return torch.from_numpy(dist), torch.from_numpy(idx.astype(np.int64, copy=False))


# --------------------------------------------------------------------------------------
# Any method's head (models.methods): the index whose scores equal the ADC engine's.
# --------------------------------------------------------------------------------------


def pack_bits(bits: Tensor) -> np.ndarray:
    """``(N, L)`` 0/1 -> ``(N, ceil(L / 8))`` uint8, zero-padded (padding never differs)."""
    b = bits.detach().cpu().numpy().astype(np.uint8, copy=False)
    pad = (-b.shape[1]) % 8
    if pad:
        b = np.concatenate([b, np.zeros((b.shape[0], pad), dtype=np.uint8)], axis=1)
    return np.ascontiguousarray(np.packbits(b, axis=1))


def build_head_index(head, codes: Tensor):
    """A faiss index of a gallery's ``codes`` ``(N, M)`` for a head's ``faiss_metric``.

    * ``"ip"`` (opqn, gpq): ``IndexPQ`` with the inner-product metric over
      ``head.faiss_centroids()``;
    * ``"l2"`` (l2q, dpq): ``IndexPQ`` with the L2 metric: it returns
      ``sum_m ||s_m - c_{m,code_m}||^2``, the negative of the engine's score;
    * ``"hamming"`` (dcdh): ``IndexBinaryFlat`` over the bits, padded to whole bytes; it
      returns Hamming distances, ``L`` minus the engine's score.

    Raises ValueError for a head without a faiss equivalent (``faiss_metric`` None).
    """
    metric = getattr(head, "faiss_metric", None)
    if metric in ("ip", "l2"):
        return build_faiss_index(head.faiss_centroids().detach().cpu(), codes, metric=metric)
    if metric == "hamming":
        faiss = _faiss()
        packed = pack_bits(codes)
        index = faiss.IndexBinaryFlat(packed.shape[1] * 8)
        index.add(packed)
        return index
    raise ValueError(f"faiss cannot express the score of method {getattr(head, 'method', '?')}")


def search_head_index(index, head, features: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Top-``k`` search of :func:`build_head_index`'s index with query ``features`` ``(Q, D)``.

    Returns ``(scores, indices)`` on the CPU, ``(Q, topk)`` each, with ``scores`` converted to
    the engine's scale (higher is better): L2 distances negated, Hamming distances
    subtracted from ``L``.
    """
    return search_head_queries(index, head, head.faiss_queries(features), topk)


def search_head_queries(index, head, queries: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """:func:`search_head_index` from the head's faiss query vectors ``queries``
    (``head.faiss_queries(features)``: float ``(Q, D')``, or uint8 bits ``(Q, L)`` for
    dcdh); works for any faiss index over the head's codes (flat, IVF, a shard front)."""
    if head.faiss_metric == "hamming":
        dist, idx = index.search(pack_bits(queries), topk)
        scores = head.num_books - torch.from_numpy(dist.astype(np.float32))
    else:
        x = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        dist, idx = index.search(x, topk)
        scores = torch.from_numpy(dist)
        if head.faiss_metric == "l2":
            scores = -scores
    return scores, torch.from_numpy(idx.astype(np.int64, copy=False))
