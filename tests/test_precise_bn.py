"""Precise BN (utils/training/precise_bn.py): population statistics of the finished weights."""
import json

import pytest
import torch
from torch import nn

from conftest import TINY_SYNTHFACE, one_line_error
from utils.training.precise_bn import (batchnorm_layers, precise_bn_subset,
                              recompute_bn_statistics)


def _batches(sizes, dim=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Shifted and scaled per channel, so that wrong statistics cannot pass by chance.
    return [torch.randn(n, dim, generator=generator) * torch.tensor([1.0, 3.0, 0.5]) + 2.0
            for n in sizes]


def test_statistics_are_the_image_weighted_averages():
    bn = nn.BatchNorm1d(3, momentum=0.3)
    bn.running_mean.fill_(7.0)
    batches = _batches([8, 8, 3])
    info = recompute_bn_statistics(bn, batches, torch.device("cpu"), progress=False)
    data = torch.cat(batches)
    assert info == {"images": 19, "batches": 3, "layers": 1}
    assert torch.allclose(bn.running_mean, data.mean(0), atol=1e-5)
    weighted_var = sum(len(b) * b.var(0, unbiased=True) for b in batches) / len(data)
    assert torch.allclose(bn.running_var, weighted_var, atol=1e-5)
    assert bn.momentum == 0.3 and bn.training  # restored


def test_dropout_is_off_and_mode_is_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3)).eval()
    batches = _batches([64] * 8, seed=1)
    recompute_bn_statistics(model, batches, torch.device("cpu"), progress=False)
    data = torch.cat(batches)
    # Dropout(0.5) would double the second moment; here the statistics are the data's.
    assert torch.allclose(model[1].running_mean, data.mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, data.var(0), rtol=0.05)
    assert not model.training and not model[1].training


def test_batches_of_one_image_are_skipped():
    bn = nn.BatchNorm1d(3)
    batches = _batches([5, 1])
    info = recompute_bn_statistics(bn, batches, torch.device("cpu"), progress=False)
    assert info["images"] == 5 and torch.allclose(bn.running_mean, batches[0].mean(0),
                                                  atol=1e-5)
    with pytest.raises(RuntimeError, match="no batch of at least 2"):
        recompute_bn_statistics(nn.BatchNorm1d(3), _batches([1]), torch.device("cpu"),
                                progress=False)


