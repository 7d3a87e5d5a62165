"""Search across machines: IVF shards served by several processes, one front merging top-k.

Built on faiss's own client/server (``faiss.contrib.client_server`` over its ``rpc``
module); nothing here speaks a protocol of its own.

* :class:`ShardServer` serves one index file (an IVF shard written by
  :func:`utils.retrieval.shards.open_or_build_ivf`, or any faiss index) on a host and port. It binds
  the loopback interface unless told otherwise (faiss's ``run_server`` binds every
  interface).
* :class:`ShardFront` connects to the servers, sends each query batch to all of them and
  merges their top-k. faiss's ``ClientIndex`` merges with ``ResultHeap(nq, k)``, which keeps
  the *lowest* values: right for L2 and Hamming distances, wrong for inner product (it would
  return the worst matches). The front asks the servers for their metric and keeps the
  highest values for inner product.

**Trusted networks only.** The RPC unpickles what it receives (restricted to numpy types),
and a client may call any method of the served index (``reset``, ``add``, ...). Never expose
a port beyond machines you control.

Command line: ``python -m utils.retrieval.shard_search serve SHARD.faiss --port 12032 [--host H]``.
"""
from __future__ import annotations

import socket
import sys
import threading
from typing import Sequence

import numpy as np

from .faiss_index import _faiss
from .ivf_index import FaissIndex

__all__ = ["ShardServer", "ShardFront", "main"]


def _rpc():
    _faiss()
    from faiss.contrib import client_server, rpc

    # numpy >= 2 pickles arrays as numpy._core.multiarray._reconstruct, which the allow-list
    # of faiss 1.15's RestrictedUnpickler lacks: every search reply would be refused.
    rpc.safe_modules.add("numpy._core.multiarray")
    return client_server, rpc


class ShardServer:
    """Serve ``index`` on ``(host, port)`` with faiss's ``SearchServer`` (one thread per
    connection). ``port=0`` picks a free port (see :attr:`port`).

    Works for IVF indexes (float or binary) and flat ones (then ``set_nprobe`` is refused).
    """

    def __init__(self, index: FaissIndex, port: int = 0, host: str = "127.0.0.1") -> None:
        client_server, _ = _rpc()
        faiss = _faiss()
        self.index = index
        ivf = isinstance(index, (faiss.IndexIVF, faiss.IndexBinaryIVF))

        class Handler(client_server.SearchServer):
            def __init__(handler, conn):  # noqa: N805 - faiss's signature
                # Not SearchServer.__init__: its extract_index_ivf knows float IVF only.
                client_server.rpc.Server.__init__(handler, conn)
                handler.index = index
                handler.index_ivf = index if ivf else None

            def set_nprobe(handler, nprobe: int) -> None:  # noqa: N805
                if handler.index_ivf is None:
                    raise ValueError("this shard is a flat index: it has no nprobe")
                handler.index_ivf.nprobe = nprobe

            def get_metric_type(handler) -> int:  # noqa: N805 - attributes are not callable
                return int(getattr(handler.index, "metric_type", faiss.METRIC_L2))

            def log(handler, s):  # noqa: N805 - faiss logs every call to stderr
                pass

        self._handler = Handler
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(8)
        self.host, self.port = host, self._sock.getsockname()[1]
        self._closed = False

    def serve_forever(self) -> None:
        """Accept connections until :meth:`close`."""
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._handler(conn).exec_loop, daemon=True).start()

    def start(self) -> "ShardServer":
        """Serve in a background thread; returns self."""
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class ShardFront:
    """The front of several :class:`ShardServer` s: ``search(x, k)`` as one faiss index.

    Args:
        addresses: ``(host, port)`` of each shard server; the shards must hold disjoint ids
            of one gallery and share the metric.
    """

    def __init__(self, addresses: Sequence[tuple[str, int]]) -> None:
        client_server, _ = _rpc()
        faiss = _faiss()
        if not addresses:
            raise ValueError("a front needs at least one shard server")
        self._client = client_server.ClientIndex(list(addresses))
        metrics = set(self._client.pool.map(lambda sub: int(sub.get_metric_type()),
                                            self._client.sub_indexes))
        if len(metrics) != 1:
            raise ValueError(f"the shards disagree on their metric: {sorted(metrics)}")
        self.metric_type = metrics.pop()
        # ResultHeap's default keeps the lowest values (distances); similarities need the
        # highest.
        self.keep_max = self.metric_type == faiss.METRIC_INNER_PRODUCT
        self.ntotal = self._client.ntotal

    def set_nprobe(self, nprobe: int) -> None:
        self._client.set_nprobe(nprobe)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` over every shard: ``(D (nq, k) float32, I (nq, k) int64)``, best first."""
        faiss = _faiss()
        heap = faiss.ResultHeap(x.shape[0], k, keep_max=self.keep_max)
        for dist, ids in self._client.pool.imap(lambda sub: sub.search(x, k),
                                                self._client.sub_indexes):
            heap.add_result(dist, ids)
        heap.finalize()
        return heap.D, heap.I


def main(argv: list[str] | None = None) -> int:
    """``serve INDEX --port P [--host H]``: serve one index file until interrupted."""
    from utils.errors import OneLineParser

    from .ivf_index import read_ivf

    parser = OneLineParser(prog="python -m utils.retrieval.shard_search",
                           description="serve a faiss index shard (trusted networks only)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve one index file")
    serve.add_argument("index", help="an IVF shard or index file")
    serve.add_argument("--port", type=int, default=12032)
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to bind (default loopback; 0.0.0.0 for every one)")
    args = parser.parse_args(argv)
    try:
        index = read_ivf(args.index)
    except RuntimeError as exc:
        print(f"python -m utils.retrieval.shard_search: error: cannot read {args.index}: "
              f"{str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    server = ShardServer(index, args.port, args.host)
    print(f"serving {args.index} ({index.ntotal} items) on {server.host}:{server.port}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
