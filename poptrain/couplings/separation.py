"""Separation (seed 000): keep the same parameter of different members apart."""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from poptrain.config.schema import CouplingConfig
from poptrain.couplings.base import Columns, Coupling, Quantity, column_of, register


class SeparationConfig(CouplingConfig):
    param: str = Field(description="Name of the parameter kept apart, e.g. `activation.weight` (the PReLU slope).")
    margin: float = Field(2.0, ge=0, description="Hinge margin: the penalty is `relu(margin - distance)` per pair.")
    norm: Literal["l1", "l2"] = Field("l1", description="Distance: `l1` = `|a - b|.sum()` (the seed's), `l2` = Euclidean.")
    pairs: list[tuple[str, str]] | None = Field(None, description="Pairs of members; default: all pairs of `members`.")
    variant: Literal["hinge", "repulsion"] = Field(
        "hinge",
        description="`repulsion`: the seed's threshold-free variant `(|a|+|b|).sum() + (1/|a|+1/|b|).sum() - |a-b|.sum()` "
        "(needs an L2 penalty on the parameter to stay stable).",
    )


# All pairs are computed at once from this many pairs (below, a few pairs cost fewer tensor ops one
# by one) up to this many pairs x parameter elements (a few MB of temporaries).
VECTORIZED_PAIRS = 4
VECTORIZED_ELEMENTS = 1 << 20
# A stack's members' near pairs (Separation._near_pairs) stand for all of them up to this share of all pairs.
NEAR_PAIRS_SHARE = 4
# Above this many pairs the parent run gets the distances' summary, not one metric per pair (a
# thousand members have half a million pairs); above this many members, no per-member values.
PAIRS_LOGGED_ONE_BY_ONE = 28
MEMBERS_LOGGED_ONE_BY_ONE = 16


