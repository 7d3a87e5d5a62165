"""--milvus from the command line (utils.cli.milvus_search): the same top-k as the flat
search, reuse, appends, filters, deletes, -e export, and one-line errors."""
from __future__ import annotations

import json

import pytest

from conftest import SEARCH_COMMON, TINY_SYNTHFACE, one_line_error

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytestmark = pytest.mark.usefixtures("one_thread")
TOPK = 5


def _search(run_cli, model, test_dir, out, *extra):
    return run_cli("--search", "--load", str(model), "--query", str(test_dir), *SEARCH_COMMON,
                   "--topk", str(TOPK), "--out", out, *extra)


def _result(tmp_path, out):
    return json.loads((tmp_path / out / "search.json").read_text())


def test_milvus_search_equals_flat_then_reuses_appends_filters_deletes(search_model, run_cli,
                                                                       tmp_path, capsys):
    model, gallery, test_dir = search_model
    db = str(tmp_path / "g.db")
    assert _search(run_cli, model, test_dir, "flat", "--gallery", str(gallery)) == 0
    flat = _result(tmp_path, "flat")
    assert _search(run_cli, model, test_dir, "mv", "--gallery", str(gallery), "--milvus",
                   db) == 0
    assert f"added {flat['gallery_size']}" in capsys.readouterr().out
    milvus = _result(tmp_path, "mv")
    assert milvus["index_type"] == "milvus" and milvus["collection"] == "opqn_tiny"
    assert milvus["gallery_size"] == flat["gallery_size"]
    assert len(milvus["queries"]) == len(flat["queries"]) > 0
    for got, want in zip(milvus["queries"], flat["queries"]):
        assert got["path"] == want["path"] and got["identity"] == want["identity"]
        assert [r["score"] for r in got["results"]] == pytest.approx(
            [r["score"] for r in want["results"]], abs=2e-5)
        # Paths of unequal scores agree (equal scores may be ordered differently).
        scores = [r["score"] for r in want["results"]]
        for i, (g, w) in enumerate(zip(got["results"], want["results"])):
            if scores.count(scores[i]) == 1 and (i + 1 < len(scores) or i == 0):
                assert g["path"] == w["path"] and g["correct"] == w["correct"]
    assert (tmp_path / "mv" / "search.png").is_file()

    # The second search reuses the collection; giving the folder again adds nothing.
    assert _search(run_cli, model, test_dir, "again", "--milvus", db) == 0
    assert "reused" in capsys.readouterr().out
    assert _result(tmp_path, "again")["queries"] == milvus["queries"]
    assert _search(run_cli, model, test_dir, "again", "--milvus", db, "--gallery",
                   str(gallery)) == 0
    assert "up to date" in capsys.readouterr().out

    some_identity = sorted(p.name for p in gallery.iterdir())[1]
    assert _search(run_cli, model, test_dir, "where", "--milvus", db, "--where",
                   f'identity == "{some_identity}"') == 0
    hits = [r for q in _result(tmp_path, "where")["queries"] for r in q["results"]]
    assert hits and {r["identity"] for r in hits} == {some_identity}

    best = milvus["queries"][0]["results"][0]["path"]
    assert _search(run_cli, model, test_dir, "deleted", "--milvus", db, "--milvus-delete",
                   best) == 0
    deleted = _result(tmp_path, "deleted")
    assert deleted["deleted"] == 1 and deleted["gallery_size"] == flat["gallery_size"] - 1
    assert best not in {r["path"] for q in deleted["queries"] for r in q["results"]}


