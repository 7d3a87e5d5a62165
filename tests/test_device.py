"""Device selection: auto prefers CUDA, then MPS (Apple GPUs), then the CPU. There is no Mac
here, so the availability checks are patched."""
import pytest
import torch

from conftest import one_line_error
from utils.runtime import DeviceError, resolve_device


def _patch(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if cuda else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"),
                                                 (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    _patch(monkeypatch, cuda, mps)
    assert resolve_device("auto").type == expected


def test_mps_on_request(monkeypatch):
    _patch(monkeypatch, cuda=False, mps=True)
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("MPS").type == "mps"
    _patch(monkeypatch, cuda=True, mps=False)
    with pytest.raises(DeviceError, match="MPS .*not available"):
        resolve_device("mps")


def test_cli_mps_without_an_apple_gpu_is_one_line(monkeypatch, run_cli, tmp_path, capsys,
                                                  no_debug):
    _patch(monkeypatch, cuda=False, mps=False)
    assert run_cli("--dataset", "synthface", "--data-dir", str(tmp_path / "data"), "--len",
                   "8", "--num", "2", "--device", "mps") == 2
    one_line_error(capsys, "--device mps", "not available")
    assert not (tmp_path / "data").exists()


def test_mps_keeps_float64_work_on_the_cpu():
    from utils.runtime import accumulator_dtype, metrics_device

    mps, cpu = torch.device("mps"), torch.device("cpu")
    assert metrics_device(mps) == cpu and accumulator_dtype(mps) == torch.float32
    assert metrics_device(cpu) == cpu and accumulator_dtype(cpu) == torch.float64
