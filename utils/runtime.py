"""Device choice, DataLoader worker count and (optional) torchrun distributed setup."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def mps_available() -> bool:
    """Apple-silicon GPU (Metal Performance Shaders) usable by this torch build."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present, else MPS (Apple GPUs) when present, else the CPU.
    ``cuda``, ``cuda:N`` or ``mps`` fail clearly when there is no such GPU."""
    name = name.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise DeviceError("--device mps: MPS (Apple GPU) is not available on this machine "
                              "(use --device cpu or auto)")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if name != "cuda" and not name[5:].isdecimal():
            raise DeviceError(f"--device {name!r}: unknown device (choose auto, cpu, cuda, "
                              f"cuda:N or mps)")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine "
                              f"(use --device cpu or auto)")
        index = local_rank if name == "cuda" else int(name[5:])
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present")
        return torch.device("cuda", index)
    raise DeviceError(f"--device {name!r}: unknown device (choose auto, cpu, cuda, cuda:N or "
                      f"mps)")


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for running sums, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def metrics_device(device: torch.device) -> torch.device:
    """Where retrieval metrics run: the model's device, but the CPU for MPS (the metrics
    need float64, which MPS lacks)."""
    return torch.device("cpu") if device.type == "mps" else device


def memory_budget(device: torch.device) -> tuple[int, str]:
    """Bytes a model's parameters may take before building it, and where that comes from.

    Half of the physical memory (the rest is for the backbone, activations and data), and
    of the GPU's memory on CUDA: the codebooks are built on the CPU, then moved.
    """
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: assume a modest machine
        ram = 16 * 2**30
    budget, where = ram // 2, f"half of this machine's {ram / 2**30:.1f} GiB of memory"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if total // 2 < budget:
            budget, where = total // 2, f"half of {device}'s {total / 2**30:.1f} GiB"
    return budget, where


@dataclass
class DistInfo:
    """This process's place in a torchrun job (world_size 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