def test_float32_under_an_outer_bf16_autocast(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    images = [torch.randn(6, 3, 10, 10) for _ in range(3)]
    recompute_bn_statistics(model, images, torch.device("cpu"), progress=False)
    plain = [layer.running_var.clone() for layer in batchnorm_layers(model)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recompute_bn_statistics(model, images, torch.device("cpu"), progress=False)
    for layer, expected in zip(batchnorm_layers(model), plain):
        assert torch.equal(layer.running_var, expected)


def test_subset_is_seeded_and_spread():
    data = list(range(100))
    subset = precise_bn_subset(data, 10, seed=3)
    assert len(subset) == 10 and list(subset) == list(precise_bn_subset(data, 10, seed=3))
    assert max(subset) >= 50  # not the first identities' prefix
    assert precise_bn_subset(data, 500) is data


def _train(run_cli, tiny_data_dir, *extra):
    return run_cli("--dataset", "synthface", "--data-dir", str(tiny_data_dir), *TINY_SYNTHFACE,
                   "--len", "12", "--num", "2", "--words", "64", "--epochs", "1",
                   "--eval-every", "0", "--bs", "12", "--workers", "0", "--no-progress",
                   "--width", "4", "--amp", "off", *extra)


def test_training_saves_precise_statistics(run_cli, tiny_data_dir, tmp_path, one_thread):
    from data.loaders import build_splits, make_loader
    from utils.checkpoints.store import load_checkpoint
    from utils.checkpoints.loading import load_model

    assert _train(run_cli, tiny_data_dir, "--save", "p.tar") == 0
    assert _train(run_cli, tiny_data_dir, "--save", "raw.tar", "--precise-bn", "0") == 0
    precise = load_checkpoint(tmp_path / "checkpoint" / "p.tar")
    raw = load_checkpoint(tmp_path / "checkpoint" / "raw.tar")
    assert precise["precise_bn"]["images"] == 36 and "precise_bn" not in raw
    assert load_checkpoint(tmp_path / "checkpoint" / "p.last.tar")["precise_bn"]["images"] == 36
    # Same seed, same weights; only the statistics differ, and they are the recomputed ones.
    key = "stages.0.0.1.running_var"
    assert torch.equal(precise["backbone"]["stages.0.0.0.weight"],
                       raw["backbone"]["stages.0.0.0.weight"])
    assert not torch.allclose(precise["backbone"][key], raw["backbone"][key])
    model = load_model(raw, torch.device("cpu"))
    splits = build_splits(tiny_data_dir / "synthface" / "train",
                          tiny_data_dir / "synthface" / "test", 32, with_train=False)
    recompute_bn_statistics(model, make_loader(splits.gallery, 12, 0, torch.device("cpu")),
                            torch.device("cpu"), progress=False)
    assert torch.allclose(model.backbone.state_dict()[key], precise["backbone"][key],
                          atol=1e-5)


def test_negative_precise_bn_is_a_usage_error(run_cli, tiny_data_dir, capsys, no_debug):
    assert _train(run_cli, tiny_data_dir, "--precise-bn", "-1") == 2
    one_line_error(capsys, "--precise-bn must be zero or positive")


def test_the_monitoring_curve_is_measured_with_precise_statistics(run_cli, tiny_data_dir,
                                                                  tmp_path, one_thread):
    """The validation curve and the final evaluation measure the same model: the last
    monitoring point equals the final mAP (both after precise BN), and the training
    weights and statistics are untouched by the monitoring."""
    from utils.checkpoints.store import load_checkpoint

    assert _train(run_cli, tiny_data_dir, "--save", "m.tar", "--eval-every", "1",
                  "--epochs", "2") == 0
    assert _train(run_cli, tiny_data_dir, "--save", "q.tar", "--eval-every", "0",
                  "--epochs", "2") == 0
    monitored = load_checkpoint(tmp_path / "checkpoint" / "m.last.tar")
    quiet = load_checkpoint(tmp_path / "checkpoint" / "q.last.tar")
    history = monitored["history"]
    assert all(h["monitor_precise_bn"] for h in history)
    result = json.loads((tmp_path / "results" / "m.json").read_text())
    best = history[result["checkpoint_epoch"] - 1]  # the lowest-loss epoch, evaluated
    assert best["monitor_mAP"] == pytest.approx(result["mAP"], abs=1e-9)
    for key, value in quiet["backbone"].items():  # monitoring changed nothing it trains
        assert torch.equal(value, monitored["backbone"][key]), key
    assert [h["loss"] for h in history] == [h["loss"] for h in quiet["history"]]


def test_train_from_python_gives_the_cli_checkpoint_precise_bn_included(tiny_data_dir,
                                                                        run_cli, tmp_path,
                                                                        one_thread):
    """``train()`` with the settings the CLI resolved writes the same model, precise BN
    included: precise BN is a step of training, not of the command line."""
    import torch

    from data.loaders import build_splits
    from models import NetConfig
    from utils.checkpoints import load_checkpoint
    from utils.training.loop import TrainSettings, train

    assert run_cli("--dataset", "synthface", "--data-dir", str(tiny_data_dir),
                   "--synthface-identities", "6", "--synthface-images", "6", "--len", "12",
                   "--num", "2", "--words", "64", "--epochs", "2", "--eval-every", "0",
                   "--bs", "12", "--workers", "0", "--no-progress", "--amp", "off",
                   "--precise-bn", "20", "--save", "cli.tar") == 0
    cli = load_checkpoint(tmp_path / "checkpoint" / "cli.tar")
    assert cli["precise_bn"]["images"] == 20

    given = dict(cli["train_settings"])
    given.update(best_path=tmp_path / "api.tar", last_path=tmp_path / "api.last.tar",
                 adam_betas=tuple(given["adam_betas"]))
    settings = TrainSettings(**given)
    config = NetConfig.from_dict(cli["config"])
    root = tiny_data_dir / "synthface"
    splits = build_splits(root / "train", root / "test", config.input_size, progress=False)
    train(config, settings, splits, torch.device("cpu"))
    api = load_checkpoint(tmp_path / "api.tar")
    assert api["precise_bn"] == cli["precise_bn"]
    assert api["epoch"] == cli["epoch"]
    for name, tensor in cli["backbone"].items():
        torch.testing.assert_close(api["backbone"][name], tensor, rtol=0, atol=0, msg=name)
