"""The authors' released checkpoint format (docs/paper.md, "The authors' released checkpoints"): loaded as is, converted, resumed."""
import sys

import pytest
import torch
import torch.nn.functional as F

from authors_model import save_authors_checkpoint
from conftest import TINY_SYNTHFACE, one_line_error
from utils.checkpoints.store import CheckpointError, load_checkpoint
from utils.checkpoints.loading import load_model

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("input_size,width,books,words,word_dim", [
    (32, 16, 4, 16, 16), (32, 64, 2, 64, 64), (112, 16, 8, 16, 32), (112, 64, 4, 16, 16)])
def test_features_codes_and_tables_equal_theirs(tmp_path, one_thread, input_size, width,
                                                books, words, word_dim):
    path = tmp_path / "theirs.tar"
    net, mlp = save_authors_checkpoint(path, input_size, width, books, words, word_dim, seed=3)
    checkpoint = load_checkpoint(path)
    config = checkpoint["config"]
    assert (config["input_size"], config["width"], config["feature_dim"]) == \
        (input_size, width, books * word_dim)
    assert (config["num_books"], config["num_words"]) == (books, words)
    model = load_model(checkpoint, CPU)
    images = torch.randn(3, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, ours = net(images), model(images)
    # Not a trivial match: the features are far from zero and vary across images.
    assert theirs.abs().mean() > 0.1 and (theirs[0] - theirs[1]).abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())

    sub = theirs.reshape(3, books, word_dim)
    logits = torch.einsum("bmd,mdk->bmk", sub, mlp.detach())
    their_tables = torch.softmax(torch.einsum("bmd,mdk->bmk", F.normalize(sub, dim=-1),
                                              mlp.detach()), dim=-1)
    torch.testing.assert_close(model.quantizer.lookup_tables(ours), their_tables,
                               rtol=1e-4, atol=1e-5)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3  # float noise cannot flip these
    assert clear.float().mean() > 0.8
    codes = model.quantizer.encode(ours).long()
    assert torch.equal(codes[clear], logits.argmax(-1)[clear])


def test_bias_folding_is_what_makes_them_equal(tmp_path):
    """Dropping the stage conv bias instead of folding it would change the features."""
    path = tmp_path / "theirs.tar"
    net, _ = save_authors_checkpoint(path, 32, 16, 2, 16, 256)
    raw = torch.load(path, weights_only=True)
    assert raw["backbone"]["module.layer1.0.bias"].abs().max() > 0.1
    checkpoint = load_checkpoint(path)
    folded = checkpoint["backbone"]["stages.0.0.1.running_mean"]
    expected = raw["backbone"]["module.layer1.1.running_mean"] - \
        raw["backbone"]["module.layer1.0.bias"]
    torch.testing.assert_close(folded, expected)


def test_converter_round_trip_and_errors(tmp_path, capsys):
    from utils.checkpoints import convert as convert_authors

    theirs = tmp_path / "theirs.tar"
    net, _ = save_authors_checkpoint(theirs, 32, 16, 2, 64, 256, seed=5)
    out = tmp_path / "ours.tar"
    assert convert_authors.main([str(theirs), str(out)]) == 0
    assert "new class head" in capsys.readouterr().out
    converted = load_checkpoint(out)  # our format now: marker present, weights_only
    assert converted["format"] == "opqn-checkpoint" and "criterion" not in converted \
        and "class_weights" not in converted
    direct = load_model(load_checkpoint(theirs), CPU)
    again = load_model(converted, CPU)
    for a, b in zip(direct.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(images), net(images), rtol=1e-4, atol=1e-4)

    # Existing output, already-converted input and a foreign file: one line each.
    before = out.read_bytes()
    assert convert_authors.main([str(theirs), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert convert_authors.main([str(out), str(tmp_path / "x.tar")]) == 1
    err = capsys.readouterr().err
    assert "already in this project's format" in err and len(err.splitlines()) == 1
    torch.save({"state_dict": {}, "epoch": 3}, tmp_path / "foreign.tar")
    assert convert_authors.main([str(tmp_path / "foreign.tar"), str(tmp_path / "y.tar")]) == 1
    err = capsys.readouterr().err
    assert "state_dict, epoch" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "y.tar").exists()


def test_unknown_format_names_its_keys(tmp_path):
    torch.save({"net": {"w": torch.ones(1)}, "mlp": torch.ones(2, 2, 2)}, tmp_path / "odd.tar")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "odd.tar")
    message = str(info.value)
    assert "fits neither" in message and "keys: net, mlp" in message and "\n" not in message


