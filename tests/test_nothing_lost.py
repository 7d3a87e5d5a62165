"""Nothing lost, nothing silent: no checkpoint overwritten without asking, no synthface
regenerated behind the user's back, evaluation results under their own names, and limits
checked before any work (one clear line, exit code 2)."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, one_line_error

COMMON = ["--dataset", "synthface", "--bs", "12", "--workers", "0", "--no-progress",
          "--seed", "1", "--eval-every", "0", "--amp", "off"]
SIZE = ["--synthface-identities", "4", "--synthface-images", "6"]


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under root: (size, mtime in ns, sha256)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A 4-identity synthface (not the default size) and one model trained on it."""
    import opqn_main

    root = tmp_path_factory.mktemp("lost")
    data = root / "data"
    argv = [*COMMON, "--data-dir", str(data), *SIZE, "--len", "8", "--num", "2",
            "--epochs", "1", "--checkpoint-dir", str(root / "checkpoint"),
            "--out", str(root / "results"), "--log-dir", str(root / "log"), "--save", "a.tar"]
    assert opqn_main.main(argv) == 0
    return root


def test_training_twice_with_the_same_save_keeps_the_checkpoint(trained, run_cli, no_debug,
                                                                  capsys):
    ckpt = trained / "checkpoint"
    before = snapshot(ckpt)
    capsys.readouterr()
    dirs = ["--data-dir", str(trained / "data"), "--checkpoint-dir", str(ckpt),
            "--out", str(trained / "results")]
    assert run_cli(*COMMON, *dirs, "--len", "8", "--num", "2", "--epochs", "1",
                   "--save", "a.tar") == 2
    one_line_error(capsys, str(ckpt / "a.tar"), "--resume", "--overwrite")
    # Per model of a multi-model run, before any work: b (new) is not trained either.
    assert run_cli(*COMMON, *dirs, "--len", "8", "8", "--num", "2", "2", "--epochs", "1",
                   "--save", "b.tar", "a.tar") == 2
    one_line_error(capsys, str(ckpt / "a.tar"))
    assert snapshot(ckpt) == before and not (ckpt / "b.tar").exists()
    # Two models of one run with one name.
    assert run_cli(*COMMON, *dirs, "--len", "8", "8", "--num", "2", "2",
                   "--save", "c.tar", "c.tar") == 2
    one_line_error(capsys, "c.tar", "both")
    assert run_cli(*COMMON, *dirs, "--len", "8", "--num", "2", "--save", "a.tar",
                   "--resume", "--overwrite") == 2
    one_line_error(capsys, "--overwrite", "--resume")
    assert snapshot(ckpt) == before


def test_overwrite_replaces_and_evaluation_results_get_their_own_names(trained, run_cli):
    ckpt, results = trained / "checkpoint", trained / "results"
    dirs = ["--data-dir", str(trained / "data"), "--checkpoint-dir", str(ckpt),
            "--out", str(results)]
    data_before = snapshot(trained / "data" / "synthface")
    training_result = (results / "a.json").read_text()
    # -e without the --synthface-* flags of the training run: the dataset stays as it is.
    assert run_cli("-e", *COMMON, *dirs, "--load", "a.tar") == 0
    assert snapshot(trained / "data" / "synthface") == data_before
    evaluated = json.loads((results / "a_on_synthface.json").read_text())
    assert (results / "a.json").read_text() == training_result  # both survive
    assert evaluated["mAP"] == pytest.approx(json.loads(training_result)["mAP"], abs=1e-6)
    assert evaluated["num_database"] == 4 * 6  # the 4-identity data, not the default 100

    old = hashlib.sha256((ckpt / "a.tar").read_bytes()).hexdigest()
    assert run_cli(*COMMON, *dirs, "--len", "8", "--num", "2", "--epochs", "1", "--seed", "7",
                   "--save", "a.tar", "--overwrite") == 0
    assert hashlib.sha256((ckpt / "a.tar").read_bytes()).hexdigest() != old


