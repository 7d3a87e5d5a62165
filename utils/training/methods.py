"""Training defaults of each method (``--method``): optimiser, learning rate, weight decay
and Adam's betas, each as the method's authors trained it.

Every method shares OPQN's protocol (backbone, data, augmentation, epochs, schedule shape,
batch size) so that only the method differs. The optimiser is each method's own:

* opqn, l2q: SGD, lr 0.1, momentum 0.9, weight decay 5e-4 (the paper's).
* DPQ: SGD at lr 0.1. The OPQN authors' DPQ baseline (``dpq.py``) used 0.01 for 160
  epochs; with our budgets the comparison protocol's validation split chose 0.1
  (docs/methods.md); ``--lr 0.01`` gives theirs.
* GPQ: Adam at lr 2e-4 with beta1 = 0.5 and no weight decay (the GPQ authors' ``train.py``).
* DCDH: Adam with amsgrad at lr 0.005 and weight decay 1e-4 on the 32x32 sets (the DCDH
  authors'); SGD at :data:`DCDH_SGD_LR` (weight decay 5e-4) on the 112x112 protocols
  (VGGFace2 and cross-dataset), where its authors used SGD.

``--optimizer``, ``--lr``, ``--weight-decay``, ``--adam-betas`` and ``--amsgrad`` override
any of these.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_LR = 0.1
DCDH_SGD_LR = 0.01
METHOD_LR = {"dcdh": DCDH_SGD_LR}  # SGD learning rates other than 0.1
# Where our default differs from the lr its authors ran (they trained far longer).
AUTHORS_SGD_LR = {"dpq": 0.01}
SGD_WEIGHT_DECAY = 5e-4  # the paper's, and every SGD-trained baseline's
ADAM_LR = 1e-3  # a method without an Adam of its own, run with --optimizer adam


@dataclass(frozen=True)
class AdamForm:
    """How a method's authors ran Adam: lr, weight decay, betas and amsgrad."""

    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = False


# The methods whose authors trained with Adam. DCDH's authors turned amsgrad on for the
# network (not for the centres; we use it for all parameters).
METHOD_ADAM = {
    "gpq": AdamForm(lr=2e-4, weight_decay=0.0, betas=(0.5, 0.999), amsgrad=False),
    "dcdh": AdamForm(lr=0.005, weight_decay=1e-4, amsgrad=True),
}
# Adam for a method whose authors used SGD (only with --optimizer adam): the project's
# earlier form, amsgrad with the SGD weight decay.
GENERIC_ADAM = AdamForm(lr=ADAM_LR, weight_decay=SGD_WEIGHT_DECAY, amsgrad=True)


def default_optimizer(method: str, input_size: int) -> str:
    """``"adam"`` for GPQ, and for DCDH at 32x32; ``"sgd"`` otherwise."""
    if method == "gpq" or (method == "dcdh" and input_size == 32):
        return "adam"
    return "sgd"


def adam_form(method: str) -> AdamForm:
    """The method's own Adam settings, or :data:`GENERIC_ADAM`."""
    return METHOD_ADAM.get(method, GENERIC_ADAM)


def default_lr(method: str, optimizer: str) -> float:
    """The method's learning rate for the optimiser in use."""
    if optimizer == "adam":
        return adam_form(method).lr
    return METHOD_LR.get(method, DEFAULT_LR)


def authors_lr(method: str, optimizer: str) -> float:
    """The learning rate the method's authors used with this optimiser (the default,
    except where :data:`AUTHORS_SGD_LR` says otherwise)."""
    if optimizer == "sgd" and method in AUTHORS_SGD_LR:
        return AUTHORS_SGD_LR[method]
    return default_lr(method, optimizer)


def default_weight_decay(method: str, optimizer: str) -> float:
    """The method's weight decay for the optimiser in use."""
    return adam_form(method).weight_decay if optimizer == "adam" else SGD_WEIGHT_DECAY


# The hyper-parameters of each compared method: config field (flag --<field with dashes>),
# default (as in models.opqn.OPQNConfig) and help. opqn_main.py builds its flags from this
# table (a str default is a choice among METHOD_CHOICES) and utils.cli.pipeline copies the
# flags' values into the config.
METHOD_HYPERPARAMETERS: dict[str, tuple[tuple[str, float | str, str], ...]] = {
    "l2q": (("l2q_init", "normal", "initialisation of the learned codewords: normal "
                                   "(standard normal, as the OPQN authors' learned-codeword "
                                   "layer) or xavier (the project's earlier form); V_m is "
                                   "Xavier as OPQN's"),
            ("l2q_query", "raw", "the query sub-vector that gives P_m: raw (as training "
                                 "computes P_m) or normalized (the authors' evaluator, "
                                 "PqDistRet_Ortho_euclidean; flat after short training)")),
    "dpq": (("dpq_init", "xavier", "initialisation of V_m: xavier (Xavier uniform, as "
                                   "OPQN's V_m) or normal (standard normal, the authors'; "
                                   "saturated softmax, slow to train); the codewords are "
                                   "standard normal either way"),
            ("dpq_alpha", 0.25, "weight of the joint centre loss (0.25)"),
            ("dpq_gini_diversity", 1.0, "weight of the Gini diversity term (1)"),
            ("dpq_gini_sharpness", 0.01, "weight of the Gini sharpness term (0.01)")),
    "gpq": (("gpq_alpha", 20.0, "soft-assignment temperature alpha (20)"),
            ("gpq_beta", 4.0, "cosine-classifier scale beta (4)"),
            ("gpq_lambda_ce", 0.1, "weight lambda_2 of the classification loss (0.1)"),
            ("gpq_lambda_entropy", 0.0, "weight lambda_1 of the subspace minimax entropy "
                                        "(0 = off; the paper's 0.1 is for unlabelled data)")),
    "dcdh": (("dcdh_sigma", 0.25, "Gaussian similarity width sigma (0.25)"),
             ("dcdh_eta", 0.01, "quantization weight eta (0.01)"),
             ("dcdh_center_weight", 0.1, "weight of the centre separation term (0.1)")),
}
METHOD_CHOICES: dict[str, tuple[str, ...]] = {"l2q_init": ("normal", "xavier"),
                                              "l2q_query": ("raw", "normalized"),
                                              "dpq_init": ("xavier", "normal")}