def test_truncated_authors_file_is_one_line(tmp_path):
    path = tmp_path / "theirs.tar"
    save_authors_checkpoint(path, 32, 16, 2, 16, 256)
    raw = torch.load(path, weights_only=True)
    del raw["backbone"]["module.layer3.4.conv2.weight"]
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="does not fit the inferred configuration"):
        load_checkpoint(path)


def test_evaluate_authors_file_with_no_other_flag(tiny_data_dir, run_cli, tmp_path, capsys,
                                                  no_debug):
    save_authors_checkpoint(tmp_path / "theirs.tar", 32, 16, 2, 64, 256, seed=2)
    code = run_cli("-e", "--dataset", "synthface", "--load", "theirs.tar", "--data-dir",
                   str(tiny_data_dir), *TINY_SYNTHFACE, "--workers", "0", "--no-progress")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sum("converted the authors'" in line for line in out.splitlines()) == 1
    assert (tmp_path / "results" / "theirs_on_synthface.json").is_file()
    # The examples grid beside the PR curve: 8 queries drawn at a fixed seed, k + 1 columns.
    from PIL import Image

    from utils.cli.gallery_view import grid_layout

    with Image.open(tmp_path / "results" / "theirs_on_synthface_examples.png") as png:
        assert png.size == grid_layout(8, 10 + 1)

    # A contradicting --len is still caught against the inferred configuration.
    assert run_cli("-e", "--dataset", "synthface", "--load", "theirs.tar", "--len", "16",
                   "--data-dir", str(tiny_data_dir), *TINY_SYNTHFACE) == 2
    one_line_error(capsys, "--len 16 contradicts")


def test_resume_from_converted_file_starts_a_new_head(tiny_data_dir, run_cli, tmp_path, capsys):
    from utils.checkpoints import convert as convert_authors

    save_authors_checkpoint(tmp_path / "theirs.tar", 32, 16, 2, 64, 256, seed=4)
    (tmp_path / "checkpoint").mkdir()
    assert convert_authors.main([str(tmp_path / "theirs.tar"),
                                 str(tmp_path / "checkpoint" / "ft.last.tar")]) == 0
    code = run_cli("--dataset", "synthface", "--data-dir", str(tiny_data_dir), *TINY_SYNTHFACE,
                   "--save", "ft.tar", "--resume", "--len", "12", "--num", "2", "--epochs", "1",
                   "--eval-every", "0", "--bs", "12", "--workers", "0", "--no-progress",
                   "--amp", "off")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "starting a new class head" in out
    trained = load_checkpoint(tmp_path / "checkpoint" / "ft.last.tar")
    assert trained["epoch"] == 1 and "criterion" in trained
    assert trained["config"]["num_classes"] == 6


def test_converter_runs_as_a_module(tmp_path, monkeypatch, capsys):
    """`python -m utils.checkpoints.convert IN OUT` (run in-process: no second interpreter)."""
    import runpy

    save_authors_checkpoint(tmp_path / "t.tar", 32, 16, 2, 16, 256)
    monkeypatch.setattr(sys, "argv", ["convert_authors", str(tmp_path / "t.tar"),
                                      str(tmp_path / "o.tar")])
    monkeypatch.delitem(sys.modules, "utils.checkpoints.convert", raising=False)
    with pytest.raises(SystemExit) as done:
        runpy.run_module("utils.checkpoints.convert", run_name="__main__", alter_sys=True)
    assert done.value.code == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "o.tar")["config"]["bits"] == 8
