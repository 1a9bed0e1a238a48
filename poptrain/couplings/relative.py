"""Relative losses (seed 003): a combination of members' losses, e.g. ``w2*(L1 - L2)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from pydantic import Field, model_validator

from poptrain.config.schema import Component, CouplingConfig, Strict
from poptrain.couplings.base import Coupling, Quantity, register


class LossRef(Strict):
    """One member's loss (or one of its named objective terms), with a coefficient."""

    member: str = Field(description="The member whose loss is read.")
    coef: float = Field(1.0, description="Coefficient of this loss in the combination.")
    term: str = Field("loss", description="`loss` (the task loss) or the name of one of the member's `terms`.")


class RelativeConfig(CouplingConfig):
    terms: list[LossRef] = Field(
        default_factory=list,
        description="Linear combination `sum(coef * L[member])`; seed 003's `w2*(L1 - L2)` is `[{member: m1, coef: w2}, {member: m2, coef: -w2}]`.",
    )
    fn: Component | None = Field(
        None,
        description="Instead of `terms`: import path to `f(losses: dict[member, Tensor], **kwargs) -> scalar` "
        "over the task losses of `members`, for non-linear combinations such as `(L1 - L2)**2`.",
    )

    @model_validator(mode="after")
    def _one_form(self):
        if bool(self.terms) == (self.fn is not None):
            raise ValueError("give exactly one of `terms` (a linear combination) or `fn` (an import path)")
        return self


@register("relative")
class Relative(Coupling[RelativeConfig]):
    """``weight * (sum(coef_i * L_i))`` or ``weight * fn(losses)``, read after the forward pass.

    Trains every member it reads unless ``trains`` says otherwise. Taken literally, seed 003's
    ``w1*L1 + w2*(L1 - L2) + w3*(L1 - L3)`` trains members 2 and 3 to *increase* their own losses;
    ``trains: [m1]`` routes the term into m1 only ("the main model learns from the other two").
    In ``sync`` mode the losses are exchanged between forward and backward of the same step, so
    the peers' current losses enter non-linear combinations exactly.
    """

    Config = RelativeConfig
    config: RelativeConfig

    def __init__(self, config: RelativeConfig, population):
        super().__init__(config, population)
        self._fn: Callable[..., torch.Tensor] | None = None
        self._fn_kwargs: dict[str, Any] = {}
        if config.fn is not None:
            from poptrain.builtins import obtain

            self._fn, self._fn_kwargs = obtain(config.fn.given_or_name), config.fn.kwargs

    @classmethod
    def default_members(cls, config: RelativeConfig, population) -> list[str]:
        """The members its terms name, else every member."""
        return list(dict.fromkeys(ref.member for ref in config.terms)) if config.terms else list(population.members)

    def reads(self) -> list[Quantity]:
        if self._fn is not None:
            return [Quantity(m, "loss", "loss") for m in self.members]
        return list(dict.fromkeys(Quantity(ref.member, "loss", ref.term) for ref in self.config.terms))

    def value(self, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor:
        if self._fn is not None:
            return self._fn({m: q[Quantity(m, "loss", "loss")] for m in self.members}, **self._fn_kwargs)
        # A tensor: without `fn` the terms are not empty (RelativeConfig._one_form), and the builtin
        # sum's start, 0, plus a tensor is one.
        return cast(torch.Tensor, sum(ref.coef * q[Quantity(ref.member, "loss", ref.term)] for ref in self.config.terms))

    @classmethod
    def check_config(cls, config: RelativeConfig, run) -> list[tuple[str, str]]:
        problems = []
        names = run.member_names
        for index, ref in enumerate(config.terms):
            if ref.member not in names:
                problems.append((f"terms.{index}.member", f"unknown member {ref.member!r}; members are {names}"))
            elif ref.term != "loss" and ref.term not in [t.name for t in run.member(ref.member).terms]:
                problems.append((f"terms.{index}.term", f"member {ref.member!r} has no term {ref.term!r}"))
        read = {ref.member for ref in config.terms} if config.terms else set(config.members or names)
        for name in config.trains or []:
            if name not in read and name in names:
                problems.append(("trains", f"member {name!r} is trained but its loss is not read by this coupling"))
        if config.fn is not None:
            from poptrain.builtins import obtain

            try:
                obtain(config.fn.given_or_name)
            except (ImportError, AttributeError, ValueError) as exc:
                problems.append(("fn.name", str(exc)))
        return problems
