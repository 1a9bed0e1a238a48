"""The coupling interface: a cross-member term answers a few questions and nothing else.

* :meth:`Coupling.reads` — which quantities of which members it needs
  (:class:`Quantity`: a member's named parameter, its loss or one of its terms).
* :meth:`Coupling.value` — a scalar computed from those quantities.
* ``trains`` — whose objective the (weighted) value enters. A member not trained by the
  coupling does not evaluate it at all, which is the same as seeing its own quantity detached.
* optionally :meth:`Coupling.exchange_transform` — values that replace members' own
  quantities at an exchange (averaging parameters, summing shared gradients).

Where the value is computed, and why the gradient is exact: every member evaluates the
couplings that train it with its *own* quantities live (attached to its autograd graph) and
its peers' quantities from the last exchange (plain tensors). The gradient of
``weight * value`` with respect to the member's parameters is then exactly the gradient of
the joint single-process objective with respect to those parameters whenever the peers'
values are current, i.e. with ``exchange.every: 1`` in ``sync`` mode. The coordinator
evaluates every coupling on the whole (detached) population for logging.

Add a coupling by subclassing :class:`Coupling` (and its ``Config`` for new fields) and
decorating it with ``@register("name")``; or name the class by import path in the config.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Literal, Mapping

import torch

from poptrain.config import CouplingConfig

if TYPE_CHECKING:
    from poptrain.config import RunConfig

Kind = Literal["param", "loss", "grad"]
# When a kind is known within a step, which is when it can be exchanged:
# parameters before the forward pass, losses/terms after it, gradients after the backward pass.
PHASES: tuple[Kind, ...] = ("param", "loss", "grad")


@dataclass(frozen=True, order=True)
class Quantity:
    """One exchanged quantity: ``kind`` ``key`` of ``member`` (e.g. param ``activation.weight`` of ``m1``)."""

    member: str
    kind: Kind
    key: str

    def __str__(self) -> str:
        return f"{self.member}/{self.kind}/{self.key}"


@dataclass
class PopulationInfo:
    """What couplings may know about the population before it starts: member names and parameter shapes."""

    members: list[str]
    param_shapes: dict[str, dict[str, tuple[int, ...]]]  # member -> parameter name -> shape
    trainable: dict[str, dict[str, bool]] = field(default_factory=dict)  # member -> parameter -> not frozen
    terms: dict[str, list[str]] = field(default_factory=dict)  # member -> its objective terms (always has "loss")
    exchange_every: int = 1

    def params_matching(self, member: str, patterns: list[str]) -> list[str]:
        return [n for n in self.param_shapes[member] if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


class Coupling(ABC):
    """Base of every coupling. Subclasses implement :meth:`reads` and :meth:`value` (or
    :meth:`exchange_transform`) and may extend :attr:`Config` with their own fields."""

    Config: ClassVar[type[CouplingConfig]] = CouplingConfig
    # False where the coupling keeps members' parameters identical step by step, which restoring
    # one member alone from its checkpoint (`failure.nonfinite: rollback`) would break.
    allows_rollback: ClassVar[bool] = True

    def __init__(self, config: CouplingConfig, population: PopulationInfo):
        self.config = config
        self.population = population
        self.name = config.label
        self.weight = config.weight
        self.members: list[str] = list(config.members or population.members)
        self.trains: list[str] = list(config.trains if config.trains is not None else self.members)

    # -- the questions a coupling answers ------------------------------------------------------

    @abstractmethod
    def reads(self) -> list[Quantity]:
        """The quantities :meth:`value` needs. Parameters are read before the forward pass,
        losses and terms after it (so a loss-reading coupling exchanges mid-step)."""

    def value(self, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        """The coupling term (a 0-dim tensor, before ``weight``), differentiable in the quantities.
        ``None`` means this coupling adds no term (it acts through :meth:`exchange_transform`)."""
        return None

    def metrics(self, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """Extra values to log under ``coupling/<name>/...`` (e.g. pairwise distances)."""
        return {}

    def exchange_transform(
        self, kind: Kind, q: Mapping[Quantity, torch.Tensor], exchange_index: int, final: bool
    ) -> dict[Quantity, torch.Tensor]:
        """Replacement values for members' own quantities of ``kind`` at an exchange (e.g. averaged
        parameters), computed once by the coordinator on the whole population. ``exchange_index``
        counts the exchanges of this kind from 0; ``final`` marks the parameter exchange after the
        last step.

        An override that declares a keyword ``out`` receives, when some written quantities live
        in memory shared with the coordinator, ``{Quantity: tensor}`` of those members' own
        parameters: it may compute their replacements straight into them and return those same
        tensors (anything else returned is copied in). Values in ``q`` must not be written."""
        return {}

    def transforms(self) -> set[Kind]:
        """The kinds :meth:`exchange_transform` may replace (empty for pure terms)."""
        return set()

    def writes(self) -> list[Quantity]:
        """The members' own quantities :meth:`exchange_transform` may replace."""
        return []

    # -- checks, before anything starts ------------------------------------------------------

    @classmethod
    def check_config(cls, config: CouplingConfig, run: "RunConfig") -> list[tuple[str, str]]:
        """Problems visible from the config alone, as (key relative to the coupling, reason)."""
        return []

    def check_population(self) -> list[tuple[str, str]]:
        """Problems that need the models (missing parameters, shape mismatches)."""
        return []

    # -- helpers for subclasses --------------------------------------------------------------

    def term(self, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        value = self.value(q)
        return None if value is None else self.weight * value


COUPLINGS: dict[str, type[Coupling]] = {}


def register(name: str) -> Callable[[type[Coupling]], type[Coupling]]:
    """Class decorator: make a coupling available to configs as ``type: <name>``."""

    def decorate(cls: type[Coupling]) -> type[Coupling]:
        if name in COUPLINGS and COUPLINGS[name] is not cls:
            raise ValueError(f"a coupling named {name!r} is already registered ({COUPLINGS[name].__qualname__})")
        COUPLINGS[name] = cls
        return cls

    return decorate


def resolve_coupling(type_name: str) -> type[Coupling]:
    """The coupling class for a config's ``type``: a registered name or an import path."""
    if ":" in type_name:
        from poptrain.builtins import import_path

        cls = import_path(type_name)
        if not (isinstance(cls, type) and issubclass(cls, Coupling)):
            raise TypeError(f"{type_name!r} is not a subclass of poptrain.couplings.Coupling")
        return cls
    if type_name not in COUPLINGS:
        raise ValueError(f"unknown coupling type {type_name!r}; registered: {sorted(COUPLINGS)}, or give an import path `package.module:Class`")
    return COUPLINGS[type_name]


def build_couplings(configs: list[CouplingConfig], population: PopulationInfo) -> list[Coupling]:
    return [resolve_coupling(c.type)(c, population) for c in configs]
