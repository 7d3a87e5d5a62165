"""utils.retrieval.milvus_gallery on Milvus Lite: exact top-k for every method (ties included),
filters, deletes, the owner check, interrupted builds, and errors that name the server."""
from __future__ import annotations

import pickle
import socket
import time
from pathlib import Path

import pytest
import torch

from models import NetConfig
from models.methods import build_head, method_names
from utils.errors import UsageError
from utils.retrieval.adc import search_adc

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
from utils.retrieval.milvus_gallery import (  # noqa: E402
    MilvusGallery,
    MilvusModel,
    collection_name,
    sparse_codes,
    sparse_tables,
)

METHODS = method_names()

N, Q, TOPK = 600, 12, 10


def head_for(method: str):
    torch.manual_seed(0)
    if method == "dcdh":  # L bits: M = 16 books of 2 words
        config = NetConfig(num_books=16, num_words=2, feature_dim=16, num_classes=4,
                            method=method)
    else:
        config = NetConfig(num_books=4, num_words=8 if method == "opqn" else 16,
                            feature_dim=32, num_classes=4, method=method)
    return build_head(config).eval(), config


def owner(config: NetConfig, fingerprint: str = "a" * 64) -> MilvusModel:
    return MilvusModel(fingerprint, config.method, config.num_books, config.num_words, "x.tar")


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "gallery.db")


def paths_for(n: int) -> list[str]:
    return [f"/g/id{i % 5}/{i:05d}.png" for i in range(n)]


def check_topk(scores, paths, tables, codes, all_paths, k):
    """Milvus's top-k equals the engine's: the same scores, the same items above the k-th
    score, and items at the k-th score (ties) that truly score it."""
    want_scores, want_index = search_adc(tables, codes, k)
    assert scores.shape == want_scores.shape
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=2e-5)
    books = torch.arange(codes.shape[1])
    exact = torch.stack([t[books, codes.long()].sum(1) for t in tables])  # (Q, N)
    position = {p: i for i, p in enumerate(all_paths)}
    for q in range(tables.shape[0]):
        kth = float(want_scores[q, -1])
        above_want = {all_paths[i] for i, s in zip(want_index[q].tolist(),
                                                   want_scores[q].tolist()) if s > kth + 2e-5}
        above_got = {p for p, s in zip(paths[q], scores[q].tolist()) if s > kth + 2e-5}
        assert above_got == above_want
        for p, s in zip(paths[q], scores[q].tolist()):
            assert float(exact[q, position[p]]) == pytest.approx(s, abs=2e-5)


@pytest.mark.parametrize("method", METHODS)
def test_topk_equals_engine_for_every_method_with_ties(method, db):
    head, config = head_for(method)
    torch.manual_seed(1)
    with torch.no_grad():
        codes = head.encode(torch.randn(N, config.feature_dim))
        tables = head.query_tables(torch.randn(Q, config.feature_dim))
    codes[100:140] = codes[7]  # 41 items share one code: exact ties across the k-th place
    tables[0] = tables[0] * 0 + 1.0  # a constant table: every item ties
    gallery = MilvusGallery.open(db, "g", owner(config))
    all_paths = paths_for(N)
    assert gallery.add(all_paths, [p.split("/")[2] for p in all_paths], codes) == N
    assert len(gallery) == N
    scores, paths, identities = gallery.search(tables, TOPK)
    check_topk(scores, paths, tables, codes, all_paths, TOPK)
    assert all(len(row) == TOPK for row in paths)
    assert identities[1] == [p.split("/")[2] for p in paths[1]]
    # Ties come ordered by path: the output does not depend on Milvus's internal order.
    for q in range(Q):
        pairs = list(zip((-scores[q]).tolist(), paths[q]))
        assert pairs == sorted(pairs)


