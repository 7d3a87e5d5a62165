"""End to end: train on a tiny synthface through the CLI, then evaluate with -e."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_SYNTHFACE

COMMON = ["--dataset", "synthface", "--bs", "12", "--workers", "0", "--no-progress",
          "--seed", "1", "--amp", "off"]


def test_train_then_evaluate(tiny_data_dir, run_cli, tmp_path):
    code = run_cli(*COMMON, "--data-dir", str(tiny_data_dir), *TINY_SYNTHFACE, "--len", "12",
                   "--num", "2", "--words", "64", "--epochs", "30", "--eval-every", "15",
                   "--save", "tiny.tar")
    assert code == 0
    assert (tmp_path / "checkpoint" / "tiny.tar").is_file()
    assert (tmp_path / "checkpoint" / "tiny.last.tar").is_file()
    assert list((tmp_path / "log").glob("tiny_*.txt"))
    trained = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert (tmp_path / "results" / "tiny_pr.png").stat().st_size > 1000

    code = run_cli("-e", *COMMON, "--data-dir", str(tiny_data_dir), *TINY_SYNTHFACE,
                   "--load", "tiny.tar", "--len", "12", "--out", "eval")
    assert code == 0
    result = json.loads((tmp_path / "eval" / "tiny_on_synthface.json").read_text())
    for key in ("mAP", "precision_at_k", "k", "pr_curve", "bits", "num_books", "num_words",
                "dataset", "num_queries", "num_database", "encode_seconds", "search_seconds",
                "recall_at_k", "skipped_queries", "ties"):
        assert key in result, key
    assert (result["bits"], result["num_books"], result["num_words"]) == (12, 2, 64)
    assert result["num_queries"] == 6 * 5 and result["num_database"] == 6 * 6
    assert result["k"] == 5 and result["dataset"] == "synthface"
    assert len(result["pr_curve"]["precision"]) == len(result["pr_curve"]["recall"]) > 2
    assert math.isfinite(result["mAP"])
    # Chance level: the expected mAP of a random ranking (all scores tied).
    from utils.retrieval.adc import evaluate_adc

    labels = torch.arange(6).repeat_interleave(6)
    chance = evaluate_adc(torch.zeros(30, 2, 64), torch.zeros(36, 2, dtype=torch.uint8),
                          torch.arange(6).repeat_interleave(5), labels)["mAP"]
    assert result["mAP"] > chance + 0.1
    assert result["mAP"] == pytest.approx(trained["mAP"], abs=1e-6)


def test_multiple_models_get_one_combined_plot(tiny_data_dir, run_cli, tmp_path):
    args = [*COMMON, "--data-dir", str(tiny_data_dir), *TINY_SYNTHFACE, "--epochs", "1",
            "--eval-every", "0"]
    assert run_cli(*args, "--len", "8", "12", "--num", "2", "2", "--save", "a.tar", "b.tar") == 0
    assert run_cli("-e", *args, "--load", "a.tar", "b.tar") == 0
    assert (tmp_path / "results" / "synthface_pr_curves.png").is_file()
    assert (tmp_path / "results" / "a_on_synthface.json").is_file()
    assert (tmp_path / "results" / "b_on_synthface.json").is_file()


def test_runs_on_cpu_without_cuda(tmp_path):
    script = (
        "import torch\n"
        "assert not torch.cuda.is_available()\n"
        "from models import OPQN, NetConfig; from models.methods import OPQNLoss\n"
        "from utils.runtime import resolve_device\n"
        "assert resolve_device('auto').type == 'cpu'\n"
        "cfg = NetConfig(num_books=2, num_words=16, feature_dim=64, num_classes=3, width=4)\n"
        "m = OPQN(cfg); l = OPQNLoss(3, 2, 32)\n"
        "sub, soft, p = m.quantizer(m(torch.randn(4, 3, 32, 32)))\n"
        "loss, _ = l(sub, soft, p, torch.tensor([0, 1, 2, 0])); loss.backward()\n"
        "print('ok', loss.item())\n")
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_help_lists_the_original_flags():
    out = subprocess.run([sys.executable, str(REPO / "opqn_main.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--lr", "--evaluate", "--cross-dataset", "--bs", "--save", "--load", "--len",
                 "--num", "--words", "--dataset", "--margin", "--miu", "--data-dir", "--epochs",
                 "--device", "--seed", "--workers", "--out", "--resume"):
        assert flag in out.stdout, flag


def test_cross_dataset_train_then_evaluate_on_unseen_identities(tiny_data_dir, run_cli,
                                                                tmp_path):
    args = [*COMMON, "--data-dir", str(tiny_data_dir), *TINY_SYNTHFACE]
    assert run_cli("-c", *args, "--len", "8", "--num", "2", "--epochs", "1",
                   "--eval-every", "0") == 0
    trained = json.loads((tmp_path / "results" / "cross_synthface_8bits.json").read_text())
    assert trained["input_size"] == 112 and trained["num_database"] == 3 * 6  # cross set
    assert run_cli("-e", "-c", *args, "--load", "cross_synthface_8bits.tar") == 0
    result = json.loads(
        (tmp_path / "results" / "cross_synthface_8bits_on_synthface_cross.json").read_text())
    assert result["cross_dataset"] is True and result["input_size"] == 112
    assert result["identity_overlap"] == 0  # evaluated on identities it never saw
    assert result["num_database"] == 6 * 6 and math.isfinite(result["mAP"])


def test_generic_folder_with_mixed_sizes_formats_and_a_corrupt_file(run_cli, tmp_path,
                                                                     caplog):
    from PIL import Image

    data = tmp_path / "data" / "myfaces"
    sizes = [(40, 52), (64, 64), (23, 31), (120, 90)]
    for split, count in (("train", 5), ("test", 2)):
        for identity in range(3):
            folder = data / split / f"person{identity}"
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = sizes[(identity + i) % len(sizes)]
                colour = (80 * identity, 40 * i, 200 - 50 * identity)
                image = Image.new("RGB" if i % 2 else "L", (w, h), colour[0])
                image = image.convert("RGB") if i % 3 == 0 else image
                ext = (".jpg", ".png", ".bmp")[i % 3]
                image.save(folder / f"img{i}{ext}")
    (data / "train" / "person0" / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert run_cli("--dataset", "myfaces", "--data-dir", str(tmp_path / "data"), "--len", "8",
                   "--num", "2", "--epochs", "2", "--bs", "4", "--workers", "0", "--width", "4",
                   "--eval-every", "0", "--no-progress") == 0
    result = json.loads((tmp_path / "results" / "myfaces_8bits.json").read_text())
    assert result["num_database"] == 3 * 5  # the corrupt file is left out
    assert result["num_queries"] == 3 * 2 and math.isfinite(result["mAP"])


def test_export_faiss_index_matches_search_adc(tiny_data_dir, run_cli, tmp_path):
    faiss = pytest.importorskip("faiss")
    args = [*COMMON, "--data-dir", str(tiny_data_dir), *TINY_SYNTHFACE]
    assert run_cli(*args, "--len", "12", "--num", "2", "--epochs", "1", "--eval-every", "0",
                   "--save", "f.tar") == 0
    assert run_cli("-e", *args, "--load", "f.tar", "--export-faiss", "gallery.faiss") == 0
    assert not (tmp_path / "gallery.faiss").exists()  # a bare name goes under --out
    index = faiss.read_index(str(tmp_path / "results" / "gallery.faiss"))
    assert index.ntotal == 6 * 6
    # The id list beside it names the image of every faiss id, in gallery order.
    import csv

    with open(tmp_path / "results" / "gallery.ids.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["id"]) for row in rows] == list(range(36))
    from data.datasets import FaceFolder

    gallery = FaceFolder(tiny_data_dir / "synthface" / "train")
    names = {index: name for name, index in gallery.class_to_idx.items()}
    assert [(row["path"], row["identity"]) for row in rows] == \
        [(path, names[label]) for path, label in gallery.samples]
    # Encode the same gallery and queries with the saved model, then compare faiss's top-10
    # (scores and ranking) with search_adc's over those codes.
    from data.loaders import build_splits, make_loader
    from test_faiss_index import assert_same_topk
    from utils.checkpoints.store import load_checkpoint
    from utils.retrieval.encoding import encode_gallery, encode_queries
    from utils.retrieval.faiss_index import search_faiss
    from utils.checkpoints.loading import load_model

    cpu = torch.device("cpu")
    model = load_model(load_checkpoint(tmp_path / "checkpoint" / "f.tar"), cpu)
    data = tiny_data_dir / "synthface"
    splits = build_splits(data / "train", data / "test", 32, with_train=False, cache=True,
                          progress=False)
    codes, _ = encode_gallery(model, make_loader(splits.gallery, 64, 0, cpu), cpu, False)
    tables, _ = encode_queries(model, make_loader(splits.queries, 64, 0, cpu), cpu, False)
    scores, ids = search_faiss(index, tables, model.quantizer.codebooks, 10)
    assert (ids >= 0).all()
    assert_same_topk(scores, ids, tables, codes)
