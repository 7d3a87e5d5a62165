"""Multi-process training (torchrun, gloo on CPU): ranks stay in step when images fail to
decode, short batches never reach BatchNorm, and bad per-rank batches get a clear error."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

REPO = Path(__file__).resolve().parents[1]

from conftest import one_line_error  # noqa: E402
from data.loaders import build_splits, make_loader  # noqa: E402
from utils.training.loop import epoch_seed  # noqa: E402

BATCH = 8  # 4 per rank with 2 processes


def _faces(tmp_path: Path) -> Path:
    """A copy of an 8-identity x 8-image synthface as a plain dataset folder ``faces``."""
    from data.synthface import ensure_synthface

    src = ensure_synthface(tmp_path / "gen", num_identities=8, train_per_identity=8,
                           cross_identities=2, progress=False)
    data = tmp_path / "data"
    for split in ("train", "test"):
        shutil.copytree(src / split, data / "faces" / split)
    return data


def _corrupt(paths) -> None:
    for path in paths:
        Path(path).write_bytes(b"not an image")


def _cli(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["opqn_main.py", "--dataset", "faces", "--data-dir", str(data), "--len", "8",
            "--num-books", "2", "--words", "16", "--bs", str(BATCH), "--width", "8",
            "--device", "cpu", "--no-cache", "--workers", "0", "--eval-every", "0",
            "--amp", "off", "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--log-dir", str(tmp_path / "log"), "--out", str(tmp_path / "out"), *extra]


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(REPO / args[0]), *args[1:]]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_ddp_ranks_stay_in_step_with_broken_batches(tmp_path):
    data = _faces(tmp_path)
    splits = build_splits(data / "faces" / "train", data / "faces" / "test", 32)
    paths = [p for p, _ in splits.train.samples]
    batches = []  # batches[rank][step]: the indices torchrun's rank reads in epoch 1
    for rank in range(2):
        sampler = DistributedSampler(splits.train, 2, rank, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(0)
        order = list(sampler)
        batches.append([order[i:i + BATCH // 2] for i in range(0, len(order), BATCH // 2)])
    broken = list(batches[1][0])  # step 1: rank 1 has nothing readable
    broken += batches[0][1][:3]  # step 2: rank 0 has a single readable image
    broken += batches[0][0][:1]
    for step in range(2, len(batches[0])):  # the other steps keep 2 of 4 on each rank
        broken += batches[0][step][:2] + batches[1][step][:2]
    assert len(set(broken)) == len(paths) // 2  # half the training images are corrupt
    _corrupt(paths[i] for i in broken)

    proc = _torchrun(_cli(data, tmp_path, "--epochs", "1", "--seed", "0"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # Both ranks report the unreadable files they met; the step skipped everywhere is logged.
    assert out.count("skipping unreadable image") >= len(set(broken)) - 1, out[-3000:]
    assert "skipped 2 step(s) (8 readable image(s) unused) in all processes" in out, out[-3000:]
    # The parameters of both processes were compared after the epoch (they would raise).
    assert "fell out of step" not in out
    ckpt = torch.load(tmp_path / "ckpt" / "faces_8bits.last.tar", weights_only=True)
    assert ckpt["epoch"] == 1


def test_ddp_resume_repeats_uninterrupted_losses(tmp_path):
    data = _faces(tmp_path)
    full = _torchrun(_cli(data, tmp_path, "--epochs", "2", "--save", "full.tar"))
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]
    one = _torchrun(_cli(data, tmp_path, "--epochs", "1", "--save", "part.tar"))
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    two = _torchrun(_cli(data, tmp_path, "--epochs", "2", "--save", "part.tar", "--resume"))
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    load = lambda name: torch.load(tmp_path / "ckpt" / name, weights_only=True)  # noqa: E731
    a, b = load("full.last.tar")["history"], load("part.last.tar")["history"]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_per_rank_batch_below_two_is_a_clear_error(run_cli, capsys, no_debug, monkeypatch,
                                                   tiny_data_dir):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = run_cli("--dataset", "synthface", "--data-dir", str(tiny_data_dir), "--len", "8",
                   "--num", "2", "--words", "16", "--bs", "6", "--epochs", "1")
    assert code == 2
    one_line_error(capsys, "--bs 6 over 4 process(es)", "at least 2 per process")


def test_single_readable_image_batch_is_skipped_in_one_process(tmp_path, run_cli, capsys):
    data = _faces(tmp_path)
    splits = build_splits(data / "faces" / "train", data / "faces" / "test", 32)
    # The training loop's first batch: the same loader over a dataset of sample indices.
    indices = [(torch.zeros(1), i) for i in range(len(splits.train))]
    gen = torch.Generator().manual_seed(epoch_seed(0, 0))
    loader = make_loader(indices, 4, 0, torch.device("cpu"), shuffle=True, generator=gen,
                         drop_last=True)
    first = next(iter(loader)).labels.tolist()
    _corrupt(splits.train.samples[i][0] for i in first[:3])  # one readable image left
    code = run_cli(*_cli(data, tmp_path, "--epochs", "1", "--bs", "4")[1:])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "skipped 1 step(s) (1 readable image(s) unused)" in out + err, out + err
