"""--backbone: the registry (sphere20 or a timm model), training a timm backbone from the CLI
and evaluating it from its checkpoint alone, --pretrained offline, FLOP counts."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import PROG, REPO, TINY_SYNTHFACE, one_line_error
from models import (BackboneError, FaceResNet20, NetConfig, RetrievalNet, build_backbone,
                    count_flops, count_parameters, parse_backbone_args)
from utils.checkpoints.store import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread", "no_debug")
CODES = ["--len", "8", "--num", "2", "--words", "16", "--feature-dim", "32"]
COMMON = ["--dataset", "synthface", *TINY_SYNTHFACE, "--bs", "12", "--workers", "0",
          "--no-progress", "--eval-every", "0", "--seed", "2", "--amp", "off"]


def test_sphere20_is_the_papers_network_unchanged():
    backbone = build_backbone("sphere20", 32, 8, 64)
    assert type(backbone) is FaceResNet20
    reference = FaceResNet20(64, 32, 8)
    assert list(backbone.state_dict()) == list(reference.state_dict())
    with pytest.raises(BackboneError, match="no pretrained weights for sphere20"):
        build_backbone("sphere20", 32, 8, 64, pretrained=True)


@pytest.mark.parametrize("size, side", [(32, 1), (112, 4)])
def test_timm_backbone_reads_its_map_size_with_a_dry_forward(size, side):
    backbone = build_backbone("resnet18", size, 64, 48)
    assert backbone.map_shape == (512, side, side)  # stride 32: 1x1 at 32, 4x4 at 112
    assert backbone.head[1].num_features == 512 * side * side  # BN over the flattened map
    out = backbone.train()(torch.randn(2, 3, size, size))
    assert out.shape == (2, 48)


def test_timm_backbone_args_reach_timm_and_bad_names_fail_clearly():
    args = parse_backbone_args(["output_stride=8"])
    assert args == {"output_stride": 8}
    assert build_backbone("resnet18", 32, 64, 16, backbone_args=args).map_shape == (512, 4, 4)
    with pytest.raises(BackboneError, match="unknown backbone 'resnet_nope'"):
        build_backbone("resnet_nope", 32, 64, 16)
    with pytest.raises(BackboneError, match="rejects --backbone-args"):
        build_backbone("resnet18", 32, 64, 16, backbone_args={"no_such_arg": 1})
    with pytest.raises(BackboneError, match="KEY=VALUE"):
        parse_backbone_args(["output_stride"])


def test_old_checkpoint_config_without_backbone_loads_as_sphere20():
    from utils.checkpoints.loading import load_model

    config = NetConfig(num_books=2, num_words=16, feature_dim=32, num_classes=3, width=4)
    model = RetrievalNet(config)
    old = config.to_dict()
    for key in ("backbone", "backbone_args", "pretrained", "margin_type"):
        del old[key]
    checkpoint = {"config": old, "backbone": model.backbone.state_dict(),
                  "quantizer": model.quantizer.state_dict()}
    loaded = load_model(checkpoint, torch.device("cpu"))
    assert type(loaded.backbone) is FaceResNet20
    assert loaded.config.backbone == "sphere20" and loaded.config.margin_type == "cosface"


def test_edgenext_trains_from_the_cli_and_evaluates_from_its_checkpoint_alone(
        tiny_data_dir, run_cli, tmp_path, capsys):
    data = ["--data-dir", str(tiny_data_dir)]
    assert run_cli(*COMMON, *data, *CODES, "--epochs", "2", "--backbone", "edgenext_x_small",
                   "--margin-type", "arcface", "--schedule", "cosine", "--save", "edge.tar") == 0
    checkpoint = load_checkpoint(tmp_path / "checkpoint" / "edge.tar")
    config = checkpoint["config"]
    assert (config["backbone"], config["backbone_args"], config["pretrained"],
            config["margin_type"]) == ("edgenext_x_small", {}, False, "arcface")
    assert any(key.startswith("body.") for key in checkpoint["backbone"])  # timm's weights
    trained = json.loads((tmp_path / "results" / "edge.json").read_text())
    assert trained["backbone"] == "edgenext_x_small"

    # -e needs nothing but the checkpoint: no --len/--num/--backbone.
    assert run_cli("-e", *COMMON, *data, "--load", "edge.tar", "--out", "eval") == 0
    result = json.loads((tmp_path / "eval" / "edge_on_synthface.json").read_text())
    assert result["backbone"] == "edgenext_x_small" and result["bits"] == 8
    assert result["mAP"] == pytest.approx(trained["mAP"], abs=1e-6)
    capsys.readouterr()

    # A contradicting --backbone is refused, with -e and with --resume, before any work.
    assert run_cli("-e", *COMMON, *data, "--load", "edge.tar", "--backbone", "sphere20") == 2
    one_line_error(capsys, "--backbone sphere20 contradicts checkpoint")
    assert run_cli(*COMMON, *data, *CODES, "--epochs", "3", "--backbone", "resnet18",
                   "--margin-type", "arcface", "--schedule", "cosine", "--save", "edge.tar",
                   "--resume") == 2
    one_line_error(capsys, "--resume: backbone resnet18", "edgenext_x_small")


def test_pretrained_offline_is_one_line_and_writes_nothing(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "OPQN_DEBUG"},
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "opqn_main.py"), "--dataset", "synthface",
                          "--data-dir", "data", *CODES, "--backbone", "resnet18", "--pretrained",
                          "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(PROG) and "--pretrained" in lines[0] and "offline" in lines[0]
    assert not [p.name for p in tmp_path.iterdir() if p.name != "hf"]  # no data, checkpoint


def test_pretrained_sphere20_is_a_usage_error(run_cli, tmp_path, capsys):
    assert run_cli("--dataset", "synthface", "--data-dir", str(tmp_path / "data"), *CODES,
                   "--pretrained") == 2
    one_line_error(capsys, "--pretrained", "sphere20")
    assert not (tmp_path / "data").exists()


def test_flop_counter_matches_the_analytic_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 10 * 10, 5))
    conv = 2 * (3 * 3 * 3) * 8 * 10 * 10  # 2 x (kernel x in-channels) x out-channels x h x w
    linear = 2 * 800 * 5
    assert count_flops(model, 10) == conv + linear
    sphere = FaceResNet20(32, 32, 4)
    assert count_parameters(sphere) == sum(p.numel() for p in sphere.parameters())
    assert count_flops(sphere) < count_flops(FaceResNet20(32, 112, 4))


USAGE_ERRORS = {
    "unknown-backbone": (["--backbone", "resnet_nope"], ["--backbone resnet_nope",
                                                         "unknown backbone"]),
    "width-with-timm": (["--backbone", "resnet18", "--width", "8"], ["--width", "sphere20"]),
    "bad-backbone-arg": (["--backbone", "resnet18", "--backbone-args", "output_stride"],
                         ["KEY=VALUE"]),
    "warmup-with-step": (["--warmup", "2"], ["--warmup", "--schedule cosine"]),
    "warmup-too-long": (["--schedule", "cosine", "--warmup", "3", "--epochs", "3"],
                        ["--warmup 3", "3 epochs"]),
    "margin-type-with-e": (["-e", "--load", "a.tar", "--margin-type", "arcface"],
                           ["--margin-type is for training"]),
    "bad-margin-type": (["--margin-type", "sphereface"], ["--margin-type", "sphereface"]),
}


@pytest.mark.parametrize("extra, fragments", list(USAGE_ERRORS.values()), ids=list(USAGE_ERRORS))
def test_usage_errors_are_one_line_before_any_work(extra, fragments, run_cli, tmp_path, capsys):
    argv = ["--dataset", "synthface", "--data-dir", str(tmp_path / "data"), "--no-progress"]
    codes = [] if "-e" in extra else CODES
    assert run_cli(*argv, *codes, *extra) == 2
    one_line_error(capsys, *fragments)
    assert not list(tmp_path.iterdir())  # no data generated, nothing written
