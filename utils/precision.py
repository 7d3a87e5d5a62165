"""Mixed precision: where bf16 autocast runs, and the fp32 zone around heads and losses.

Policy (``--amp``): the backbone may run under bf16 autocast with channels_last tensors; the
quantization head, the loss, the codes and the query tables always run in float32 with
autocast disabled.  Under autocast the einsums of a head or a loss would otherwise run in
bf16 even on ``.float()`` inputs, and at scale s = 40 bf16 logits near the target are 0.25
apart.  :func:`run_fp32` is the single entry point that training and evaluation use to call
any head or loss, so heads and losses added later are covered without changes of their own.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch

from models.methods import DEFAULT_METHOD, get_method
from models.precision import AUTOCAST_DEVICES, fp32_zone

AMP_CHOICES = ("auto", "bf16", "off")


# Overrides the CPU probe, so that the suite can be run as on a CPU with AMX or without it:
# OPQN_CPU_BF16_PROBE=amx | avx512_bf16 | none.
PROBE_ENV = "OPQN_CPU_BF16_PROBE"
_PROBE_CHOICES = {"amx": {"amx": True, "avx512_bf16": True},
                  "avx512_bf16": {"amx": False, "avx512_bf16": True},
                  "none": {"amx": False, "avx512_bf16": False}}


def cpu_bf16_hardware() -> dict[str, bool]:
    """What this torch build reports of bf16 matrix hardware on this CPU: ``amx`` (AMX
    tiles) and ``avx512_bf16``. Without either, bf16 autocast is emulated and slow.
    The environment variable ``OPQN_CPU_BF16_PROBE`` (amx, avx512_bf16 or none) replaces
    the probe's answer."""
    forced = os.environ.get(PROBE_ENV)
    if forced:
        if forced not in _PROBE_CHOICES:
            raise ValueError(f"{PROBE_ENV} must be one of {', '.join(_PROBE_CHOICES)}, "
                             f"got {forced!r}")
        return dict(_PROBE_CHOICES[forced])

    def probe(name: str) -> bool:
        check = getattr(torch.cpu, name, None)
        return bool(check is not None and check())

    return {"amx": probe("_is_amx_tile_supported"),
            "avx512_bf16": probe("_is_avx512_bf16_supported")}


def resolve_amp(choice: str, device: torch.device, method: str = DEFAULT_METHOD,
                precise_bn: bool = True) -> bool:
    """``--amp`` to a yes/no for training ``method`` on ``device``; ``bf16`` and ``off``
    force it.

    ``auto`` is bf16 on CUDA and on CPUs with AMX for the methods whose bf16 training
    holds mAP (``MethodSpec.bf16``: OPQN's only with ``precise_bn``; docs/training.md,
    "Mixed precision"), and float32 everywhere else. A CPU with AVX512-BF16 but no AMX
    stays float32: there bf16 made the quick-start job only 1.14-1.27x faster; without
    either, bf16 is emulated and several times slower.
    """
    if choice not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {choice!r}")
    if choice == "off":
        return False
    if choice == "bf16":
        return True
    policy = get_method(method).bf16
    if policy == "float32" or (policy == "bf16_with_precise_bn" and not precise_bn):
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_bf16_hardware()["amx"]


def precision_name(use_amp: bool) -> str:
    """How a run's backbone trained: ``"bf16"`` (autocast) or ``"float32"``."""
    return "bf16" if use_amp else "float32"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled`` (a no-op context otherwise)."""
    if not enabled or device.type not in AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_memory_format(tensor: torch.Tensor, amp: bool) -> torch.Tensor:
    """Images ``(B, 3, S, S)`` in channels_last when bf16 is on (it follows ``--amp``)."""
    return tensor.contiguous(memory_format=torch.channels_last) if amp else tensor


def _as_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    if isinstance(value, (tuple, list)):
        return type(value)(_as_fp32(v) for v in value)
    return value


def run_fp32(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with autocast disabled and floating tensor arguments (also
    inside tuples and lists) cast to float32.  Use it to call any quantization head, its
    encode / lookup-table methods, and any loss."""
    with fp32_zone():
        return fn(*_as_fp32(args), **{k: _as_fp32(v) for k, v in kwargs.items()})
