"""Paths of the command line that the paper's protocol depends on: lowest-loss selection,
data-loading workers, and the real -c layout (vggface2/cross_train) with its identity guard."""
import json
import math
import shutil

import pytest

from conftest import TINY_SYNTHFACE, one_line_error
from utils.checkpoints.store import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread", "no_debug")

COMMON = ["--bs", "12", "--no-progress", "--seed", "1", "--eval-every", "0", "--amp", "off"]


def test_lowest_loss_epoch_is_kept_when_it_is_not_the_last(tiny_data_dir, run_cli, tmp_path,
                                                           monkeypatch):
    import data.datasets as datasets
    from utils.training.loop import OPQNTrainingModule

    # lr halved every epoch, so the schedule shows in three epochs.
    monkeypatch.setitem(datasets.PRESETS, "synthface",
                        datasets.DatasetPreset(epochs=3, lr_step=1, width=4, batch_size=12,
                                               cache=False))
    # 36 training images, batch 12, drop_last: 3 steps per epoch. The reported loss of
    # epoch 2 is scaled down, so epoch 2 has the lowest mean loss though epoch 3 is last.
    real_forward = OPQNTrainingModule.forward
    calls = {"n": 0}
    factors = (1.0, 0.05, 1.0)

    def forward(self, images, labels):
        loss, parts = real_forward(self, images, labels)
        factor = factors[min(calls["n"] // 3, 2)]
        calls["n"] += 1
        return loss * factor, parts

    monkeypatch.setattr(OPQNTrainingModule, "forward", forward)
    # --workers 2 without the cache: the file dataset and its transforms go to worker
    # processes.
    code = run_cli("--dataset", "synthface", "--data-dir", str(tiny_data_dir), "--len", "8",
                   "--num", "2", "--workers", "2", "--no-cache", "--save", "sel.tar", *COMMON,
                   *TINY_SYNTHFACE)
    assert code == 0
    assert calls["n"] == 9
    best = load_checkpoint(tmp_path / "checkpoint" / "sel.tar")
    last = load_checkpoint(tmp_path / "checkpoint" / "sel.last.tar")
    assert (best["epoch"], best["best_epoch"], last["epoch"], last["best_epoch"]) == (2, 2, 3, 2)
    history = last["history"]
    assert best["best_loss"] == pytest.approx(history[1]["loss"]) == last["best_loss"]
    assert history[1]["loss"] < min(history[0]["loss"], history[2]["loss"])
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.05, 0.025])
    assert best["config"]["scale"] == 20.0 and best["config"]["input_size"] == 32
    result = json.loads((tmp_path / "results" / "sel.json").read_text())
    assert result["checkpoint_epoch"] == 2  # the final evaluation uses the kept model


@pytest.fixture(scope="module")
def cross_layout(tiny_data_dir, tmp_path_factory):
    """vggface2/cross_train + cross_test built from synthface's cross identities, and two
    evaluation sets: one with unseen identities, one that shares identity folders."""
    src = tiny_data_dir / "synthface"
    root = tmp_path_factory.mktemp("crossdata")
    for split in ("cross_train", "cross_test"):
        shutil.copytree(src / split, root / "vggface2" / split)
    for split in ("train", "test"):
        shutil.copytree(src / split, root / "unseen" / split)
        shutil.copytree(src / split, root / "overlap" / split)
    for name in ("xid0000", "xid0001"):  # two training identities reappear
        shutil.copytree(src / "cross_train" / name, root / "overlap" / "train" / name)
        shutil.copytree(src / "cross_train" / name, root / "overlap" / "test" / name)
    return root


@pytest.fixture(scope="module")
def cross_model(cross_layout, tmp_path_factory):
    import opqn_main

    work = tmp_path_factory.mktemp("crosswork")
    code = opqn_main.main(["-c", "--dataset", "unseen", "--data-dir", str(cross_layout),
                           "--len", "8", "--num", "2", "--epochs", "1", "--width", "4",
                           "--workers", "0", "--checkpoint-dir", str(work / "checkpoint"),
                           "--out", str(work / "results"), "--log-dir", str(work / "log"),
                           *COMMON[:2], *COMMON[2:]])
    assert code == 0
    return work / "checkpoint" / "cross_vggface2_8bits.tar"


def test_cross_training_reads_vggface2_cross_train(cross_model):
    checkpoint = load_checkpoint(cross_model)
    assert checkpoint["config"]["input_size"] == 112 and checkpoint["config"]["scale"] == 40.0
    assert checkpoint["config"]["dataset"] == "vggface2"
    assert checkpoint["classes"] == ["xid0000", "xid0001", "xid0002"]


def test_cross_evaluation_on_unseen_identities(cross_layout, cross_model, run_cli, tmp_path):
    assert run_cli("-e", "-c", "--dataset", "unseen", "--data-dir", str(cross_layout),
                   "--load", str(cross_model), "--workers", "0", *COMMON) == 0
    result = json.loads((tmp_path / "results" /
                         "cross_vggface2_8bits_on_unseen_cross.json").read_text())
    assert result["identity_overlap"] == 0 and result["input_size"] == 112
    assert result["num_database"] == 6 * 6 and math.isfinite(result["mAP"])


def test_cross_evaluation_with_shared_identities_is_an_error(cross_layout, cross_model, run_cli,
                                                             tmp_path, capsys):
    args = ["-e", "-c", "--dataset", "overlap", "--data-dir", str(cross_layout), "--load",
            str(cross_model), "--workers", "0", *COMMON]
    assert run_cli(*args) == 2
    one_line_error(capsys, "2 identities", "xid0000, xid0001", "--allow-identity-overlap")
    assert not (tmp_path / "results").exists()  # refused before any work
    assert run_cli(*args, "--allow-identity-overlap") == 0
    result = json.loads((tmp_path / "results" /
                         "cross_vggface2_8bits_on_overlap_cross.json").read_text())
    assert result["identity_overlap"] == 2
