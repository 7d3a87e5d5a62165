"""Mixed precision stops at the features: heads, losses, codes and query tables in fp32."""

import pytest
import torch
from torch.utils.data import DataLoader


import models.methods.opqn as opqn_loss  # noqa: E402
from data.datasets import collate_skip_broken  # noqa: E402
from models import RetrievalNet, NetConfig  # noqa: E402
from utils.retrieval.encoding import encode_gallery, encode_queries, extract_features  # noqa: E402
from utils.precision import resolve_amp, run_fp32  # noqa: E402
from utils.training.loop import OPQNTrainingModule, build_criterion  # noqa: E402


def tiny_model(seed: int = 0) -> tuple[RetrievalNet, NetConfig]:
    torch.manual_seed(seed)
    config = NetConfig(num_books=4, num_words=16, feature_dim=64, num_classes=5, width=8,
                        scale=40.0)
    return RetrievalNet(config), config


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is False
    assert resolve_amp("bf16", cpu) is True
    assert resolve_amp("auto", torch.device("cuda", 0)) is True
    with pytest.raises(ValueError):
        resolve_amp("fp16", cpu)


@pytest.mark.parametrize("amx,avx512_bf16,expected", [
    (True, True, True), (False, True, False), (False, False, False)])
def test_auto_amp_on_cpu_needs_amx(monkeypatch, amx, avx512_bf16, expected):
    import utils.precision as precision

    monkeypatch.delenv(precision.PROBE_ENV, raising=False)  # the real probe, patched
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    assert precision.cpu_bf16_hardware() == {"amx": amx, "avx512_bf16": avx512_bf16}
    assert resolve_amp("auto", torch.device("cpu")) is expected
    assert resolve_amp("bf16", torch.device("cpu")) is True


def test_head_and_loss_stay_fp32_under_cpu_autocast(monkeypatch, one_thread):
    model, config = tiny_model()
    module = OPQNTrainingModule(model, build_criterion(config)).train()
    seen = {}
    model.quantizer.register_forward_hook(
        lambda _m, inputs, out: seen.update(head_in=inputs[0], head_out=out))
    model.backbone.register_forward_hook(lambda _m, _i, out: seen.update(features=out))
    model.backbone.stages.register_forward_hook(lambda _m, _i, out: seen.update(fmap=out))
    logits = []
    real = opqn_loss.margin_cosine_logits
    monkeypatch.setattr(opqn_loss, "margin_cosine_logits",
                        lambda *a, **k: logits.append(real(*a, **k)) or logits[-1])
    images = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = module(images, labels)
    assert seen["fmap"].dtype == torch.bfloat16  # autocast really ran the convolutions
    assert seen["features"].dtype == torch.float32  # ... and stopped at the features
    sub, soft, probs = seen["head_out"]
    for name, t in (("input", seen["head_in"]), ("x_m", sub), ("s_m", soft), ("p_m", probs),
                    ("loss", loss), *((f"logits{i}", t) for i, t in enumerate(logits))):
        assert t.dtype == torch.float32, name
    assert len(logits) == 2
    # Bit-identical to the head and loss run in fp32 on the same (bf16-made) features.
    feats = seen["features"].float()
    ref_sub, ref_soft, ref_probs = model.quantizer(feats)
    assert torch.equal(soft, ref_soft) and torch.equal(probs, ref_probs)
    ref_logits = real(ref_soft, module.criterion.class_weights, labels, config.margin,
                      config.scale)
    assert torch.equal(logits[1], ref_logits)
    # Sanity: without the fp32 zone autocast would change the soft assignment.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model.quantizer.assignment_logits(model.quantizer.split(feats))
    assert raw.dtype == torch.bfloat16


