"""--search: index built once and reused, ranks equal search_adc, grid and page, bad inputs."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import SEARCH_COMMON as COMMON, one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(search_model):
    """A tiny synthface model trained 2 epochs, and a private copy of the gallery."""
    return search_model


def _search(run_cli, model, gallery, *extra):
    return run_cli("--search", "--load", str(model), "--gallery", str(gallery), *COMMON, *extra)


def test_search_json_ranks_grid_and_page(trained, run_cli, tmp_path, capsys):
    from data.datasets import ImageList
    from data.loaders import make_loader
    from data.transforms import build_transform
    from utils.checkpoints.store import load_checkpoint
    from utils.retrieval.encoding import encode_queries
    from utils.retrieval.gallery_index import load_index
    from utils.cli.gallery_view import grid_layout
    from utils.retrieval.adc import search_adc
    from utils.checkpoints.loading import load_model

    model_path, gallery, test_dir = trained
    ids = sorted(p.name for p in test_dir.iterdir())
    queries = [str(sorted((test_dir / ids[0]).iterdir())[0]),
               str(sorted((test_dir / ids[3]).iterdir())[1]), str(test_dir / ids[5])]
    assert _search(run_cli, model_path, gallery, "--query", *queries, "--topk", "4") == 0
    out = capsys.readouterr().out
    assert "gallery index built" in out

    result = json.loads((tmp_path / "results" / "search.json").read_text())
    assert result["topk"] == 4 and result["gallery_size"] == 36
    assert result["unreadable_queries"] == []
    rows = result["queries"]
    assert len(rows) == 2 + len(list((test_dir / ids[5]).iterdir()))
    assert rows[0]["identity"] == ids[0] and rows[1]["identity"] == ids[3]
    for row in rows:
        assert [r["rank"] for r in row["results"]] == [1, 2, 3, 4]
        scores = [r["score"] for r in row["results"]]
        assert scores == sorted(scores, reverse=True) and all(0 < s <= 2 for s in scores)
        for r in row["results"]:
            assert Path(r["path"]).is_file()
            assert r["identity"] == Path(r["path"]).parent.name
            assert r["correct"] == (r["identity"] == row["identity"])

    # The same ranking from the evaluation's own encoders and search_adc.
    index = load_index(result["index"])
    assert index.codes.dtype == torch.uint8 and tuple(index.codes.shape) == (36, 2)
    model = load_model(load_checkpoint(model_path), torch.device("cpu"))
    paths = [row["path"] for row in rows]
    loader = make_loader(ImageList(paths, build_transform(32, train=False)), 12, 0,
                         torch.device("cpu"))
    tables, _ = encode_queries(model, loader, torch.device("cpu"), progress=False)
    scores, positions = search_adc(tables, index.codes, 4)
    for q, row in enumerate(rows):
        assert [r["path"] for r in row["results"]] == \
            [str(gallery / index.paths[i]) for i in positions[q].tolist()]
        assert [r["score"] for r in row["results"]] == pytest.approx(scores[q].tolist(), abs=1e-6)

    # One row per query, k + 1 columns; the page embeds every cell's image.
    with Image.open(tmp_path / "results" / "search.png") as png:
        assert png.size == grid_layout(len(rows), 4 + 1)
    page = (tmp_path / "results" / "search.html").read_text()
    assert page.count('src="data:image/jpeg;base64,') == len(rows) * 5
    assert page.count("<tr>") == len(rows) and "file://" not in page


def test_index_reused_then_rebuilt_when_gallery_or_model_changes(trained, run_cli, tmp_path,
                                                                 capsys, monkeypatch, no_debug):
    import utils.retrieval.encoding
    from utils.checkpoints.store import load_checkpoint, save_checkpoint

    model_path, gallery_src, test_dir = trained
    gallery = tmp_path / "gallery"
    shutil.copytree(gallery_src, gallery)
    query = str(next((test_dir / sorted(os.listdir(test_dir))[1]).iterdir()))
    assert _search(run_cli, model_path, gallery, "--query", query) == 0
    assert "gallery index built" in capsys.readouterr().out
    first = json.loads((tmp_path / "results" / "search.json").read_text())

    real = utils.retrieval.encoding.encode_gallery

    def forbidden(*args, **kwargs):
        raise AssertionError("the gallery was encoded again")

    monkeypatch.setattr(utils.retrieval.encoding, "encode_gallery", forbidden)
    assert _search(run_cli, model_path, gallery, "--query", query) == 0
    assert "gallery index reused" in capsys.readouterr().out
    again = json.loads((tmp_path / "results" / "search.json").read_text())
    assert again["queries"] == first["queries"] and again["index_status"] == "reused"

    # Touching one gallery file makes the index stale: it is rebuilt, never used silently.
    touched = next(gallery.rglob("*.png"))
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert _search(run_cli, model_path, gallery, "--query", query) == 1  # encode was forbidden
    capsys.readouterr()
    calls = []
    monkeypatch.setattr(utils.retrieval.encoding, "encode_gallery",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _search(run_cli, model_path, gallery, "--query", query) == 0
    assert "gallery index rebuilt (the gallery changed" in capsys.readouterr().out
    assert calls == [1]

    # Another model: the default index is rebuilt; a named index is a one-line error.
    other = load_checkpoint(model_path)
    other["quantizer"]["assignment"] = other["quantizer"]["assignment"].flip(-1).contiguous()
    del other["format"], other["format_version"]
    save_checkpoint(other, tmp_path / "other.tar")
    assert _search(run_cli, tmp_path / "other.tar", gallery, "--query", query,
                   "--index", "named.tar") == 0
    capsys.readouterr()
    assert _search(run_cli, model_path, gallery, "--query", query, "--index", "named.tar") == 2
    one_line_error(capsys, "--index named.tar was built by another model")
    assert _search(run_cli, model_path, gallery, "--query", query, "--index", "named.tar",
                   "--rebuild-index") == 0
    assert "rebuilt (--rebuild-index)" in capsys.readouterr().out
    # The default index belongs to the checkpoint path: retraining it (new weights at the
    # same path) rebuilds the index.
    shutil.copy(model_path, tmp_path / "m.tar")
    assert _search(run_cli, tmp_path / "m.tar", gallery, "--query", query) == 0
    assert "gallery index built" in capsys.readouterr().out
    shutil.copy(tmp_path / "other.tar", tmp_path / "m.tar")
    assert _search(run_cli, tmp_path / "m.tar", gallery, "--query", query) == 0
    assert "gallery index rebuilt (the model changed)" in capsys.readouterr().out


def test_unreadable_and_missing_queries_are_reported_and_others_go_on(trained, run_cli,
                                                                      tmp_path, capsys):
    model_path, gallery, test_dir = trained
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    good = str(next((test_dir / sorted(os.listdir(test_dir))[2]).iterdir()))
    assert _search(run_cli, model_path, gallery, "--query", str(bad), good,
                   str(tmp_path / "nope.jpg"), "--topk", "3") == 0
    out = capsys.readouterr().out
    assert str(bad) in out and "nope.jpg" in out
    result = json.loads((tmp_path / "results" / "search.json").read_text())
    assert [q["path"] for q in result["queries"]] == [good]
    assert set(result["unreadable_queries"]) == {str(bad), str(tmp_path / "nope.jpg")}


def test_bad_inputs_are_one_line_errors(trained, run_cli, tmp_path, capsys, no_debug):
    model_path, gallery, test_dir = trained
    query = str(next((test_dir / sorted(os.listdir(test_dir))[0]).iterdir()))
    (tmp_path / "empty").mkdir()
    assert _search(run_cli, model_path, tmp_path / "empty", "--query", query) == 2
    one_line_error(capsys, "gallery folder has no images")
    assert not (tmp_path / "results").exists()

    torch.save({"weights": torch.ones(2), "step": 3}, tmp_path / "odd.tar")
    assert _search(run_cli, tmp_path / "odd.tar", gallery, "--query", query) == 1
    one_line_error(capsys, "fits neither", "weights, step")

    assert _search(run_cli, model_path, gallery, "--query", str(tmp_path / "none.jpg")) == 2
    one_line_error(capsys, "no query images")
    assert run_cli("--search", "-e", "--load", str(model_path)) == 2
    one_line_error(capsys, "separate modes")
    assert run_cli("--gallery", str(gallery), "--len", "8", "--num", "2") == 2
    one_line_error(capsys, "--gallery works with --search")

    # An index file that is not an index: one line, not a crash.
    (tmp_path / "junk.tar").write_bytes(b"PK\x03\x04junk")
    assert _search(run_cli, model_path, gallery, "--query", query, "--index", "junk.tar") == 1
    one_line_error(capsys, "junk.tar")


def test_index_holds_uint8_codes_and_paths_only(tmp_path):
    """A large gallery's index costs M bytes per item (8 at 64 bits) plus its paths."""
    from utils.retrieval.gallery_index import GalleryIndex, load_index, save_index

    n, m = 200_000, 8
    paths = [f"id{i // 50:05d}/{i:07d}.jpg" for i in range(n)]
    codes = torch.randint(0, 256, (n, m), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    save_index(GalleryIndex(tmp_path, paths, codes, "a" * 64, "b" * 64), tmp_path / "i.tar")
    size = (tmp_path / "i.tar").stat().st_size
    path_bytes = sum(len(p) for p in paths)
    assert size < n * m + path_bytes + n * 12 + 65536, size
    loaded = load_index(tmp_path / "i.tar")
    assert loaded.codes.dtype == torch.uint8 and torch.equal(loaded.codes, codes)
    assert loaded.paths == paths and loaded.identity(0) == "id00000"


def test_gallery_without_identity_folders(trained, run_cli, tmp_path):
    """Identities unknown: results carry no identity and no hit/miss verdict."""
    _model, gallery, test_dir = trained
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(gallery.rglob("*.png"))[::6]:
        shutil.copy(path, flat / path.name)
    query = str(next((test_dir / sorted(os.listdir(test_dir))[0]).iterdir()))
    assert _search(run_cli, trained[0], flat, "--query", query, "--topk", "3") == 0
    result = json.loads((tmp_path / "results" / "search.json").read_text())
    assert result["gallery_size"] == 6
    (row,) = result["queries"]
    assert row["identity"] is None and len(row["results"]) == 3
    assert all(r["identity"] is None and r["correct"] is None for r in row["results"])
