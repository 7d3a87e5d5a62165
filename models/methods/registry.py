"""The method registry: what a method is made of, and the table of methods by name.

A method is one module under ``models/methods/`` that defines its quantization head, its
loss, its hyper-parameters and one :class:`MethodSpec`, and calls :func:`register` on it.
Everything else (the command line, training, evaluation, checkpoints, the comparison tool)
reads methods from here, so adding a method touches its own file and one import line in
``models/methods/__init__.py``; a method defined outside the project registers the same way.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

from torch import nn

# The method of a run that names none, and of checkpoints written before methods existed.
DEFAULT_METHOD = "opqn"

# What --amp auto does for a method (utils.precision.resolve_amp): train in float32, or
# bf16 where the hardware has it, or bf16 only when precise BN follows training.
BF16_POLICIES = ("float32", "bf16", "bf16_with_precise_bn")


@dataclass(frozen=True)
class AdamForm:
    """How a method's authors ran Adam: lr, weight decay, betas and amsgrad."""

    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = False


SGD_LR = 0.1  # the paper's, and the default of every SGD-trained method
SGD_WEIGHT_DECAY = 5e-4  # the paper's, and every SGD-trained baseline's
# Adam for a method whose authors used SGD (only with --optimizer adam): amsgrad with the
# SGD weight decay.
GENERIC_ADAM = AdamForm(lr=1e-3, weight_decay=SGD_WEIGHT_DECAY, amsgrad=True)


def param(default: float | str, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field of a method's parameter dataclass: its default, the help of its flag
    (``--<name with dashes>``) and, for a text value, its choices."""
    if isinstance(default, str) and not choices:
        raise ValueError(f"a text parameter needs its choices (default {default!r})")
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class NoParams:
    """The parameter set of a method without hyper-parameters of its own."""


@dataclass(frozen=True)
class ParamInfo:
    """One hyper-parameter as the command line shows it."""

    name: str
    default: float | str
    help: str
    choices: tuple[str, ...] | None


@dataclass(frozen=True)
class MethodSpec:
    """Everything the project needs to know about a method.

    Args:
        name: the ``--method`` value, stored in checkpoints.
        title: the name in tables and plots.
        summary: a few words for ``--method``'s help.
        build_head: ``config -> QuantHead`` (``config`` a :class:`models.NetConfig`; the
            method's parameters are ``config.params``).
        build_loss: ``config -> loss``, called as ``loss(*head(features), labels)`` and
            returning ``(scalar, parts)``; the loss names its parts in ``PARTS`` and has
            ``chance_levels() -> {part: value}`` for its identity cross-entropies.
        params: a frozen dataclass of the method's hyper-parameters, each made by
            :func:`param`; field names are global (``dpq_alpha``), as flags and checkpoints
            hold them.
        hashing: binary codes of ``--len`` bits (no ``--num``/``--words``; D = L).
        orthonormal: fixed orthonormal codewords, hence K <= d.
        optimizer: the optimiser its authors trained with, ``"sgd"`` or ``"adam"``;
            ``optimizer_112`` where it differs on 112x112 inputs.
        sgd_lr: the SGD learning rate; ``authors_sgd_lr`` where its authors ran another.
        adam: its authors' Adam settings (None: :data:`GENERIC_ADAM`).
        bf16: one of :data:`BF16_POLICIES`, what ``--amp auto`` trains it in.
        legacy_defaults: parameter values that checkpoints written before the parameter
            existed were trained with.
    """

    name: str
    title: str
    summary: str
    build_head: Callable[[Any], nn.Module]
    build_loss: Callable[[Any], nn.Module]
    params: type = NoParams
    hashing: bool = False
    orthonormal: bool = False
    optimizer: str = "sgd"
    optimizer_112: str | None = None
    sgd_lr: float = SGD_LR
    authors_sgd_lr: float | None = None
    adam: AdamForm | None = None
    bf16: str = "float32"
    legacy_defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bf16 not in BF16_POLICIES:
            raise ValueError(f"method {self.name!r}: bf16 must be one of {BF16_POLICIES}")
        for choice in (self.optimizer, self.optimizer_112 or "sgd"):
            if choice not in ("sgd", "adam"):
                raise ValueError(f"method {self.name!r}: unknown optimizer {choice!r}")
        unknown = set(self.legacy_defaults) - set(self.param_names())
        if unknown:
            raise ValueError(f"method {self.name!r}: legacy defaults of unknown parameters "
                             f"{sorted(unknown)}")

    def param_info(self) -> tuple[ParamInfo, ...]:
        """The hyper-parameters, in declaration order."""
        return tuple(ParamInfo(f.name, f.default, f.metadata.get("help", ""),
                               f.metadata.get("choices")) for f in fields(self.params)
                     if f.default is not MISSING)

    def param_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.params))

    def make_params(self, given: dict[str, Any] | None = None, legacy: bool = False) -> Any:
        """The typed parameters from ``given`` (names this method lacks are ignored); the
        rest take their defaults, or with ``legacy`` the legacy defaults first."""
        names = set(self.param_names())
        values = {**(self.legacy_defaults if legacy else {}),
                  **{k: v for k, v in (given or {}).items() if k in names}}
        for info in self.param_info():
            value = values.get(info.name, info.default)
            if info.choices and value not in info.choices:
                raise ValueError(f"{self.name}: unknown {info.name} {value!r}; choose "
                                 f"{' or '.join(info.choices)}")
        return self.params(**values)

    def optimizer_for(self, input_size: int) -> str:
        """``"sgd"`` or ``"adam"``: the optimiser its authors used at this input size."""
        return (self.optimizer_112 or self.optimizer) if input_size == 112 else self.optimizer

    def adam_form(self) -> AdamForm:
        return self.adam or GENERIC_ADAM

    def default_lr(self, optimizer: str) -> float:
        return self.adam_form().lr if optimizer == "adam" else self.sgd_lr

    def authors_lr(self, optimizer: str) -> float:
        """The lr its authors ran (the default, except where ``authors_sgd_lr`` differs)."""
        if optimizer == "sgd" and self.authors_sgd_lr is not None:
            return self.authors_sgd_lr
        return self.default_lr(optimizer)

    def default_weight_decay(self, optimizer: str) -> float:
        return self.adam_form().weight_decay if optimizer == "adam" else SGD_WEIGHT_DECAY


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; its parameter names must not clash with another method's (they are
    flags and checkpoint keys)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    taken = {n: other.name for other in _REGISTRY.values() for n in other.param_names()}
    clash = [n for n in spec.param_names() if n in taken]
    if clash:
        raise ValueError(f"method {spec.name!r}: parameters {clash} belong to "
                         f"{taken[clash[0]]!r}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (a test's or a plug-in's); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; ValueError naming the known methods otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from "
                         f"{', '.join(_REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (the default first)."""
    return tuple(_REGISTRY)


def hashing_methods() -> tuple[str, ...]:
    return tuple(n for n, s in _REGISTRY.items() if s.hashing)


def orthonormal_methods() -> tuple[str, ...]:
    return tuple(n for n, s in _REGISTRY.items() if s.orthonormal)