def test_codes_and_tables_fp32_from_bf16_features(one_thread):
    model, _ = tiny_model(1)
    data = [(torch.randn(3, 32, 32), i % 3) for i in range(24)]
    loader = DataLoader(data, batch_size=5, collate_fn=collate_skip_broken)
    feats, _ = extract_features(model, loader, torch.device("cpu"), progress=False, amp=True)
    assert feats.dtype == torch.float32
    codes, labels = encode_gallery(model, loader, torch.device("cpu"), progress=False, amp=True)
    tables, _ = encode_queries(model, loader, torch.device("cpu"), progress=False, amp=True)
    assert codes.dtype == torch.uint8 and codes.shape == (24, 4) and labels.shape == (24,)
    assert tables.dtype == torch.float32 and tables.shape == (24, 4, 16)
    with torch.no_grad():
        assert torch.equal(codes, model.quantizer.encode(feats))
        assert torch.equal(tables, model.quantizer.lookup_tables(feats))
        # run_fp32 inside an outer autocast gives the same fp32 tables; plain calls do not.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = run_fp32(model.quantizer.lookup_tables, feats.bfloat16())
            plain = model.quantizer.lookup_tables(feats)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, model.quantizer.lookup_tables(feats.bfloat16().float()))
    assert not torch.equal(plain, tables)


def test_amp_flag_in_help(capsys):
    import opqn_main

    with pytest.raises(SystemExit):
        opqn_main.main(["--help"])
    out = capsys.readouterr().out
    assert "--amp {auto,bf16,off}" in out


@pytest.mark.parametrize("forced,amx,avx512_bf16", [
    ("amx", True, True), ("avx512_bf16", False, True), ("none", False, False)])
def test_probe_override_from_the_environment(monkeypatch, forced, amx, avx512_bf16):
    import utils.precision as precision

    # The hardware says the opposite of the override: the override wins.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not amx, raising=False)
    monkeypatch.setenv(precision.PROBE_ENV, forced)
    assert precision.cpu_bf16_hardware() == {"amx": amx, "avx512_bf16": avx512_bf16}
    assert resolve_amp("auto", torch.device("cpu")) is amx
    assert resolve_amp("off", torch.device("cpu")) is False


def test_bad_probe_override_is_named(monkeypatch):
    import utils.precision as precision

    monkeypatch.setenv(precision.PROBE_ENV, "sapphire")
    with pytest.raises(ValueError, match="OPQN_CPU_BF16_PROBE must be one of amx"):
        precision.cpu_bf16_hardware()


def test_bf16_training_from_the_cli(run_cli, tiny_data_dir, tmp_path, capsys, one_thread):
    """--amp bf16 forces bf16 training on any CPU: the log says so, the convolutions ran in
    bf16, the run trains past chance and its checkpoint evaluates in float32."""
    import json

    from conftest import TINY_SYNTHFACE
    from models.backbone import FaceResNet20

    seen = []
    original = FaceResNet20.forward

    def spy(self, images):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, images)

    FaceResNet20.forward = spy
    try:
        code = run_cli("--dataset", "synthface", "--data-dir", str(tiny_data_dir),
                       *TINY_SYNTHFACE, "--len", "12", "--num", "2", "--words", "64",
                       "--epochs", "3", "--eval-every", "0", "--bs", "12", "--workers", "0",
                       "--no-progress", "--width", "4", "--seed", "1", "--amp", "bf16",
                       "--save", "b.tar")
    finally:
        FaceResNet20.forward = original
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "bf16 autocast on" in out
    assert any(seen) and not seen[-1]  # bf16 in training, float32 in the evaluation
    result = json.loads((tmp_path / "results" / "b.json").read_text())
    assert result["amp"] is False and result["mAP"] > 0.3  # chance is about 0.17


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_is_float32_where_bf16_costs_accuracy(monkeypatch, device):
    import utils.precision as precision

    monkeypatch.setenv(precision.PROBE_ENV, "amx")
    where = torch.device(device)
    from models.methods import get_method

    for method in ("opqn", "gpq", "dcdh"):  # measured in bf16
        needs_precise_bn = get_method(method).bf16 == "bf16_with_precise_bn"
        assert resolve_amp("auto", where, method, precise_bn=True) is True
        assert resolve_amp("auto", where, method, precise_bn=False) is (not needs_precise_bn)
    assert get_method("opqn").bf16 == "bf16_with_precise_bn"  # measured: it needs precise BN
    for method in ("l2q", "dpq"):  # not measured in bf16: float32
        assert resolve_amp("auto", where, method) is False
        assert resolve_amp("bf16", where, method) is True
