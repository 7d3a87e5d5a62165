"""--search and --export-faiss with --index-type ivf; sharded encoding (resume, staleness,
torchrun); only process 0 writes results."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SEARCH_COMMON, one_line_error

faiss = pytest.importorskip("faiss")
pytestmark = pytest.mark.usefixtures("one_thread")
TOPK = 5


def _search(run_cli, model, gallery, test_dir, out, *extra):
    return run_cli("--search", "--load", str(model), "--gallery", str(gallery), "--query",
                   str(test_dir), *SEARCH_COMMON, "--topk", str(TOPK), "--out", out, *extra)


def _result(tmp_path, out):
    return json.loads((tmp_path / out / "search.json").read_text())


def _scores(result):
    return [[r["score"] for r in q["results"]] for q in result["queries"]]


def test_ivf_search_all_lists_equals_flat_and_fewer_lists_stay_valid(search_model, run_cli,
                                                                     tmp_path, capsys):
    model, gallery, test_dir = search_model
    assert _search(run_cli, model, gallery, test_dir, "flat") == 0
    flat = _result(tmp_path, "flat")
    assert flat["index_type"] == "flat" and "nlist" not in flat
    index = str(tmp_path / "gallery.index.tar")
    assert _search(run_cli, model, gallery, test_dir, "ivf", "--index-type", "ivf",
                   "--nlist", "16", "--nprobe", "16", "--index", index) == 0
    assert "IVF index built" in capsys.readouterr().out
    ivf = _result(tmp_path, "ivf")
    assert (ivf["index_type"], ivf["nlist"], ivf["nprobe"]) == ("ivf", 16, 16)
    assert len(ivf["queries"]) == len(flat["queries"]) > 0
    for got, want in zip(_scores(ivf), _scores(flat)):
        assert got == pytest.approx(want, abs=1e-5)

    # Fewer lists: the IVF files are reused; every hit is a gallery file, ranked by score,
    # and no rank beats the exhaustive ranking.
    assert _search(run_cli, model, gallery, test_dir, "few", "--index-type", "ivf",
                   "--nlist", "16", "--nprobe", "2", "--index", index) == 0
    out = capsys.readouterr().out
    assert "gallery index reused" in out and "IVF index reused" in out
    few = _result(tmp_path, "few")
    assert few["nprobe"] == 2
    assert sum(len(row["results"]) for row in few["queries"]) > 0
    for row, want in zip(few["queries"], _scores(flat)):
        scores = [r["score"] for r in row["results"]]  # lists may be short: 36 items, 16 lists
        assert len(scores) <= TOPK and scores == sorted(scores, reverse=True)
        assert all(Path(r["path"]).is_file() for r in row["results"])
        assert all(s <= w + 1e-5 for s, w in zip(scores, want))


def test_export_faiss_ivf_searched_with_faiss_equals_engine(search_model, tiny_data_dir,
                                                            run_cli, tmp_path):
    from data.datasets import ImageList
    from data.loaders import make_loader
    from data.transforms import build_transform
    from utils.checkpoints.store import load_checkpoint
    from utils.retrieval.encoding import encode_faiss_queries, encode_gallery, encode_queries
    from utils.retrieval.adc import search_adc
    from utils.checkpoints.loading import load_model

    model_path, _gallery, test_dir = search_model
    assert run_cli("-e", "--dataset", "synthface", "--data-dir", str(tiny_data_dir),
                   *SEARCH_COMMON, "--load", str(model_path), "--eval-every", "0",
                   "--export-faiss", "g.faiss", "--index-type", "ivf", "--nlist", "16",
                   "--nprobe", "16") == 0
    index = faiss.read_index(str(tmp_path / "results" / "g.faiss"))
    assert isinstance(index, faiss.IndexIVFPQ) and (index.nlist, index.nprobe) == (16, 16)
    assert not index.by_residual and index.ntotal == 36

    model = load_model(load_checkpoint(model_path), torch.device("cpu"))
    def loader(paths):
        return make_loader(ImageList(paths, build_transform(32, train=False)), 12, 0,
                           torch.device("cpu"))

    ids = (tmp_path / "results" / "g.ids.csv").read_text().splitlines()[1:]
    codes, _ = encode_gallery(model, loader([row.split(",")[1] for row in ids]),
                              torch.device("cpu"), progress=False)
    queries = [str(p) for p in sorted(test_dir.rglob("*.png"))]
    tables, _ = encode_queries(model, loader(queries), torch.device("cpu"), progress=False)
    vectors, _ = encode_faiss_queries(model, loader(queries), torch.device("cpu"),
                                      progress=False)
    dist, found = index.search(vectors.numpy(), TOPK)
    want, _ = search_adc(tables, codes, TOPK)
    assert torch.allclose(torch.from_numpy(dist), want, atol=1e-5)
    assert (found >= 0).all()


def test_interrupted_encoding_resumes_from_finished_shards(search_model, run_cli, tmp_path,
                                                           capsys, monkeypatch, no_debug):
    import utils.retrieval.encoding
    import utils.retrieval.shards

    model, gallery, test_dir = search_model
    monkeypatch.setattr(utils.retrieval.shards, "SHARD_ITEMS", 10)  # 36 images: 4 shards
    real = utils.retrieval.encoding.encode_gallery
    calls = []

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("power cut")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(utils.retrieval.encoding, "encode_gallery", interrupted)
    index = tmp_path / "g.index.tar"
    assert _search(run_cli, model, gallery, test_dir, "a", "--index", str(index)) == 1
    assert "power cut" in capsys.readouterr().err
    shards = sorted((tmp_path / "g.index.tar.shards").iterdir())
    assert len(shards) == 2 and not index.exists()

    calls.clear()
    monkeypatch.setattr(utils.retrieval.encoding, "encode_gallery",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _search(run_cli, model, gallery, test_dir, "a", "--index", str(index)) == 0
    assert "2 of its 4 shard(s) reused" in capsys.readouterr().out
    assert len(calls) == 2  # only the two unfinished shards were encoded
    assert not (tmp_path / "g.index.tar.shards").exists()  # merged, then removed
    assert _search(run_cli, model, gallery, test_dir, "b", "--index", str(tmp_path / "x.tar"),
                   "--rebuild-index") == 0
    assert _result(tmp_path, "a")["queries"] == _result(tmp_path, "b")["queries"]


def test_stale_shards_and_ivf_are_rebuilt(search_model, run_cli, tmp_path, capsys,
                                          monkeypatch, no_debug):
    import shutil

    import utils.retrieval.encoding
    import utils.retrieval.shards

    model, gallery_src, test_dir = search_model
    gallery = tmp_path / "gallery"
    shutil.copytree(gallery_src, gallery)
    monkeypatch.setattr(utils.retrieval.shards, "SHARD_ITEMS", 18)  # 2 shards
    real = utils.retrieval.encoding.encode_gallery
    calls = []
    monkeypatch.setattr(utils.retrieval.encoding, "encode_gallery",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    index = tmp_path / "g.index.tar"
    ivf = ["--index-type", "ivf", "--nlist", "4", "--index", str(index)]
    assert _search(run_cli, model, gallery, test_dir, "a", *ivf) == 0
    capsys.readouterr()
    # A shard of an older gallery is not reused: the gallery file changed after it was made.
    left = tmp_path / "g.index.tar.shards"
    left.mkdir()
    old = utils.retrieval.shards.ShardedEncoder(None, left, ("m", "g"), utils.retrieval.shards.DistInfo())
    for start, end in utils.retrieval.shards.shard_ranges(36, 1):
        utils.retrieval.shards.save_checkpoint({"kind": utils.retrieval.shards.SHARD_KIND, "start": start,
                                      "end": end, "codes": torch.zeros(0, 2),
                                      "positions": torch.zeros(0),
                                      "model_fingerprint": "m", "gallery_fingerprint": "g"},
                                     old._file(start, end))
    touched = next(gallery.rglob("*.png"))
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    calls.clear()
    assert _search(run_cli, model, gallery, test_dir, "b", *ivf) == 0
    out = capsys.readouterr().out
    assert "gallery index rebuilt (the gallery changed" in out
    assert "IVF index rebuilt" in out and "reused" not in out
    assert len(calls) == 2
    meta = json.loads((tmp_path / "g.index.tar.ivf4" / "meta.json").read_text())
    from utils.retrieval.gallery_index import load_index

    assert meta["gallery_fingerprint"] == load_index(index).gallery_fingerprint
    assert _scores(_result(tmp_path, "a")) == _scores(_result(tmp_path, "b"))


def test_ivf_flag_errors(search_model, run_cli, tmp_path, capsys, no_debug):
    model, gallery, test_dir = search_model
    assert _search(run_cli, model, gallery, test_dir, "o", "--nlist", "4") == 2
    one_line_error(capsys, "--nlist applies to --index-type ivf")
    assert _search(run_cli, model, gallery, test_dir, "o", "--index-type", "ivf",
                   "--nlist", "4", "--nprobe", "8") == 2
    one_line_error(capsys, "--nprobe 8 exceeds --nlist 4")
    assert _search(run_cli, model, gallery, test_dir, "o", "--index-type", "ivf",
                   "--nlist", "0") == 2
    one_line_error(capsys, "--nlist must be positive")
    assert _search(run_cli, model, gallery, test_dir, "o", "--index-type", "ivf",
                   "--nlist", "64") == 2
    one_line_error(capsys, "--nlist 64 exceeds the 36 gallery items")
    assert not (tmp_path / "o" / "search.json").exists()
    assert run_cli("--len", "8", "--num", "2", "--index-type", "ivf") == 2
    one_line_error(capsys, "--index-type ivf works with --search or -e --export-faiss")


def test_torchrun_builds_sharded_ivf_equal_to_one_process_and_reused(search_model, run_cli,
                                                                     tmp_path, capsys):
    model, gallery, test_dir = search_model
    index = tmp_path / "g.index.tar"
    ivf = ["--index-type", "ivf", "--nlist", "8", "--nprobe", "8"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(REPO / "opqn_main.py"), "--search", "--load", str(model), "--gallery",
           str(gallery), "--query", str(test_dir), *SEARCH_COMMON, "--device", "cpu",
           "--topk", str(TOPK), "--out", str(tmp_path / "dist"), "--index", str(index), *ivf]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "process 0: shard 1/1 encoded (gallery items 0-17)" in out
    assert "process 1: shard 1/1 encoded (gallery items 18-35)" in out
    assert out.count("search: ") == 1  # only process 0 searched and wrote results
    shards = sorted(p.name for p in (tmp_path / "g.index.tar.ivf8").glob("shard-*.faiss"))
    assert shards == ["shard-0000000000-0000000018.faiss", "shard-0000000018-0000000036.faiss"]
    dist = _result(tmp_path, "dist")

    # One process, a fresh index: the same results; the sharded one is then reused.
    assert _search(run_cli, model, gallery, test_dir, "one", *ivf, "--index",
                   str(tmp_path / "one.index.tar")) == 0
    assert _result(tmp_path, "one")["queries"] == dist["queries"]
    capsys.readouterr()
    assert _search(run_cli, model, gallery, test_dir, "again", *ivf, "--index",
                   str(index)) == 0
    out = capsys.readouterr().out
    assert "gallery index reused" in out and "IVF index reused" in out
    assert _result(tmp_path, "again")["queries"] == dist["queries"]