def test_evaluate_writes_the_gallery_to_milvus(search_model, tiny_data_dir, run_cli, tmp_path,
                                               capsys):
    from utils.retrieval.milvus_gallery import MilvusGallery, MilvusModel

    model, _, _ = search_model
    db = str(tmp_path / "e.db")
    argv = ["-e", "--load", str(model), "--dataset", "synthface", "--data-dir",
            str(tiny_data_dir), *TINY_SYNTHFACE, *SEARCH_COMMON, "--out", "res", "--milvus", db]
    assert run_cli(*argv) == 0
    out = capsys.readouterr().out
    assert "added to opqn_tiny" in out
    train = tiny_data_dir / "synthface" / "train"
    expected = {str(p.resolve()) for p in train.rglob("*.png")}
    # A second -e adds nothing; the collection names the checkpoint it came from.
    assert run_cli(*argv) == 0
    assert "0 gallery images added" in capsys.readouterr().out
    import torch

    from utils.checkpoints import load_checkpoint, load_model
    from utils.retrieval.gallery_index import model_fingerprint

    loaded = load_model(load_checkpoint(model), torch.device("cpu"))
    owner = MilvusModel(model_fingerprint(loaded), "opqn", 2, 64, "tiny.tar")
    store = MilvusGallery.open(db, "opqn_tiny", owner)
    assert store.stored_paths() == expected


@pytest.mark.parametrize("extra,fragments", [
    (["--where", "identity == 1"], ["--where works with --milvus"]),
    (["--milvus", "x.txt"], ["ends in .db"]),
    (["--milvus", "g.db", "--milvus-delete", "a.png", "--gallery", "."],
     ["--milvus-delete and --gallery"]),
    (["--milvus", "g.db", "--index-type", "ivf"], ["drop --index-type"]),
    (["--milvus", "g.db", "--milvus-timeout", "0"], ["--milvus-timeout"]),
    (["--milvus", "nofolder/g.db"], ["does not exist"]),
])
def test_milvus_usage_errors(search_model, run_cli, capsys, no_debug, extra, fragments):
    model, _, test_dir = search_model
    assert _search(run_cli, model, test_dir, "o", *extra) == 2
    one_line_error(capsys, *fragments)


def test_rejected_filter_and_other_models_collection_are_one_line(search_model, run_cli,
                                                                   tmp_path, capsys, no_debug):
    from utils.retrieval.milvus_gallery import MilvusGallery, MilvusModel

    model, gallery, test_dir = search_model
    db = str(tmp_path / "g.db")
    assert _search(run_cli, model, test_dir, "o", "--milvus", db, "--gallery",
                   str(gallery)) == 0
    capsys.readouterr()
    written = (tmp_path / "o" / "search.json").read_text()
    assert _search(run_cli, model, test_dir, "o", "--milvus", db, "--where",
                   "identity innn 3") == 2
    one_line_error(capsys, "--where 'identity innn 3'", "Milvus refused it")
    other = MilvusGallery.open(db, "theirs", MilvusModel("b" * 64, "opqn", 2, 64, "other.tar"))
    other.close()
    assert _search(run_cli, model, test_dir, "o", "--milvus", db, "--milvus-collection",
                   "theirs") == 2
    one_line_error(capsys, "theirs", "another model", "other.tar")
    assert (tmp_path / "o" / "search.json").read_text() == written  # nothing overwritten


def test_interrupted_folder_build_stays_incomplete_and_resumes(tmp_path, monkeypatch):
    import torch

    from utils.cli import milvus_search
    from utils.retrieval.milvus_gallery import MilvusGallery, MilvusModel

    store = MilvusGallery.open(str(tmp_path / "b.db"), "g", MilvusModel("c" * 64, "opqn", 2, 4))
    items = [(f"/g/id{i % 3}/{i}.png", f"id{i % 3}") for i in range(10)]
    calls = []

    def encode(paths):
        calls.append(len(paths))
        if len(calls) == 2:
            raise KeyboardInterrupt  # during the second chunk
        return torch.ones(len(paths), 2, dtype=torch.long), torch.arange(len(paths))

    monkeypatch.setattr(milvus_search, "ADD_CHUNK", 4)
    with pytest.raises(KeyboardInterrupt):
        milvus_search.add_missing(store, items, encode=encode)
    assert len(store) == 4 and not store.complete  # the first chunk is kept, not served
    added, unreadable = milvus_search.add_missing(store, items, encode=encode)
    assert (added, unreadable) == (6, []) and calls == [4, 4, 4, 2]
    assert store.complete and len(store) == 10
