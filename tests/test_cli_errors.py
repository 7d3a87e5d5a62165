"""Every bad input gets one clear line on stderr, the right exit code, no traceback, and is
caught before any work: nothing is generated or written ("a clear error for every
bad input")."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import opqn_main
from conftest import PROG, REPO, TINY_SYNTHFACE, one_line_error
from utils.checkpoints.store import load_checkpoint, save_checkpoint

CODES = ["--len", "12", "--num", "2", "--words", "64"]
TRAIN_FLAGS = ["--epochs", "1", "--eval-every", "0", "--workers", "0", "--bs", "12",
               "--no-progress", "--device", "cpu", "--amp", "off"]


pytestmark = pytest.mark.usefixtures("one_thread", "no_debug")


@pytest.fixture(scope="module")
def trained(tiny_data_dir, tmp_path_factory) -> Path:
    """A real checkpoint of a tiny 12-bit (2x64) model, trained for one epoch."""
    root = tmp_path_factory.mktemp("trained")
    code = opqn_main.main(["--dataset", "synthface", "--data-dir", str(tiny_data_dir),
                           *TINY_SYNTHFACE, *TRAIN_FLAGS, *CODES,
                           "--save", str(root / "tiny.tar"), "--log-dir", str(root / "log"),
                           "--out", str(root / "results")])
    assert code == 0
    return root / "tiny.tar"


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_nothing_written(root: Path, before: set[str] = frozenset()) -> None:
    for name in ("checkpoint", "log", "results", "data"):
        assert not (root / name).exists(), f"{name}/ was written"
    assert listing(root) == set(before)


# --------------------------------------------------------------------------- arguments

ARGUMENT_ERRORS = {
    # L != M * log2(K)
    "len-mismatch": (["--len", "16", "--num", "2", "--words", "64"],
                     ["--len 16", "--num 2", "--words 64", "12 bits"]),
    "len-not-multiple": (["--len", "13", "--num", "2"], ["--len 13", "--num 2"]),
    "len-not-multiple-of-log2k": (["--len", "13", "--words", "64"], ["--len 13", "--words 64"]),
    # K a power of two, K <= d for a fixed D
    "words-not-power-of-two": (["--len", "12", "--num", "2", "--words", "48"],
                               ["--words", "power of two", "48"]),
    "words-one": (["--num", "2", "--words", "1"], ["--words", "power of two", "got 1"]),
    "words-too-many-bits": (["--num", "2", "--words", str(2 ** 17)],
                            [f"--words {2 ** 17}", "16 bits"]),
    "words-exceed-subvector": (["--len", "16", "--num", "2", "--words", "256",
                                "--feature-dim", "256"],
                               ["--words 256", "--feature-dim 256", "--num 2", "= 128"]),
    "feature-dim-not-multiple": ([*CODES, "--feature-dim", "511"],
                                 ["--feature-dim 511", "--num 2"]),
    "feature-dim-zero": ([*CODES, "--feature-dim", "0"], ["--feature-dim", "got 0"]),
    # zero or negative
    "num-zero": (["--len", "12", "--num", "0"], ["--num must be positive", "got 0"]),
    "num-negative": (["--len", "12", "--num", "-2"], ["--num must be positive", "got -2"]),
    "len-zero": (["--len", "0", "--num", "2"], ["--len must be positive", "got 0"]),
    "len-negative": (["--len", "-12", "--num", "2"], ["--len must be positive", "got -12"]),
    "words-zero": (["--len", "12", "--words", "0"], ["--words must be positive", "got 0"]),
    "bs-zero": ([*CODES, "--bs", "0"], ["--bs must be positive", "got 0"]),
    "bs-negative": ([*CODES, "--bs", "-12"], ["--bs must be positive", "got -12"]),
    "lr-zero": ([*CODES, "--lr", "0"], ["--lr must be positive", "got 0.0"]),
    "lr-negative": ([*CODES, "--lr", "-0.1"], ["--lr must be positive", "got -0.1"]),
    "lr-nan": ([*CODES, "--lr", "nan"], ["--lr", "got nan"]),
    "lr-inf": ([*CODES, "--lr", "inf"], ["--lr", "got inf"]),
    "epochs-zero": ([*CODES, "--epochs", "0"], ["--epochs must be positive", "got 0"]),
    "epochs-negative": ([*CODES, "--epochs", "-3"], ["--epochs must be positive", "got -3"]),
    "workers-negative": ([*CODES, "--workers", "-1"], ["--workers", "got -1"]),
    "width-zero": ([*CODES, "--width", "0"], ["--width", "got 0"]),
    "topk-zero": ([*CODES, "--topk", "0"], ["--topk", "got 0"]),
    "scale-zero": ([*CODES, "--scale", "0"], ["--scale", "got 0.0"]),
    "eval-every-negative": ([*CODES, "--eval-every", "-1"], ["--eval-every", "got -1"]),
    "synthface-identities-zero": ([*CODES, "--synthface-identities", "0"],
                                  ["--synthface-identities", "got 0"]),
    # NaN / infinite margin and miu, negative miu
    "margin-nan": ([*CODES, "--margin", "nan"], ["--margin must be a finite number", "got nan"]),
    "margin-inf": ([*CODES, "--margin", "inf"], ["--margin must be a finite number", "got inf"]),
    "margin-minus-inf": ([*CODES, "--margin=-inf"], ["--margin", "got -inf"]),
    "miu-nan": ([*CODES, "--miu", "nan"], ["--miu must be a finite number", "got nan"]),
    "miu-inf": ([*CODES, "--miu", "inf"], ["--miu must be a finite number", "got inf"]),
    "miu-negative": ([*CODES, "--miu", "-0.1"], ["--miu must be zero or positive", "got -0.1"]),
    # parallel lists of unequal length
    "lists-len-num": (["--len", "12", "16", "--num", "2"], ["--len has 2", "--num has 1"]),
    "lists-words": (["--len", "12", "16", "--num", "2", "2", "--words", "64"],
                    ["--words has 1", "--len has 2"]),
    "lists-save": ([*CODES, "--save", "a.tar", "b.tar"], ["--save has 2", "--len has 1"]),
    "lists-load": (["-e", "--load", "a.tar", "b.tar", "--len", "12"],
                   ["--load has 2", "--len has 1"]),
    # devices
    "device-unknown": ([*CODES, "--device", "tpu"], ["--device", "tpu", "unknown device"]),
    "device-bad-index": ([*CODES, "--device", "cuda:x"], ["--device", "cuda:x"]),
    # flags used in the wrong mode
    "evaluate-without-load": (["-e", *CODES], ["-e/--evaluate needs --load"]),
    "load-without-evaluate": ([*CODES, "--load", "a.tar"], ["--load is for evaluation"]),
    "evaluate-with-save": (["-e", "--load", "a.tar", "--save", "b.tar"], ["--save"]),
    "evaluate-with-resume": (["-e", "--load", "a.tar", "--resume"], ["--resume"]),
    "no-code-configuration": (["--epochs", "1"], ["--len", "--num"]),
    # argparse's own errors keep to one line too
    "not-an-integer": (["--len", "twelve", "--num", "2"], ["--len", "twelve"]),
}


@pytest.mark.parametrize("extra, fragments", list(ARGUMENT_ERRORS.values()),
                         ids=list(ARGUMENT_ERRORS))
def test_argument_error(extra, fragments, run_cli, tmp_path, capsys):
    argv = ["--dataset", "synthface", "--data-dir", str(tmp_path / "data"), "--no-progress",
            "--workers", "0", *extra]
    assert run_cli(*argv) == 2
    one_line_error(capsys, *fragments)
    assert_nothing_written(tmp_path)


def test_cuda_asked_for_where_there_is_none(run_cli, tmp_path, capsys):
    if torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU
        expected = [f"--device {device}", "GPU(s) present"]
    else:
        device = "cuda"
        expected = ["--device cuda", "CUDA is not available"]
    assert run_cli("--dataset", "synthface", "--data-dir", str(tmp_path / "data"), *CODES,
                   "--device", device) == 2
    one_line_error(capsys, *expected)
    assert_nothing_written(tmp_path)


def test_argument_error_in_a_real_process(tmp_path):
    """The same through the real entry point: exit status 2, one line, nothing else."""
    out = subprocess.run([sys.executable, str(REPO / "opqn_main.py"), "--dataset", "synthface",
                          "--data-dir", str(tmp_path / "data"), "--len", "16", "--num", "2",
                          "--words", "64"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "OPQN_DEBUG": ""})
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(PROG) and "--len 16" in out.stderr
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- dataset folders


def test_missing_dataset_folder_names_path_and_layout(run_cli, tmp_path, capsys):
    data = tmp_path / "nodata"
    assert run_cli("--dataset", "facescrub", "--data-dir", str(data), *CODES, *TRAIN_FLAGS) == 2
    one_line_error(capsys, "training folder not found", str(data / "facescrub" / "train"),
                   "expected layout", f"{data / 'facescrub'}/{{train,test}}/<identity>/",
                   "python -m data.prepare")
    assert_nothing_written(tmp_path)
    assert not data.exists()


def test_missing_cross_dataset_folder_shows_cross_layout(run_cli, tmp_path, capsys):
    data = tmp_path / "nodata"
    assert run_cli("-c", "--dataset", "facescrub", "--data-dir", str(data), *CODES,
                   *TRAIN_FLAGS) == 2
    one_line_error(capsys, "cross-training folder not found",
                   str(data / "vggface2" / "cross_train"), "{cross_train,cross_test}",
                   "--protocol cross")
    assert_nothing_written(tmp_path)


def test_missing_test_split(run_cli, tmp_path, capsys):
    (tmp_path / "mine" / "mydata" / "train" / "alice").mkdir(parents=True)
    (tmp_path / "mine" / "mydata" / "train" / "alice" / "1.jpg").write_bytes(b"x")
    before = listing(tmp_path)
    assert run_cli("--dataset", "mydata", "--data-dir", str(tmp_path / "mine"), *CODES,
                   *TRAIN_FLAGS) == 2
    one_line_error(capsys, "test folder not found", str(tmp_path / "mine" / "mydata" / "test"),
                   "expected layout")
    assert_nothing_written(tmp_path, before)


def test_dataset_folder_without_images(run_cli, tmp_path, capsys):
    for split in ("train", "test"):
        (tmp_path / "mine" / "facescrub" / split / "alice").mkdir(parents=True)
    before = listing(tmp_path)
    assert run_cli("--dataset", "facescrub", "--data-dir", str(tmp_path / "mine"), *CODES,
                   *TRAIN_FLAGS) == 2
    one_line_error(capsys, "no identity folders with images",
                   str(tmp_path / "mine" / "facescrub" / "train"), "expected layout")
    assert_nothing_written(tmp_path, before)


def test_evaluation_with_missing_dataset_folder(trained, run_cli, tmp_path, capsys):
    data = tmp_path / "nodata"
    assert run_cli("-e", "--dataset", "facescrub", "--data-dir", str(data), "--load",
                   str(trained), "--no-progress", "--workers", "0") == 2
    one_line_error(capsys, "folder not found", str(data / "facescrub" / "train"))
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- checkpoints


class Exploit:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _craft(kind: str, path: Path, real: Path, marker: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = real.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bit-flipped":
        data = bytearray(real.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "foreign-zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "hello")
    elif kind == "foreign-state-dict":
        torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    elif kind == "foreign-pickle":
        path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    elif kind == "missing-keys":
        save_checkpoint({"epoch": 3}, path)
    elif kind == "bad-config":
        save_checkpoint({"config": {"num_books": 2}, "backbone": {}, "quantizer": {}}, path)
    elif kind == "weights-do-not-fit":
        checkpoint = load_checkpoint(real)
        del checkpoint["format"], checkpoint["format_version"]
        checkpoint["config"] = {**checkpoint["config"], "feature_dim": 256}
        save_checkpoint(checkpoint, path)
    elif kind == "malicious-torch":
        torch.save({"config": {"num_books": 2}, "payload": Exploit(marker)}, path)
    elif kind in ("malicious-pickle", "malicious-pickle-v0", "malicious-pickle-v4"):
        protocol = {"malicious-pickle": 2, "malicious-pickle-v0": 0, "malicious-pickle-v4": 4}
        path.write_bytes(pickle.dumps(Exploit(marker), protocol=protocol[kind]))
    else:
        raise AssertionError(kind)


CHECKPOINT_ERRORS = {
    "empty": ["empty"],
    "truncated": ["truncated or corrupt"],
    "bit-flipped": ["corrupt"],
    "text": ["not a PyTorch checkpoint"],
    "foreign-zip": ["not a PyTorch checkpoint"],
    "foreign-state-dict": ["not an OPQN checkpoint"],
    "foreign-pickle": ["not a PyTorch checkpoint"],
    "missing-keys": ["lacks required keys", "config"],
    "bad-config": ["invalid model configuration"],
    "weights-do-not-fit": ["weights do not match", "size mismatch"],
    "malicious-torch": ["refused"],
    "malicious-pickle": ["refused"],
    "malicious-pickle-v0": ["refused"],
    "malicious-pickle-v4": ["refused"],
}


def test_exploit_payload_is_live(tmp_path):
    """The malicious files below would really run code if they were unpickled."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Exploit(marker)))
    assert marker.exists()