def test_sparse_vectors_give_the_asymmetric_score():
    torch.manual_seed(0)
    tables = torch.randn(3, 4, 5)
    codes = torch.randint(0, 5, (7, 4))
    vectors, offsets = sparse_tables(tables)
    items = sparse_codes(codes, 5)
    assert all(v >= 0 for vec in vectors for v in vec.values())
    for q in range(3):
        for n in range(7):
            dot = sum(vectors[q].get(j, 0.0) * w for j, w in items[n].items()) + offsets[q]
            want = float(tables[q, torch.arange(4), codes[n]].sum())
            assert dot == pytest.approx(want, abs=1e-5)


def test_filter_delete_append_and_identity(db):
    head, config = head_for("opqn")
    with torch.no_grad():
        codes = head.encode(torch.randn(N, config.feature_dim))
        tables = head.query_tables(torch.randn(Q, config.feature_dim))
    all_paths = paths_for(N)
    identities = [p.split("/")[2] for p in all_paths]
    gallery = MilvusGallery.open(db, "g", owner(config))
    gallery.add(all_paths[:400], identities[:400], codes[:400])
    gallery.add(all_paths[300:], identities[300:], codes[300:])  # overlaps: stored once
    assert len(gallery) == N and gallery.stored_paths() == set(all_paths)

    scores, paths, ids = gallery.search(tables, TOPK, where='identity in ["id1", "id3"]')
    keep = [i for i, ident in enumerate(identities) if ident in ("id1", "id3")]
    check_topk(scores, paths, tables, codes[keep], [all_paths[i] for i in keep], TOPK)
    assert {i for row in ids for i in row} <= {"id1", "id3"}
    assert gallery.has_identity("id1") and not gallery.has_identity("nobody")

    gone = all_paths[:50]
    assert gallery.delete(gone) == 50
    assert len(gallery) == N - 50
    scores, paths, _ = gallery.search(tables, TOPK)
    check_topk(scores, paths, tables, codes[50:], all_paths[50:], TOPK)
    # Reopened from the file: the same collection, no rebuild.
    gallery.close()
    again = MilvusGallery.open(db, "g", owner(config))
    assert len(again) == N - 50


def test_fewer_items_than_k_are_padded(db):
    head, config = head_for("gpq")
    with torch.no_grad():
        codes = head.encode(torch.randn(3, config.feature_dim))
        tables = head.query_tables(torch.randn(2, config.feature_dim))
    gallery = MilvusGallery.open(db, "g", owner(config))
    gallery.add(paths_for(3), [None] * 3, codes)
    scores, paths, ids = gallery.search(tables, 5)
    assert [len(p) for p in paths] == [3, 3] and ids[0] == ["", "", ""]
    assert torch.isinf(scores[:, 3:]).all() and torch.isfinite(scores[:, :3]).all()


def test_another_models_collection_is_refused_and_rebuild_replaces_it(db):
    _, config = head_for("opqn")
    gallery = MilvusGallery.open(db, "g", owner(config, "a" * 64))
    gallery.add(["/x.png"], ["a"], torch.zeros(1, config.num_books, dtype=torch.long))
    gallery.close()
    with pytest.raises(UsageError, match="holds the codes of another model.*x.tar"):
        MilvusGallery.open(db, "g", owner(config, "b" * 64))
    fresh = MilvusGallery.open(db, "g", owner(config, "b" * 64), rebuild=True)
    assert len(fresh) == 0


