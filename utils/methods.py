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


# The hyper-parameters of each compared method: config field (flag --<field with dashes>),
# default (as in models.opqn.OPQNConfig) and help. opqn_main.py builds its flags from this
# table and utils.pipeline copies the flags' values into the config.
METHOD_HYPERPARAMETERS: dict[str, tuple[tuple[str, float, str], ...]] = {
    "dpq": (("dpq_alpha", 0.25, "weight of the joint centre loss (0.25)"),),
    "gpq": (("gpq_alpha", 20.0, "soft-assignment temperature alpha (20)"),
            ("gpq_beta", 4.0, "cosine-classifier scale beta (4)"),
            ("gpq_lambda_ce", 0.1, "weight lambda_2 of the classification loss (0.1)"),
            ("gpq_lambda_entropy", 0.0, "weight lambda_1 of the subspace minimax entropy "
                                        "(0 = off; the paper's 0.1 is for unlabelled data)")),
    "dcdh": (("dcdh_sigma", 0.25, "Gaussian similarity width sigma (0.25)"),
             ("dcdh_eta", 0.01, "quantization weight eta (0.01)"),
             ("dcdh_center_weight", 0.1, "weight of the centre separation term (0.1)")),
}
