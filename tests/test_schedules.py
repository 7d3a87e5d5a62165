"""--schedule cosine: decays to lr 0 at the last epoch, and resumes exactly."""
import math

import pytest
import torch

from data.loaders import build_splits
from models import NetConfig
from utils.checkpoints.store import load_checkpoint
from utils.training.schedules import build_scheduler, cosine_factor

pytestmark = pytest.mark.usefixtures("one_thread")


def _lrs(schedule: str, epochs: int, warmup: int = 0, lr_step: int = 2) -> tuple[list, float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = build_scheduler(optimizer, schedule, epochs, lr_step, 0.5, warmup)
    used = []
    for _ in range(epochs):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used, optimizer.param_groups[0]["lr"]


def test_cosine_warms_up_then_decays_to_zero_at_the_last_epoch():
    used, final = _lrs("cosine", 8, warmup=2)
    assert used[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])  # linear warmup, then the peak
    assert all(a > b for a, b in zip(used[2:], used[3:]))  # strictly decreasing
    assert used[3] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 5)))
    assert used[-1] == 0.0 and final == 0.0  # the last epoch runs at lr 0
    assert cosine_factor(7, 8, 2) == 0.0


def test_step_schedule_is_still_the_paper_halving():
    used, _ = _lrs("step", 6, lr_step=2)
    assert used == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    with pytest.raises(ValueError, match="--warmup"):
        _lrs("step", 6, warmup=1)


@pytest.fixture(scope="module")
def splits(tiny_data_dir):
    root = tiny_data_dir / "synthface"
    return build_splits(root / "train", root / "test", 32, cache=False, progress=False)


def _settings(tmp, epochs, resume=False):
    from utils.training.loop import TrainSettings

    return TrainSettings(epochs=epochs, lr=0.05, batch_size=12, workers=0, eval_every=0,
                         schedule="cosine", warmup=1, best_path=tmp / "m.tar",
                         last_path=tmp / "m.last.tar", resume=resume, progress=False, seed=5,
                         amp="off")


def test_cosine_run_reaches_zero_and_resume_reproduces_it(splits, tmp_path, monkeypatch):
    import utils.training.loop as training
    from utils.logger import setup_logging

    setup_logging(None, enabled=False)
    config = NetConfig(num_books=2, num_words=16, feature_dim=32,
                        num_classes=splits.num_classes, width=4)
    device = torch.device("cpu")
    epochs = 3
    full = tmp_path / "full"
    training.train(config, _settings(full, epochs), splits, device)
    reference = load_checkpoint(full / "m.last.tar")
    lrs = [record["lr"] for record in reference["history"]]
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] == 0.0  # warmup, peak, 0 at the last epoch
    assert reference["optimizer"]["param_groups"][0]["lr"] == 0.0  # 0 after the last epoch

    # Stop after epoch 2's checkpoint is written, as a crash would, then resume.
    cut = tmp_path / "cut"
    real_save = training.save_checkpoint

    def save_then_stop(state, path):
        real_save(state, path)
        if state["epoch"] == 2 and str(path).endswith(".last.tar"):
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, _settings(cut, epochs), splits, device)
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    training.train(config, _settings(cut, epochs, resume=True), splits, device)
    resumed = load_checkpoint(cut / "m.last.tar")
    assert [r["lr"] for r in resumed["history"]] == lrs
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in reference["history"]]
    for key, value in reference["backbone"].items():
        torch.testing.assert_close(resumed["backbone"][key], value, rtol=0, atol=0)
    assert resumed["optimizer"]["param_groups"][0]["lr"] == 0.0