def test_synthface_flags_that_disagree_with_the_data_on_disk(trained, run_cli, no_debug,
                                                             capsys):
    data = trained / "data"
    before = snapshot(data / "synthface")
    dirs = ["--data-dir", str(data), "--checkpoint-dir", str(trained / "checkpoint"),
            "--out", str(trained / "eval")]
    assert run_cli("-e", *COMMON, *dirs, "--load", "a.tar",
                   "--synthface-identities", "10") == 2
    one_line_error(capsys, "10 identities x 6 training images",
                   "4 identities x 6 training images", "--regenerate-synthface")
    assert run_cli("-e", *COMMON, *dirs, "--load", "a.tar", "--regenerate-synthface") == 2
    one_line_error(capsys, "-e never regenerates")
    assert run_cli(*COMMON, *dirs, "--len", "8", "--num", "2", "--save", "new.tar",
                   "--synthface-images", "9") == 2
    one_line_error(capsys, "4 identities x 9 training images", "4 identities x 6")
    assert snapshot(data / "synthface") == before
    assert not (trained / "eval").exists()


def test_regeneration_only_when_asked(tmp_path):
    from data.synthface import SynthfaceMismatch, synthface_meta, use_synthface

    _root, what = use_synthface(tmp_path, 2, 2, progress=False)
    assert "generated" in what and synthface_meta(tmp_path)["num_identities"] == 2
    _root, what = use_synthface(tmp_path, progress=False)  # no flags: use what is there
    assert "using" in what
    with pytest.raises(SynthfaceMismatch, match="3 identities x 2 .* 2 identities x 2"):
        use_synthface(tmp_path, 3, progress=False)
    _root, what = use_synthface(tmp_path, 3, regenerate=True, progress=False)
    assert "regenerated" in what
    meta = synthface_meta(tmp_path)
    assert (meta["num_identities"], meta["train_per_identity"]) == (3, 30)
    assert len(list((tmp_path / "synthface" / "train").iterdir())) == 3


def test_huge_codebooks_refused_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "opqn_main.py"), "--dataset", "synthface",
                          "--len", "32", "--num", "2", "--data-dir", str(tmp_path / "data")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "GiB" in lines[0] and "--words 65536" in lines[0] and "use --words" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no data generated, no folder created


def test_quantizer_memory_estimate():
    from utils.cli.validation import CodeSpec, UsageError, check_quantizer_memory, \
        quantizer_memory_bytes

    # V_m x 3 (weights, gradient, momentum) + codebooks (float64 while built, then float32)
    # + the d x d float64 DCT matrix.
    assert quantizer_memory_bytes(512, 2, 256) == 2 * 256 * 256 * 24 + 256 * 256 * 8
    spec = CodeSpec(16, 2, 256)
    check_quantizer_memory(spec, 512, 2 ** 30, "test")
    with pytest.raises(UsageError, match=r"use --words 64 or fewer \(--len 12\)"):
        check_quantizer_memory(spec, 512, quantizer_memory_bytes(512, 2, 64), "test",
                               lambda m, k: max(512, m * k))


def test_training_split_smaller_than_one_batch(tiny_data_dir, run_cli, no_debug, capsys):
    args = ["--dataset", "synthface", "--data-dir", str(tiny_data_dir), "--workers", "0",
            "--no-progress", "--len", "8", "--num", "2"]
    assert run_cli(*args) == 2  # synthface's default batch is 64; the split has 36 images
    one_line_error(capsys, "has 36 images", "batch of 64", "--bs 36")
    assert run_cli(*args, "--bs", "40") == 2
    one_line_error(capsys, "has 36 images", "--bs 40")
    assert run_cli(*args, "--bs", "1") == 2
    one_line_error(capsys, "--bs 1", "at least 2")


def test_ctrl_c_says_how_to_continue(tiny_data_dir, run_cli, tmp_path, monkeypatch, capsys):
    import utils.cli.pipeline

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.cli.pipeline, "train", interrupted)
    args = ["--dataset", "synthface", "--data-dir", str(tiny_data_dir), "--workers", "0",
            "--no-progress", "--bs", "12", "--len", "8", "--num", "2", "--save", "k.tar"]
    assert run_cli(*args) == 130
    assert "rerun the same command" in capsys.readouterr().err
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "k.last.tar").write_bytes(b"")  # an epoch had finished
    assert run_cli(*args, "--overwrite") == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("opqn_main.py: interrupted; continue with: python opqn_main.py ")
    assert err.endswith("--save k.tar --resume") and "--overwrite" not in err