def test_interrupted_build_is_refused_until_finished(db, monkeypatch):
    head, config = head_for("opqn")
    with torch.no_grad():
        codes = head.encode(torch.randn(N, config.feature_dim))
        tables = head.query_tables(torch.randn(2, config.feature_dim))
    gallery = MilvusGallery.open(db, "g", owner(config))
    calls = []
    real_upsert = gallery._client.upsert

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr("utils.retrieval.milvus_gallery.INSERT_BATCH", 200)
    monkeypatch.setattr(gallery._client, "upsert", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        gallery.add(paths_for(N), [None] * N, codes)
    monkeypatch.undo()
    assert not gallery.complete
    with pytest.raises(UsageError, match="incomplete"):
        gallery.search(tables, 3)
    gallery.add(paths_for(N), [None] * N, codes)  # the build is finished
    assert gallery.complete and len(gallery) == N
    assert len(gallery.search(tables, 3)[1][0]) == 3


def test_bad_filter_and_bad_input_are_one_line_errors(db):
    head, config = head_for("opqn")
    gallery = MilvusGallery.open(db, "g", owner(config))
    gallery.add(["/a/b.png"], ["a"], torch.zeros(1, config.num_books, dtype=torch.long))
    tables = torch.randn(1, config.num_books, config.num_words)
    for where in ('identity innn ["a"]', "nofield == 1"):
        with pytest.raises(UsageError, match="--where") as err:
            gallery.search(tables, 3, where=where)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="do not match"):
        gallery.search(torch.randn(1, config.num_books + 1, config.num_words), 3)
    with pytest.raises(ValueError, match="outside"):
        gallery.add(["/c.png"], ["c"], torch.full((1, config.num_books), config.num_words))
    with pytest.raises(UsageError, match="ends in .db"):
        MilvusGallery.open(str(Path(db).with_suffix(".txt")), "g", owner(config))


def test_collection_name_from_checkpoint():
    assert collection_name("/runs/opqn-36bits 6x64.tar") == "opqn_opqn_36bits_6x64"
    assert collection_name("models/9.pth") == "opqn_9"


def test_unreachable_and_hung_servers_fail_in_bounded_time_naming_the_uri():
    _, config = head_for("opqn")
    with socket.socket() as closed:  # a port that nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(UsageError, match=f"127.0.0.1:{port}.*cannot connect within 2 s"):
        MilvusGallery.open(f"http://127.0.0.1:{port}", "g", owner(config), timeout=2)
    assert time.monotonic() - start < 10

    silent = socket.socket()  # accepts and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    start = time.monotonic()
    try:
        with pytest.raises(UsageError, match=f"--milvus {uri}: cannot connect within 2 s"):
            MilvusGallery.open(uri, "g", owner(config), timeout=2)
    finally:
        silent.close()
    assert time.monotonic() - start < 10


def _listening_ports() -> set[int]:
    """Loopback TCP ports in LISTEN state that belong to this process."""
    import os

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class _WritesAFile:
    """Unpickling this calls numpy.savetxt(target, ...): the payload of the faiss RPC attack."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        import numpy

        return numpy.savetxt, (self.target, numpy.array([1.0]))


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_crafted_pickles_sent_to_every_port_we_open_execute_nothing(db, tmp_path):
    before = _listening_ports()
    _, config = head_for("opqn")
    gallery = MilvusGallery.open(db, "g", owner(config))
    ports = _listening_ports() - before
    target = tmp_path / "pwned.txt"
    payloads = [pickle.dumps(_WritesAFile(str(target)), protocol=p) for p in (2, 4, 5)]
    # faiss's rpc framing: an 8-byte length, then the pickle
    payloads += [len(p).to_bytes(8, "little") + p for p in payloads[:1]]
    for port in ports | before:
        for payload in payloads:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                    conn.sendall(payload)
                    conn.settimeout(1)
                    try:
                        conn.recv(1024)
                    except OSError:
                        pass
            except OSError:
                continue
    time.sleep(0.5)
    assert not target.exists()
    assert len(gallery) == 0  # the database still answers


def test_no_module_serves_or_reads_pickles_over_the_network():
    repo = Path(__file__).resolve().parents[1]
    banned = ("faiss.contrib.rpc", "faiss.contrib.client_server", "client_server",
              "pickle.loads", "pickle.load(", "socket.socket(", ".listen(")
    offenders = []
    for path in repo.rglob("*.py"):
        top = path.relative_to(repo).parts[0]
        if top in ("tests", "results") or top.startswith("."):
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(repo)}: {b}" for b in banned if b in text]
    assert offenders == []
