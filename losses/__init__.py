"""The OPQN loss and the target-class margins it uses."""
from .margins import MARGIN_TYPES, apply_margin, arcface_margin, cosface_margin
from .opqn_loss import OPQNLoss, assignment_entropy, margin_cosine_logits

__all__ = ["OPQNLoss", "assignment_entropy", "margin_cosine_logits", "MARGIN_TYPES",
           "apply_margin", "arcface_margin", "cosface_margin"]
