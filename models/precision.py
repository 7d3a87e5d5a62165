"""Where mixed precision stops: an autocast-free zone for the layers that must be float32.

The backbone's convolutions may run under bf16 autocast (``--amp``), but the features and
everything computed from them (the quantization head, the loss, the codes and the query
tables) are float32. :func:`fp32_zone` switches autocast off on every device type; the
face head that produces the features (:class:`models.backbone.FaceHead`) and
``utils.precision.run_fp32`` (heads and losses) both use it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# Device types whose autocast fp32_zone switches off.
AUTOCAST_DEVICES = tuple(d for d in ("cpu", "cuda", "mps", "xpu")
                         if torch.amp.is_autocast_available(d))


@contextlib.contextmanager
def fp32_zone() -> Iterator[None]:
    """Autocast disabled on every device type: ops inside run in their inputs' dtype."""
    with contextlib.ExitStack() as stack:
        for device_type in AUTOCAST_DEVICES:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
