"""Shared modules (seed 002's weight sharing, across members): parameters kept identical everywhere."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field

from poptrain.config.schema import CouplingConfig
from poptrain.couplings.averaging import check_same_parameters
from poptrain.couplings.base import Coupling, Kind, Quantity, Rewrite, register


class ShareConfig(CouplingConfig):
    params: list[str] = Field(description="Name patterns of the shared parameters, e.g. `encoder.*`.")


@register("share")
class Share(Coupling[ShareConfig]):
    """One module, held by several members, trained on the sum of their losses.

    Mechanism: at the first exchange every member's copy is set to the members' mean (so they
    start identical); then with ``exchange.every: 1`` the shared parameters' gradients are
    summed across members after every backward pass and each member applies the same sum.
    That is exactly the gradient of ``L_1 + ... + L_n`` with respect to a single shared module,
    and with identical optimizer settings every copy takes the identical step, so the copies
    stay bitwise identical. With ``every: k > 1`` the copies are averaged at every exchange and
    after the last step instead (local SGD on the shared part): identical at the end, not exact.
    """

    adds_term = False  # acts on gradients and parameters, adds no term
    rewrites_values = True
    allows_rollback = False

    Config = ShareConfig
    config: ShareConfig

    def __init__(self, config: ShareConfig, population):
        super().__init__(config, population)
        first = self.members[0]
        self.names = population.params_matching(first, config.params) if first in population.param_shapes else []
        self.every_step = population.exchange_every == 1

    def _quantities(self, kind: Kind) -> tuple[Quantity, ...]:
        return tuple(Quantity(m, kind, n) for m in self.members for n in self.names)

    def reads(self) -> list[Quantity]:
        return [*self._quantities("param"), *(self._quantities("grad") if self.every_step else ())]

    def rewrites(self) -> list[Rewrite]:
        if self.every_step:  # identical from the first exchange on, then kept so by summed gradients
            return [Rewrite("param", self._quantities("param"), every=0, first=True, last=True), Rewrite("grad", self._quantities("grad"))]
        return [Rewrite("param", self._quantities("param"), last=True)]

    def rewrite(self, kind, step, q, out):
        if kind == "param":
            combine = lambda values: torch.stack(values).sum(dim=0) / len(values)  # noqa: E731
        else:
            combine = lambda values: torch.stack(values).sum(dim=0)  # noqa: E731
        new = {}
        for name in self.names:
            combined = combine([q[Quantity(m, kind, name)] for m in self.members])
            new.update({Quantity(m, kind, name): combined for m in self.members})
        return new

    def metrics(self, step: int, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """``max_difference``: the largest difference between copies (0 while they are identical)."""
        worst = 0.0
        for name in self.names:
            values = [q[Quantity(m, "param", name)] for m in self.members if Quantity(m, "param", name) in q]
            if len(values) > 1:
                stacked = torch.stack(values)
                worst = max(worst, float((stacked.max(dim=0).values - stacked.min(dim=0).values).max()))
        return {"max_difference": worst}

    @classmethod
    def check_config(cls, config: ShareConfig, run) -> list[tuple[str, str]]:
        members = config.members or run.member_names
        problems = []
        if len(members) < 2:
            problems.append(("members", "sharing needs at least two members"))
        optimizers = {m: run.member(m).optimizer.model_dump() for m in members if m in run.member_names}
        if len({repr(o) for o in optimizers.values()}) > 1:
            problems.append(
                ("members", f"members sharing parameters need identical `optimizer` settings so the shared copies take identical steps; got {optimizers}")
            )
        return problems

    def check_population(self) -> list[tuple[str, str]]:
        problems = check_same_parameters(self.population, self.members, self.names, self.config.params)
        for name in self.names:
            frozen = {m: not self.population.trainable.get(m, {}).get(name, True) for m in self.members}
            if len(set(frozen.values())) > 1:
                problems.append(("params", f"shared parameter {name!r} is frozen in some members but not others: {frozen}"))
        return problems
