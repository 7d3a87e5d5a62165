"""A gallery in Milvus: the codes of one model in a vector database, searched with the exact
asymmetric score.

`Milvus <https://milvus.io>`_ is an open-source vector database that scales from one process to
a cluster. Its Python client, ``pymilvus``, opens either **Milvus Lite** (an embedded database in
a local ``.db`` file, no server) or a Milvus server or cluster (``http(s)://host:port``) with the
same calls, so the code below is the same on a laptop and on a cluster.

How the asymmetric score becomes an inner product Milvus computes exactly
---------------------------------------------------------------------------
Every method scores an item with codes ``c (M,)`` against a query's table ``T (M, K)`` as
``s = sum_m T[m, c_m]`` (for DCDH, M = L bits and K = 2). An item is stored as a sparse vector
of length ``M*K`` with one entry 1.0 per book, at ``m*K + c_m``; the query is its flattened
table. Their inner product is ``s``. Milvus accepts only non-negative sparse weights and ranks
only items with a positive inner product, so each book's row is shifted to be positive
(:func:`sparse_tables`): every item has exactly one entry per book, so every score moves by
the same amount, which is added back. The ranking and the
scores are those of :func:`utils.retrieval.adc.search_adc` (up to float32 rounding, and the
order of items with equal scores).

Each item also holds its image path (the primary key, so an item can be deleted by path and
is never stored twice), its identity, the fingerprint of the model that encoded it and the
time it was added; ``where`` filters on them with Milvus's expression language. The
collection's properties name the model: a collection built with one model is refused for
another. While items are being added the collection is marked ``building``; a search of a
collection left ``building`` by an interrupted run is refused until the build is finished.

Verbs, as in faiss: :meth:`MilvusGallery.open`, :meth:`~MilvusGallery.add`,
:meth:`~MilvusGallery.delete`, :meth:`~MilvusGallery.search`, plus
:meth:`~MilvusGallery.build` (one mark over several adds), :meth:`~MilvusGallery.stored_paths`
and :meth:`~MilvusGallery.drop`.

Nothing here listens on the network or unpickles: the client speaks Milvus's gRPC
(protocol buffers). Milvus Lite serves that protocol on a loopback port of this process.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from utils.errors import UsageError, first_line

INSTALL_HINT = 'pip install "pymilvus[milvus-lite]"'
DEFAULT_TIMEOUT_S = 30.0
MAX_TOPK = 16384  # Milvus's limit on a search's k
INSERT_BATCH = 5000
QUERY_BATCH = 32  # queries per call: each call stays well inside the timeout
PATH_LENGTH = 4096
IDENTITY_LENGTH = 512
_PROPERTY = "opqn."  # prefix of our collection properties


def _pymilvus():
    """The client library, with its own error logging silenced (we report one line)."""
    # gRPC's C core prints keepalive notices (GOAWAY "too_many_pings" from Milvus Lite's
    # in-process server) on stderr; failures reach us as exceptions, reported in one line.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        import pymilvus
    except ImportError:
        raise UsageError(f"--milvus needs the Milvus client: {INSTALL_HINT}") from None
    # grpc._server: Milvus Lite's in-process server logs calls it does not implement.
    for name in ("pymilvus", "pymilvus.decorators", "grpc._server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


def collection_name(checkpoint: str | Path) -> str:
    """A valid Milvus collection name from a checkpoint file: ``opqn_<stem>`` with every
    character outside ``[A-Za-z0-9_]`` replaced by ``_`` (at most 255 characters)."""
    stem = Path(checkpoint).name
    for suffix in (".tar", ".pth", ".pt"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    return ("opqn_" + re.sub(r"\W", "_", stem, flags=re.ASCII))[:255]


def check_uri(uri: str) -> str:
    """``uri`` if pymilvus can open it: ``http(s)://`` or ``tcp://`` for a server, or a local
    ``.db`` file (Milvus Lite) in an existing folder; else a one-line ``UsageError``."""
    if re.match(r"^(https?|tcp|unix)://", uri):
        return uri
    path = Path(uri)
    if path.suffix != ".db":
        raise UsageError(f"--milvus {uri}: a Milvus Lite file name ends in .db "
                         f"(or give a server as http://host:19530)")
    if not path.parent.resolve().is_dir():
        raise UsageError(f"--milvus {uri}: folder {path.parent} does not exist")
    return str(path)


@dataclass(frozen=True)
class MilvusModel:
    """What a collection records about the model whose codes it holds."""

    fingerprint: str  # SHA-256 of the model's configuration and weights
    method: str
    num_books: int
    num_words: int
    checkpoint: str = ""

    def properties(self) -> dict[str, str]:
        return {f"{_PROPERTY}model": self.fingerprint, f"{_PROPERTY}method": self.method,
                f"{_PROPERTY}books": str(self.num_books),
                f"{_PROPERTY}words": str(self.num_words),
                f"{_PROPERTY}checkpoint": self.checkpoint}


def sparse_codes(codes: Tensor, num_words: int) -> list[dict[int, float]]:
    """Codes ``(N, M)`` as N sparse vectors of dimension ``M*K``: 1.0 at ``m*K + c_m``."""
    flat = codes.to(torch.int64).cpu() + torch.arange(codes.shape[1]) * num_words
    return [dict.fromkeys(row, 1.0) for row in flat.tolist()]


def sparse_tables(tables: Tensor) -> tuple[list[dict[int, float]], np.ndarray]:
    """Query tables ``(Q, M, K)`` as Q positive sparse vectors of dimension ``M*K`` and the
    offsets ``(Q,)`` float64 to add to their inner products.

    Milvus refuses negative weights and only ranks items whose inner product is positive, so
    each book's row is shifted to ``T[m] - min T[m] + eps_m`` with a small
    ``eps_m = max(1e-6, 1e-4 * (max T[m] - min T[m]))``: every item then scores at least
    ``sum_m eps_m > 0`` and all items share the same offset.
    """
    t = tables.detach().cpu().to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError("query tables hold non-finite values")
    low = t.min(dim=2, keepdim=True).values
    spread = t.max(dim=2, keepdim=True).values - low
    eps = torch.clamp(spread * 1e-4, min=1e-6)
    shifted = (t - low + eps).to(torch.float32).reshape(t.shape[0], -1).numpy()
    offsets = (low - eps).squeeze(2).sum(dim=1).numpy()
    return [dict(enumerate(row.tolist())) for row in shifted], offsets


class MilvusGallery:
    """One model's gallery in one Milvus collection. Open it with :meth:`open`."""

    def __init__(self, client, uri: str, name: str, model: MilvusModel,
                 timeout: float) -> None:
        self._client, self.uri, self.name = client, uri, name
        self.model, self.timeout = model, timeout
        self._building = False

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, uri: str, name: str, model: MilvusModel, token: str = "",
             timeout: float = DEFAULT_TIMEOUT_S, rebuild: bool = False) -> MilvusGallery:
        """Connect to ``uri`` and open collection ``name`` for ``model``, creating it if
        absent (``rebuild``: dropped and created anew).

        Raises ``UsageError`` (one line) when the server cannot be reached within ``timeout``
        seconds, refuses the token, or the collection holds another model's codes or is not
        one of ours.
        """
        pymilvus = _pymilvus()
        uri = check_uri(uri)
        try:
            client = pymilvus.MilvusClient(uri=uri, token=token or "", timeout=timeout)
        except Exception as exc:  # pymilvus raises several types for one cause
            raise UsageError(f"--milvus {uri}: cannot connect within {timeout:g} s: "
                             f"{_milvus_message(exc)}") from None
        gallery = cls(client, uri, name, model, timeout)
        with gallery._errors("open"):
            if rebuild and client.has_collection(name, timeout=timeout):
                client.drop_collection(name, timeout=timeout)
            if client.has_collection(name, timeout=timeout):
                gallery._check_owner()
                client.load_collection(name, timeout=timeout)
            else:
                gallery._create(pymilvus)
        return gallery

    def _create(self, pymilvus) -> None:
        DataType = pymilvus.DataType
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("path", DataType.VARCHAR, is_primary=True, max_length=PATH_LENGTH)
        schema.add_field("identity", DataType.VARCHAR, max_length=IDENTITY_LENGTH)
        schema.add_field("model", DataType.VARCHAR, max_length=64)
        schema.add_field("added", DataType.INT64)  # unix time of the build that added it
        schema.add_field("code", DataType.SPARSE_FLOAT_VECTOR)
        index = self._client.prepare_index_params()
        # drop_ratio_build 0: every entry is kept, so the inner products are exact.
        index.add_index(field_name="code", index_type="SPARSE_INVERTED_INDEX",
                        metric_type="IP", params={"drop_ratio_build": 0.0})
        self._client.create_collection(
            self.name, schema=schema, index_params=index, timeout=self.timeout,
            properties={**self.model.properties(), f"{_PROPERTY}state": "complete"})

    def _properties(self) -> dict[str, str]:
        info = self._client.describe_collection(self.name, timeout=self.timeout)
        return {k: str(v) for k, v in (info.get("properties") or {}).items()}

    def _check_owner(self) -> None:
        props = self._properties()
        owner = props.get(f"{_PROPERTY}model")
        if owner is None:
            raise UsageError(f"--milvus {self.uri}: collection {self.name} was not written by "
                             f"this tool; name another with --milvus-collection")
        if owner != self.model.fingerprint:
            source = props.get(f"{_PROPERTY}checkpoint") or "another checkpoint"
            raise UsageError(
                f"--milvus {self.uri}: collection {self.name} holds the codes of another model "
                f"({source}, fingerprint {owner[:12]}); --rebuild-index replaces it, "
                f"--milvus-collection names another")

    @property
    def complete(self) -> bool:
        """False while a build is under way or after one was interrupted."""
        with self._errors("describe"):
            return self._properties().get(f"{_PROPERTY}state", "complete") == "complete"

    def _mark(self, state: str) -> None:
        self._client.alter_collection_properties(
            self.name, properties={f"{_PROPERTY}state": state}, timeout=self.timeout)

    # -- contents --------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._errors("count"):
            rows = self._client.query(self.name, filter="", output_fields=["count(*)"],
                                      timeout=self.timeout)
        return int(rows[0]["count(*)"])

    def has_identity(self, identity: str) -> bool:
        """Whether any item has this identity."""
        with self._errors("query"):
            rows = self._client.query(self.name, filter=f"identity == {json.dumps(identity)}",
                                      output_fields=["path"], limit=1, timeout=self.timeout)
        return bool(rows)

    def stored_paths(self) -> set[str]:
        """Every item's path."""
        paths: set[str] = set()
        with self._errors("query"):
            iterator = self._client.query_iterator(self.name, batch_size=10000, filter="",
                                                   output_fields=["path"],
                                                   timeout=self.timeout)
            try:
                while batch := iterator.next():
                    paths.update(row["path"] for row in batch)
            finally:
                iterator.close()
        return paths

    def add(self, paths: Sequence[str], identities: Sequence[str | None], codes: Tensor,
            progress: bool = False) -> int:
        """Insert items (paths already stored are replaced); returns how many.

        Args:
            paths: N image paths (the items' keys).
            identities: N identity names (None: no identity, stored as "").
            codes: integer codes ``(N, M)`` in ``[0, K)`` of this gallery's model.
        """
        n = len(paths)
        if codes.dim() != 2 or codes.shape[0] != n or len(identities) != n:
            raise ValueError(f"add: {n} paths, {len(identities)} identities and codes "
                             f"{tuple(codes.shape)} do not line up")
        if codes.shape[1] != self.model.num_books:
            raise ValueError(f"add: codes have {codes.shape[1]} books, the model "
                             f"{self.model.num_books}")
        if n and (int(codes.min()) < 0 or int(codes.max()) >= self.model.num_words):
            raise ValueError(f"add: codes outside [0, {self.model.num_words})")
        for path in paths:
            if len(path.encode("utf-8", "surrogateescape")) > PATH_LENGTH:
                raise UsageError(f"--milvus: path longer than {PATH_LENGTH} bytes: {path[:80]}...")
        if n == 0:
            return 0
        from tqdm import tqdm

        now = int(time.time())
        with self.build(), self._errors("insert"):
            bar = tqdm(total=n, desc="milvus insert", unit="img", disable=not progress)
            for start in range(0, n, INSERT_BATCH):
                stop = min(start + INSERT_BATCH, n)
                vectors = sparse_codes(codes[start:stop], self.model.num_words)
                rows = [{"path": paths[i], "identity": (identities[i] or "")[:IDENTITY_LENGTH],
                         "model": self.model.fingerprint, "added": now,
                         "code": vectors[i - start]} for i in range(start, stop)]
                self._client.upsert(self.name, rows, timeout=self.timeout)
                bar.update(stop - start)
            bar.close()
        return n

    @contextlib.contextmanager
    def build(self) -> Iterator[MilvusGallery]:
        """Marks the collection ``building`` for the block (nested blocks share one mark),
        and ``complete``, flushed, only when the outermost block ends without an error: a
        build spread over several :meth:`add` calls is never served half done."""
        if self._building:
            yield self
            return
        with self._errors("insert"):
            self._mark("building")
        self._building = True
        try:
            yield self
        finally:
            self._building = False
        with self._errors("insert"):
            self._client.flush(self.name, timeout=self.timeout)
            self._mark("complete")

    def delete(self, paths: Sequence[str]) -> int:
        """Delete the items with these paths; returns how many were stored."""
        if not paths:
            return 0
        with self._errors("delete"):
            result = self._client.delete(self.name, ids=list(paths), timeout=self.timeout)
            self._client.flush(self.name, timeout=self.timeout)
        count = result.get("delete_count") if isinstance(result, dict) else None
        return int(count) if count is not None else len(paths)

    def drop(self) -> None:
        """Delete the collection and everything in it."""
        with self._errors("drop"):
            self._client.drop_collection(self.name, timeout=self.timeout)

    def close(self) -> None:
        self._client.close()

    # -- search ----------------------------------------------------------------------------
    def search(self, tables: Tensor, k: int, where: str = "",
               ) -> tuple[Tensor, list[list[str]], list[list[str]]]:
        """Top-``k`` items of each query by the asymmetric score.

        Args:
            tables: query tables ``(Q, M, K)`` of this gallery's model.
            k: results per query (at most 16,384, Milvus's limit).
            where: a Milvus filter expression on ``path``, ``identity``, ``model`` and
                ``added``, e.g. ``identity in ["a", "b"]`` or ``path like "/data/x/%"``.

        Returns:
            ``(scores, paths, identities)``: float32 ``(Q, k)`` best first, padded with
            ``-inf`` where fewer than k items match, and each query's result paths and
            identities (lists of at most k). Equal scores are ordered by path.
        """
        if tables.dim() != 3 or tables.shape[1:] != (self.model.num_books,
                                                      self.model.num_words):
            raise ValueError(f"search: tables {tuple(tables.shape)} do not match the gallery's "
                             f"(Q, {self.model.num_books}, {self.model.num_words})")
        if not 1 <= k <= MAX_TOPK:
            raise UsageError(f"--topk {k}: Milvus returns between 1 and {MAX_TOPK} results")
        if not self.complete:
            raise UsageError(f"--milvus {self.uri}: collection {self.name} is incomplete (a "
                             f"build was interrupted): add the gallery again with --gallery, "
                             f"or --rebuild-index")
        vectors, offsets = sparse_tables(tables)
        scores = torch.full((len(vectors), k), -float("inf"), dtype=torch.float32)
        paths: list[list[str]] = []
        identities: list[list[str]] = []
        for start in range(0, len(vectors), QUERY_BATCH):
            batch = vectors[start:start + QUERY_BATCH]
            with self._errors("search", where):
                hits = self._client.search(
                    self.name, data=batch, anns_field="code",
                    limit=k, filter=where, output_fields=["identity"], timeout=self.timeout,
                    search_params={"metric_type": "IP", "params": {"drop_ratio_search": 0.0}})
            for j, row in enumerate(hits):
                q = start + j
                ranked = sorted(((float(h["distance"]) + offsets[q], h["path"],
                                  h["entity"].get("identity", "")) for h in row),
                                key=lambda hit: (-hit[0], hit[1]))
                scores[q, : len(ranked)] = torch.tensor([h[0] for h in ranked],
                                                        dtype=torch.float32)
                paths.append([h[1] for h in ranked])
                identities.append([h[2] for h in ranked])
        return scores, paths, identities

    # -- errors ----------------------------------------------------------------------------
    def _errors(self, action: str, where: str = ""):
        return _MilvusErrors(self.uri, self.name, action, where)


def _milvus_message(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return " ".join(first_line(Exception(message)).split())


class _MilvusErrors:
    """Turns the client's exceptions into one-line ``UsageError`` s that name the URI, the
    collection and, for a search, the filter."""

    def __init__(self, uri: str, name: str, action: str, where: str) -> None:
        self.uri, self.name, self.action, self.where = uri, name, action, where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, (UsageError, KeyboardInterrupt, ValueError)):
            return False
        pymilvus = _pymilvus()
        if not isinstance(exc, pymilvus.exceptions.MilvusException):
            import grpc

            if not isinstance(exc, grpc.RpcError):
                return False
        message = _milvus_message(exc)
        if self.where and self.action == "search" and int(getattr(exc, "code", 0) or 0) in (
                6, 65535, 1100):
            raise UsageError(f"--where {self.where!r}: Milvus refused it: {message}") from None
        raise UsageError(f"--milvus {self.uri}: {self.action} in collection {self.name} "
                         f"failed: {message}") from None
