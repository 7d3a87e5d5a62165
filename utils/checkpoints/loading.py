"""A checkpoint dict back into a model, ready to encode."""
from __future__ import annotations

import torch

from models import RetrievalNet, NetConfig
from utils.errors import CheckpointError, first_line


def load_model(checkpoint: dict, device: torch.device) -> RetrievalNet:
    """Rebuild the model of a checkpoint dict (from :func:`load_checkpoint`)."""
    config = NetConfig.from_dict(checkpoint["config"])
    model = RetrievalNet(config)
    try:
        model.backbone.load_state_dict(checkpoint["backbone"])
        model.quantizer.load_state_dict(checkpoint["quantizer"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint weights do not match its configuration: "
                              f"{first_line(exc, limit=300)}") from None
    return model.to(device).eval()
