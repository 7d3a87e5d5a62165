"""Device choice and (optional) torchrun distributed setup."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU. ``cuda`` or ``cuda:N`` fail clearly
    when there is no such GPU."""
    name = name.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if name != "cuda" and not name[5:].isdecimal():
            raise DeviceError(f"--device {name!r}: unknown device (choose auto, cpu, cuda or "
                              f"cuda:N)")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine "
                              f"(use --device cpu or auto)")
        index = local_rank if name == "cuda" else int(name[5:])
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present")
        return torch.device("cuda", index)
    raise DeviceError(f"--device {name!r}: unknown device (choose auto, cpu, cuda or cuda:N)")


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
