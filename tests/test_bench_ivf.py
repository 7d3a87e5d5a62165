"""bench/bench_ivf.py: which cached synthface model it reuses, resumes or trains again."""
from pathlib import Path

import pytest

pytest.importorskip("faiss")

from utils.checkpoints.store import last_checkpoint_path, save_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _bench():
    from bench import bench_ivf

    return bench_ivf


def _save(path, planned, done):
    save_checkpoint({"epoch": done, "train_settings": {"epochs": planned}}, path)


def test_model_file_names_its_epochs():
    bench = _bench()
    assert bench.model_path(12).name == "bench_ivf_36bits_12ep.tar"
    assert bench.model_path(2) != bench.model_path(12)
    assert last_checkpoint_path(Path("c/m.tar")) == Path("c/m.last.tar")


def test_cached_model_reused_only_when_trained_for_those_epochs(tmp_path):
    bench = _bench()
    best = tmp_path / "bench_ivf_36bits_12ep.tar"
    last = last_checkpoint_path(best)
    assert bench.training_state(best, 12) == "train"  # nothing there
    _save(last, planned=12, done=5)
    _save(best, planned=12, done=5)
    assert bench.training_state(best, 12) == "resume"  # interrupted: continue it
    _save(last, planned=12, done=12)
    assert bench.training_state(best, 12) == "done"
    assert bench.training_state(best, 15) == "train"  # trained for other epochs: stale
    _save(last, planned=2, done=2)
    assert bench.training_state(best, 12) == "train"
    best.unlink()
    _save(last, planned=12, done=12)
    assert bench.training_state(best, 12) == "train"  # the model itself is missing
    last.write_bytes(b"not a checkpoint")
    assert bench.training_state(best, 12) == "train"


def test_bench_nlist_is_four_times_the_library_default_within_its_rule():
    from utils.retrieval.ivf_index import MIN_POINTS_PER_LIST, default_nlist

    bench = _bench()
    assert bench.bench_nlist(1_000_000) == 4096 == 4 * default_nlist(1_000_000)
    for n in (1, 50, 1000, 100_000, 10_000_000):
        nlist = bench.bench_nlist(n)
        assert nlist >= default_nlist(n)
        assert nlist == 1 or nlist * MIN_POINTS_PER_LIST <= n
