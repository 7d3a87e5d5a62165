"""Training defaults of each method (``--method``): learning rate and optimiser.

Every method shares OPQN's protocol (SGD, schedule, epochs, augmentation, batch size) so
that only the method differs, except where its authors trained it otherwise:

* DPQ: lr 0.01 (the OPQN authors' DPQ baseline).
* DCDH: Adam with amsgrad at lr 0.005 on the 32x32 sets (the DCDH authors'); SGD on the
  112x112 protocols (VGGFace2 and cross-dataset, where its authors used SGD) at
  :data:`DCDH_SGD_LR`.
"""
from __future__ import annotations

DEFAULT_LR = 0.1
METHOD_LR = {"dpq": 0.01, "dcdh": 0.005}
DCDH_SGD_LR = 0.01


def default_optimizer(method: str, input_size: int) -> str:
    """``"adam"`` for DCDH at 32x32, ``"sgd"`` otherwise."""
    return "adam" if method == "dcdh" and input_size == 32 else "sgd"


def default_lr(method: str, optimizer: str) -> float:
    """The method's learning rate for the optimiser in use."""
    if method == "dcdh" and optimizer == "sgd":
        return DCDH_SGD_LR
    return METHOD_LR.get(method, DEFAULT_LR)
