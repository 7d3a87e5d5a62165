"""FLOPs and parameters of a backbone, counted by torch's own ``FlopCounterMode``."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, input_size: int | None = None) -> int:
    """Forward FLOPs for one ``(1, 3, S, S)`` image (a multiply-add counts 2).

    ``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products that dominate
    (convolutions, linear layers, attention); element-wise ops such as BN and activations
    are not counted. ``S`` defaults to ``model.input_size``. Runs in eval mode, no grad.
    """
    size = input_size if input_size is not None else model.input_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