@pytest.mark.parametrize("kind", list(CHECKPOINT_ERRORS))
def test_bad_checkpoint(kind, trained, run_cli, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / f"{kind}.tar"
    _craft(kind, path, trained, marker)
    before = listing(tmp_path)
    assert run_cli("-e", "--dataset", "synthface", "--data-dir", str(tmp_path / "data"),
                   "--load", str(path), "--no-progress", "--workers", "0") == 1
    one_line_error(capsys, str(path), *CHECKPOINT_ERRORS[kind])
    assert not marker.exists(), "the checkpoint ran code"
    assert_nothing_written(tmp_path, before)


def test_missing_checkpoint(run_cli, tmp_path, capsys):
    assert run_cli("-e", "--dataset", "synthface", "--data-dir", str(tmp_path / "data"),
                   "--load", "nothere.tar") == 2
    one_line_error(capsys, "checkpoint not found", "nothere.tar",
                   str(Path("checkpoint") / "nothere.tar"))
    assert_nothing_written(tmp_path)


def test_malicious_checkpoint_in_a_real_process(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.tar"
    _craft("malicious-torch", path, path, marker)
    out = subprocess.run([sys.executable, str(REPO / "opqn_main.py"), "-e", "--load", str(path),
                          "--dataset", "synthface", "--data-dir", str(tmp_path / "data")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "OPQN_DEBUG": ""})
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(PROG) and "refused" in out.stderr and str(path) in out.stderr
    assert not marker.exists()
    assert_nothing_written(tmp_path, {"evil.tar"})


@pytest.mark.parametrize("flags, fragments", [
    (["--len", "16"], ["--len 16", "--len 12"]),
    (["--num", "3"], ["--num 3", "--num 2"]),
    (["--len", "16", "--num", "2", "--words", "256"], ["--len 16", "--len 12"]),
    (["--num", "2", "--words", "32"], ["--len 10", "--len 12"]),
], ids=["len", "num", "all-three", "words"])
def test_evaluation_config_contradicts_checkpoint(flags, fragments, trained, run_cli, tmp_path,
                                                  capsys):
    assert run_cli("-e", "--dataset", "synthface", "--data-dir", str(tmp_path / "data"),
                   "--load", str(trained), *flags) == 2
    line = one_line_error(capsys, *fragments, str(trained), "contradicts")
    assert "12-bit" in line and "2x64" in line
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- what must work


def test_feature_dim_is_raised_so_that_k_fits(tiny_data_dir, run_cli, tmp_path):
    """4x256 at 32x32: D=1024 (d=256) is chosen instead of failing on K > d."""
    assert run_cli("--dataset", "synthface", "--data-dir", str(tiny_data_dir), *TINY_SYNTHFACE,
                   *TRAIN_FLAGS, "--len", "32", "--num", "4", "--words", "256",
                   "--save", "big.tar") == 0
    config = load_checkpoint(tmp_path / "checkpoint" / "big.tar")["config"]
    assert (config["feature_dim"], config["num_books"], config["num_words"]) == (1024, 4, 256)
    result = json.loads((tmp_path / "results" / "big.json").read_text())
    assert result["feature_dim"] == 1024 and result["bits"] == 32