def test_wrong_image_size_in_python_says_what_is_expected():
    from models import RetrievalNet, NetConfig

    model = RetrievalNet(NetConfig(num_books=2, num_words=16, feature_dim=64, num_classes=3,
                            width=4)).eval()
    with pytest.raises(ValueError, match=r"shape \(B, 3, 32, 32\).*got \(2, 3, 64, 64\)"
                                         r".*encode_images"):
        model(torch.zeros(2, 3, 64, 64))


def test_encode_images_applies_the_models_own_transform(tiny_data_dir):
    from PIL import Image

    from data.transforms import build_transform
    from models import RetrievalNet, NetConfig
    from utils.retrieval.inference import encode_images

    torch.manual_seed(0)
    model = RetrievalNet(NetConfig(num_books=2, num_words=16, feature_dim=64, num_classes=3,
                            width=4)).eval()
    files = sorted((tiny_data_dir / "synthface" / "train" / "id0000").glob("*.png"))[:3]
    big = Image.open(files[0]).convert("RGB").resize((97, 80))  # any size, as PIL
    out = encode_images(model, [*files, big], batch_size=2)
    assert out.features.shape == (4, 64) and out.codes.shape == (4, 2)
    assert out.tables.shape == (4, 2, 16) and out.codes.dtype == torch.uint8
    tf = build_transform(32, train=False)
    with torch.no_grad():
        expected = model(torch.stack([tf(Image.open(f).convert("RGB")) for f in files]))
    torch.testing.assert_close(out.features[:3], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.codes, model.quantizer.encode(out.features))
    with pytest.raises(ValueError, match="cannot read image"):
        encode_images(model, [tiny_data_dir / "nothere.png"])


def test_cache_cli_checks_size_and_prints_one_line(tiny_data_dir, capsys):
    from data.cache import main

    with pytest.raises(SystemExit) as exc:
        main([str(tiny_data_dir / "synthface" / "train"), "--size", "33"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--size 33" in err and "35 or 120" in err
    assert main([str(tiny_data_dir / "synthface" / "test"), "--size", "35"]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "30 images of 6 identities at 35x35" in out
    assert "object at 0x" not in out


def test_pixel_pq_bench_checks_faiss_minimum_first(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.bench_synthface_pq",
                          "--identities", "20", "--train-per-identity", "10", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "at least 256" in out.stderr and "gives 200" in out.stderr
    assert list(tmp_path.iterdir()) == []  # checked before generating anything


def test_pixel_pq_bench_never_replaces_a_users_synthface(tmp_path):
    from data.synthface import ensure_synthface

    ensure_synthface(tmp_path, num_identities=3, train_per_identity=2, cross_identities=2,
                     progress=False)
    before = snapshot(tmp_path)
    out = subprocess.run([sys.executable, "-m", "bench.bench_synthface_pq",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "3 identities x 2 training images" in out.stderr
    assert snapshot(tmp_path) == before


def test_plot_legend_names_checkpoint_method_and_map():
    from utils.cli.reporting import curve_label

    result = {"bits": 36, "num_books": 6, "num_words": 64, "mAP": 0.891}
    assert curve_label(result, "synthface_36bits") == \
        "synthface_36bits: OPQN 36-bit (6x64), mAP 89.10%"
    assert curve_label({**result, "method": "dpq"}, "m2").startswith("m2: DPQ 36-bit")


def test_help_names_the_synthface_defaults():
    import opqn_main

    text = " ".join(opqn_main.build_parser().format_help().split())
    for fragment in ("synthface: 45, halved every 15", "64 for synthface", "default 100",
                     "default 30", "--regenerate-synthface", "--overwrite"):
        assert fragment in text, fragment
