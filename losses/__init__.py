"""The OPQN loss."""
from .opqn_loss import OPQNLoss, assignment_entropy, margin_cosine_logits

__all__ = ["OPQNLoss", "assignment_entropy", "margin_cosine_logits"]
