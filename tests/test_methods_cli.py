"""--method from the command line: every method trains 2 epochs at 36 bits on a tiny
synthface, -e evaluates it from the checkpoint alone, and bad method input gets one line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import opqn_main
from conftest import TINY_SYNTHFACE, one_line_error
from models.methods import method_names
from utils.retrieval.adc import evaluate_adc

METHODS = method_names()

pytestmark = pytest.mark.usefixtures("one_thread", "no_debug")

FLAGS = ["--dataset", "synthface", *TINY_SYNTHFACE, "--workers", "0", "--bs", "12",
         "--no-progress", "--device", "cpu", "--seed", "1", "--amp", "off"]


def codes_of(method: str) -> list[str]:
    return ["--len", "36"] if method == "dcdh" else ["--len", "36", "--num", "6"]


def _main(root: Path, *argv: str) -> int:
    before = os.getcwd()
    os.chdir(root)
    try:
        return opqn_main.main(list(argv))
    except SystemExit as exc:
        return int(exc.code)
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def trained(tiny_data_dir, tmp_path_factory) -> Path:
    """One 2-epoch, 36-bit checkpoint per method, in one folder."""
    root = tmp_path_factory.mktemp("methods")
    for method in METHODS:
        code = _main(root, *FLAGS, "--data-dir", str(tiny_data_dir), "--epochs", "2",
                     "--eval-every", "0", "--method", method, *codes_of(method),
                     "--save", f"{method}.tar")
        assert code == 0, method
    return root


def chance_map() -> float:
    """Expected mAP of a random ranking on the tiny synthface (all scores tied)."""
    return evaluate_adc(torch.zeros(30, 1, 2), torch.zeros(36, 1, dtype=torch.uint8),
                        torch.arange(6).repeat_interleave(5),
                        torch.arange(6).repeat_interleave(6))["mAP"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_evaluates_from_its_checkpoint_alone(method, trained, tiny_data_dir):
    trained_result = json.loads((trained / "results" / f"{method}.json").read_text())
    # No --method and no code flags: everything comes from the checkpoint.
    assert _main(trained, "-e", *FLAGS, "--data-dir", str(tiny_data_dir), "--load",
                 f"{method}.tar", "--out", f"eval_{method}") == 0
    result = json.loads((trained / f"eval_{method}" / f"{method}_on_synthface.json").read_text())
    assert result["method"] == trained_result["method"] == method
    assert result["bits"] == 36
    expected = (36, 2) if method == "dcdh" else (6, 64)
    assert (result["num_books"], result["num_words"]) == expected
    assert result["mAP"] == pytest.approx(trained_result["mAP"], abs=1e-6)
    if method == "dpq":
        # DPQ's joint centre loss dominates its first steps (67 of a loss of 72 at the
        # first epoch on digits); after these 6 steps, with precise BN, it ranks at chance + 0.01
        # (docs/methods.md). It must not fall below chance.
        assert result["mAP"] > chance_map() - 0.01, (method, result["mAP"], chance_map())
    else:
        # opqn, l2q (raw query side), gpq and dcdh: precise BN (on by default) gives
        # eval-mode features that match the finished weights, even after DCDH's large
        # standard-normal-driven first steps.
        assert result["mAP"] > chance_map() + 0.05, (method, result["mAP"], chance_map())


def test_models_of_different_methods_share_one_pr_figure_and_export_to_faiss(
        trained, tiny_data_dir):
    loads = [f"{m}.tar" for m in METHODS]
    try:
        import faiss
    except ImportError:
        faiss = None
    paths = [str(trained / f"{m}.index") for m in METHODS]
    export = ["--export-faiss", *paths] if faiss is not None else []
    assert _main(trained, "-e", *FLAGS, "--data-dir", str(tiny_data_dir), "--load", *loads,
                 "--out", "all", *export) == 0
    assert (trained / "all" / "synthface_pr_curves.png").stat().st_size > 1000
    methods = {json.loads((trained / "all" / f"{m}_on_synthface.json").read_text())["method"]
               for m in METHODS}
    assert methods == set(METHODS)
    if faiss is None:
        return
    from utils.retrieval.faiss_index import load_faiss_index

    for method, path in zip(METHODS, paths):
        index = load_faiss_index(path)
        assert index.ntotal == 36
        assert isinstance(index, faiss.IndexBinary) == (method == "dcdh")


def test_export_faiss_refused_where_faiss_cannot_score(trained, tiny_data_dir, capsys,
                                                       monkeypatch):
    from models.methods import DCDHHead

    monkeypatch.setattr(DCDHHead, "faiss_metric", None)  # a method faiss cannot express
    capsys.readouterr()
    code = _main(trained, "-e", *FLAGS, "--data-dir", str(tiny_data_dir), "--load", "dcdh.tar",
                 "--out", "nofaiss", "--export-faiss", str(trained / "x.index"))
    assert code == 2
    one_line_error(capsys, "--export-faiss", "dcdh")
    assert not (trained / "x.index").exists() and not (trained / "nofaiss").exists()


def test_method_contradicting_the_checkpoint(trained, tiny_data_dir, capsys):
    capsys.readouterr()
    code = _main(trained, "-e", *FLAGS, "--data-dir", str(tiny_data_dir), "--load", "dpq.tar",
                 "--method", "gpq", "--out", "contra")
    assert code == 2
    one_line_error(capsys, "--method gpq", "dpq")


@pytest.mark.parametrize("argv, fragments", [
    (["--method", "pq9", "--len", "36", "--num", "6"], ["--method", "pq9"]),
    (["--method", "dcdh", "--len", "36", "--num", "6"], ["--num", "dcdh"]),
    (["--method", "dcdh", "--len", "36", "--words", "64"], ["--words", "dcdh"]),
    (["--method", "dcdh", "--len", "36", "--feature-dim", "64"], ["--feature-dim", "dcdh"]),
    (["--len", "12", "--num", "2", "--words", "64", "--feature-dim", "64"],
     ["--words 64", "learns its codewords allows K > d"]),
    (["--method", "dpq", "--len", "12", "--num", "2", "--dpq-alpha", "-1"], ["--dpq-alpha"]),
])
def test_bad_method_input_gets_one_line(argv, fragments, tmp_path, capsys):
    code = _main(tmp_path, "--dataset", "synthface", "--data-dir", str(tmp_path / "data"),
                 "--no-progress", *argv)
    assert code == 2
    one_line_error(capsys, *fragments)
    assert not (tmp_path / "data").exists()  # refused before any work


def test_learned_codewords_allow_k_above_d(tiny_data_dir, tmp_path):
    """What opqn refuses (K=64 > d=32) trains for l2q."""
    assert _main(tmp_path, *FLAGS, "--data-dir", str(tiny_data_dir), "--method", "l2q",
                 "--len", "12", "--num", "2", "--feature-dim", "64", "--epochs", "1",
                 "--eval-every", "0", "--save", "k.tar") == 0
    result = json.loads((tmp_path / "results" / "k.json").read_text())
    assert (result["method"], result["feature_dim"], result["num_words"]) == ("l2q", 64, 64)


def test_resume_refuses_another_method(trained, tiny_data_dir, capsys):
    capsys.readouterr()
    code = _main(trained, *FLAGS, "--data-dir", str(tiny_data_dir), "--epochs", "3",
                 "--method", "gpq", "--len", "36", "--num", "6", "--save", "dpq.tar",
                 "--resume")
    assert code == 2
    one_line_error(capsys, "--resume", "method gpq", "dpq")


@pytest.mark.parametrize("method, optimizer, lr, weight_decay, betas", [
    ("opqn", "sgd", 0.1, 5e-4, None), ("l2q", "sgd", 0.1, 5e-4, None),
    ("dpq", "sgd", 0.1, 5e-4, None), ("gpq", "adam", 2e-4, 0.0, (0.5, 0.999)),
    ("dcdh", "adam", 0.005, 1e-4, (0.9, 0.999))])
def test_each_method_trained_with_its_authors_optimizer(trained, method, optimizer, lr,
                                                        weight_decay, betas):
    """The checkpoint's optimiser state, not only its settings, holds the authors' choice."""
    from utils.checkpoints.store import load_checkpoint

    ckpt = load_checkpoint(trained / "checkpoint" / f"{method}.tar")
    assert ckpt["train_settings"]["optimizer"] == optimizer
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (lr, weight_decay)
    if betas is not None:
        assert tuple(group["betas"]) == betas
        assert group["amsgrad"] == (method == "dcdh")
    else:
        assert group["momentum"] == 0.9


def test_resume_keeps_the_method_and_its_optimizer(trained, tiny_data_dir):
    """dcdh trains with Adam at 32x32: --resume continues it (runs last: it extends dcdh.tar)."""
    from utils.checkpoints.store import load_checkpoint

    assert _main(trained, *FLAGS, "--data-dir", str(tiny_data_dir), "--epochs", "3",
                 "--eval-every", "0", "--method", "dcdh", "--len", "36", "--save", "dcdh.tar",
                 "--resume") == 0
    ckpt = load_checkpoint(trained / "checkpoint" / "dcdh.last.tar")
    assert ckpt["epoch"] == 3 and ckpt["config"]["method"] == "dcdh"
    assert ckpt["train_settings"]["optimizer"] == "adam"
    assert ckpt["train_settings"]["lr"] == 0.005
    assert "exp_avg_sq" in str(ckpt["optimizer"]["state"][0].keys())