@register("separation")
class Separation(Coupling[SeparationConfig]):
    """``weight * sum over pairs of relu(margin - distance(p_a, p_b))`` for one named parameter.

    Exactly seed 000's ``relu(2 - torch.abs(alpha1 - alpha2).sum())`` for two members, margin 2, L1.
    Each member adds the pairs it is in (:meth:`value_for`): the same gradient for its own
    parameter as the joint term's, at O(N) instead of O(N²) per member, so a thousand members
    stay coupled over all their pairs.
    """

    Config = SeparationConfig
    config: SeparationConfig
    term_is_joint = True  # value_for is the joint term restricted to the pairs a member is in: the same gradient for its own slope

    @classmethod
    def plotted_margin(cls, setting: Mapping[str, str]) -> float | None:
        """The hinge's margin (the repulsion variant has none)."""
        return float(setting["margin"]) if setting.get("variant", "hinge") == "hinge" and "margin" in setting else None

    def _pairs(self) -> list[tuple[str, str]]:
        return [(a, b) for a, b in self.config.pairs] if self.config.pairs else list(itertools.combinations(self.members, 2))

    def reads(self) -> list[Quantity]:
        return [Quantity(m, "param", self.config.param) for m in self.members]

    @functools.cached_property
    def _position(self) -> dict[str, int]:
        """Each member's row in the stacked members (its index in :attr:`members`)."""
        return {m: i for i, m in enumerate(self.members)}

    @functools.cached_property
    def _pair_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices into the stacked members of each pair's first and second member."""
        position = self._position
        pairs = self._pairs()
        return torch.tensor([position[a] for a, _ in pairs]), torch.tensor([position[b] for _, b in pairs])

    def _distance(self, diff: torch.Tensor) -> torch.Tensor:
        """Along the last dimension of ``diff``: one pair (numel,) or several (pairs, numel)."""
        return diff.abs().sum(-1) if self.config.norm == "l1" else diff.pow(2).sum(-1).sqrt()

    @functools.cached_property
    def _pair_index_by_member(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """:attr:`_pair_index` of the pairs each member is in (one pass over the pairs)."""
        position = self._position
        mine: dict[str, tuple[list[int], list[int]]] = {m: ([], []) for m in self.members}
        for a, b in self._pairs():
            for m in (a, b):
                mine[m][0].append(position[a])
                mine[m][1].append(position[b])
        return {m: (torch.tensor(f, dtype=torch.long), torch.tensor(s, dtype=torch.long)) for m, (f, s) in mine.items()}

    @functools.cached_property
    def _quantities(self) -> list[Quantity]:
        return [Quantity(m, "param", self.config.param) for m in self.members]

    def _pair_values(self, q: Mapping[Quantity, torch.Tensor], member: str | None = None):
        """Each pair's (first, second) parameter values, flattened (only the pairs ``member`` is in,
        when given): as two (pairs, numel) tensors when they are small (a population of N then
        costs a few tensor ops, not N² of them), else pair by pair, so memory stays at one
        parameter's size whatever the number of pairs."""
        first, second = self._pair_index if member is None else self._pair_index_by_member[member]
        if _all_at_once(len(first), q[self._quantities[0]].numel()):
            stacked = column_of(q, "param", self.config.param, tuple(self.members)).reshape(len(self.members), -1)
            first, second = self._on_device(member, stacked.device)
            return [(stacked[first], stacked[second])]
        values = [q[k].reshape(-1) for k in self._quantities]
        return [(values[i], values[j]) for i, j in self._pair_rows(member)]

    def _pair_rows(self, member: str | None) -> list[tuple[int, int]]:
        """:attr:`_pair_index` (``member``'s pairs, when given) as Python pairs, made once (not read
        out of its tensors at every step)."""
        cache = self.__dict__.setdefault("_rows", {})
        if member not in cache:
            first, second = self._pair_index if member is None else self._pair_index_by_member[member]
            cache[member] = list(zip(first.tolist(), second.tolist(), strict=True))
        return cache[member]

    def _on_device(self, member: str | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """:attr:`_pair_index` (``member``'s pairs, when given) on ``device``, copied there once: on a
        GPU a copy at every call is a host-to-device transfer and a sync per step (half a million
        pairs for a thousand members)."""
        cache = self.__dict__.setdefault("_index_on_device", {})
        key = (member, str(device))
        if key not in cache:
            index = self._pair_index if member is None else self._pair_index_by_member[member]
            cache[key] = tuple(i.to(device) for i in index)
        return cache[key]

    def _distances(self, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor:
        """The distance of every pair, shape (pairs,)."""
        first = q[self._quantities[0]]
        if not self.config.pairs and first.numel() == 1 and first.dtype in (torch.float32, torch.float64):
            # All pairs of scalars, in pair order (combinations: the upper triangle row by row, as
            # pdist gives it): |a - b| of each, bitwise, eight times faster than half a million
            # gathered pairs (a thousand members' slopes, at every logged round).
            stacked = column_of(q, "param", self.config.param, tuple(self.members)).reshape(len(self.members), 1)
            return torch.pdist(stacked, p=1 if self.config.norm == "l1" else 2)
        return torch.cat([self._distance(a - b).reshape(-1) for a, b in self._pair_values(q)])

    def _logged_distances(self, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        """:meth:`_distances` of the values in ``q``, computed once for :meth:`value` and :meth:`metrics`
        of one round (the coordinator logs both, from the same values): outside autograd, and only
        where every pair is computed at once (the penalty summed from them is then the one
        :meth:`_penalty` sums). None otherwise. Kept with the tensors they came from, which are
        compared by identity and version: a changed or new value computes them again."""
        if torch.is_grad_enabled():
            return None
        values = [q[k] for k in self._quantities]
        if not _all_at_once(len(self._pair_index[0]), values[0].numel()):
            return None
        versions = [t._version for t in values]
        kept = self.__dict__.get("_kept_distances")
        if kept is None or kept[2] != versions or any(a is not b for a, b in zip(kept[1], values, strict=True)):
            kept = self.__dict__["_kept_distances"] = (self._distances(q), values, versions)
        return kept[0]

    def value(self, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor:
        distances = self._logged_distances(q) if self.config.variant == "hinge" else None
        if distances is not None:  # relu(margin - distance) of each pair, as _penalties computes it, summed as _penalty sums it
            return torch.relu(self.config.margin - distances).sum()
        return self._penalty(self._pair_values(q))

    def value_for(self, member: str, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        """The penalty of the pairs ``member`` is in: the other pairs do not depend on its parameter."""
        if member not in self.members:
            return None
        return self._penalty(self._pair_values(q, member)) if len(self.members) > 2 else self.value(q)

    def values_against(self, members: list[str], own: Columns, exchanged: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        """Each member's pairs, its own parameter live against its partners' exchanged ones: (pairs
        of all ``members``) penalties in a few tensor ops on the columns, summed per member (a
        thousand members, half a million (member, partner) rows, as cheap as :meth:`value` on all
        pairs; the partners' column is stacked once per exchange)."""
        mine = [m for m in members if m in self._pair_index_by_member]
        if len(self.members) <= 2 or len(mine) != len(members):
            return super().values_against(members, own, exchanged)
        live = own.column("param", self.config.param, tuple(members)).reshape(len(members), -1)
        rows, partners = self._rows_and_partners(tuple(members), live.device)
        if len(rows) * live.shape[1] > VECTORIZED_ELEMENTS:  # too large to hold at once: member by member
            return super().values_against(members, own, exchanged)
        others = column_of(exchanged, "param", self.config.param, tuple(self.members)).reshape(len(self.members), -1).to(live.dtype)
        near = self._near_pairs(tuple(members), live, others, len(rows)) if self._near_pairs_suffice(live) else None
        if near is not None:
            rows, partners = near
        per_row = self._penalties(live[rows], others[partners])
        values = torch.zeros(len(members), dtype=per_row.dtype, device=per_row.device).index_add(0, rows, per_row)
        if near is not None:  # a NaN has no place among the sorted slopes: it reaches the step's guard all the same (0 otherwise, and no gradient)
            values = values + 0 * (_nan_only(live).flatten() + _nan_only(others).sum())
        return values

    def _near_pairs_suffice(self, live: torch.Tensor) -> bool:
        """Whether :meth:`_near_pairs` may stand for all pairs: the hinge on a scalar parameter (seed
        000's PReLU slope), all pairs, on the CPU (sizing the near pairs reads the device, which
        on a GPU waits for the step)."""
        return self.config.variant == "hinge" and self.config.pairs is None and live.shape[1] == 1 and live.device.type == "cpu"

    def _near_pairs(self, members: tuple[str, ...], live: torch.Tensor, others: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`_rows_and_partners` of the pairs closer than the margin only, or None where they are
        more than a quarter of ``every`` pair (members that start alike, all near: sorting their
        pairs would cost more than computing them all). The hinge of a pair at or beyond its margin
        is exactly 0, and so is its gradient: leaving those pairs out changes no value and no
        gradient (in each row the near partners keep the members' order, the order the full sum
        adds them in), and a thousand members' half a million pairs become the few that are near,
        found in the sorted exchanged values."""
        sorted_values, order = others.detach().flatten().sort()
        mine = live.detach().flatten()
        window = self.config.margin * (1 + 1e-6)  # wider by rounding: a pair just outside computes to 0 anyway
        first = torch.searchsorted(sorted_values, mine - window, side="left")
        counts = (torch.searchsorted(sorted_values, mine + window, side="right") - first).clamp(min=0)
        if int(counts.sum()) > every // NEAR_PAIRS_SHARE:
            return None
        rows = torch.repeat_interleave(torch.arange(len(mine)), counts)
        starts = torch.repeat_interleave(first - (counts.cumsum(0) - counts), counts)
        partners = order[starts + torch.arange(len(rows))]
        apart = partners != self._positions(members)[rows]  # not a member against its own exchanged slope
        rows, partners = rows[apart], partners[apart]
        by_row = torch.argsort(rows * len(self.members) + partners)
        return rows[by_row], partners[by_row]

    def _rows_and_partners(self, members: tuple[str, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For every pair each of ``members`` is in: that member's index in ``members`` and its
        partner's position in :attr:`members` (made once per group and device)."""
        cache = self.__dict__.setdefault("_rows_and_partners_cache", {})
        key = (members, str(device))
        if key not in cache:
            position = self._position
            rows, partners = [], []
            for r, m in enumerate(members):
                first, second = self._pair_index_by_member[m]
                rows.append(torch.full((len(first),), r, dtype=torch.long))
                partners.append(torch.where(first == position[m], second, first))
            cache[key] = (torch.cat(rows).to(device), torch.cat(partners).to(device))
        return cache[key]

    def _positions(self, members: tuple[str, ...]) -> torch.Tensor:
        """Each of ``members``' position in :attr:`members` (made once per group)."""
        cache = self.__dict__.setdefault("_positions_cache", {})
        if members not in cache:
            position = self._position
            cache[members] = torch.tensor([position[m] for m in members])
        return cache[members]

    def _penalties(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The penalty of each pair (a, b): seed 000's relu(margin - |a - b|.sum()), or the repulsion."""
        if self.config.variant == "hinge":
            return torch.relu(self.config.margin - self._distance(a - b))
        return (a.abs() + b.abs()).sum(-1) + (1 / a.abs() + 1 / b.abs()).sum(-1) - (a - b).abs().sum(-1)

    def _penalty(self, pair_values) -> torch.Tensor:
        # Summed over pairs (or rows of pairs).
        per_pair = [self._penalties(a, b) for a, b in pair_values]
        per_pair = [p if p.dim() == 0 else p.sum() for p in per_pair]
        return functools.reduce(operator.add, per_pair) if per_pair else torch.zeros(())

    def metrics(self, step: int, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        distances = self._logged_distances(q)
        distances = self._distances(q) if distances is None else distances
        if len(distances) > PAIRS_LOGGED_ONE_BY_ONE:
            return {
                "distance/min": float(distances.min()),
                "distance/median": _lower_median(distances),
                "distance/max": float(distances.max()),
                "pairs_within_margin": float((distances < self.config.margin).sum()),
            }
        out = {f"distance/{a}-{b}": d for (a, b), d in zip(self._pairs(), distances.tolist(), strict=True)}
        for member in self.members if len(self.members) <= MEMBERS_LOGGED_ONE_BY_ONE else ():
            value = q[Quantity(member, "param", self.config.param)]
            if value.numel() == 1:
                out[f"{member}/{self.config.param}"] = float(value)
        return out

    @classmethod
    def check_config(cls, config: SeparationConfig, run) -> list[tuple[str, str]]:
        members = config.members or run.member_names
        problems = []
        if len(members) < 2:
            problems.append(("members", "separation needs at least two members"))
        for pair in config.pairs or []:
            for name in pair:
                if name not in members:
                    problems.append(("pairs", f"member {name!r} of pair {list(pair)} is not among the coupling's members {members}"))
            if pair[0] == pair[1]:
                problems.append(("pairs", f"pair {list(pair)} pairs a member with itself"))
        return problems

    def check_population(self) -> list[tuple[str, str]]:
        problems, shapes = [], {}
        for member in self.members:
            shape = self.population.param_shapes[member].get(self.config.param)
            if shape is None:
                names = list(self.population.param_shapes[member])
                problems.append(
                    ("param", f"member {member!r} has no parameter {self.config.param!r}; its parameters are {names[:12]}{' ...' if len(names) > 12 else ''}")
                )
            else:
                shapes[member] = shape
        if len(set(shapes.values())) > 1:
            problems.append(("param", f"{self.config.param!r} has different shapes across members: {shapes}"))
        return problems


def _all_at_once(pairs: int, numel: int) -> bool:
    """Whether ``pairs`` pairs of a parameter of ``numel`` elements are computed as two (pairs,
    numel) tensors (:meth:`Separation._pair_values`), not pair by pair."""
    return VECTORIZED_PAIRS <= pairs and pairs * numel <= VECTORIZED_ELEMENTS


def _nan_only(values: torch.Tensor) -> torch.Tensor:
    """``values`` with its infinities as 0 and its NaNs kept: times 0, NaN where a NaN was, else 0."""
    return torch.nan_to_num(values, nan=float("nan"), posinf=0.0, neginf=0.0)


def _lower_median(values: torch.Tensor) -> float:
    """``torch.median`` of a 1-D tensor (the lower of the two middle values of an even count, NaN
    when any value is NaN), found by selection (``numpy.partition``) rather than a sort: half a
    million pair distances in 0.5 ms instead of 4.3."""
    flat = values.detach().cpu().reshape(-1).numpy()
    if np.isnan(flat).any():
        return float("nan")
    middle = (len(flat) - 1) // 2
    return float(np.partition(flat, middle)[middle])
