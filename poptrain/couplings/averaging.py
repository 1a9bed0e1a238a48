"""Parameter averaging (seed 002): a target model gets the mean of others, or members are averaged;
members pulled part of the way to their mean (PAPA); members averaged in random pairs (gossip);
values swapped among members position by position (WASH); an outer optimizer
stepping global weights on the members' mean update (DiLoCo)."""

from __future__ import annotations

import os
import random
import statistics
from abc import abstractmethod
from collections import ChainMap
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, Mapping, Optional

import torch
from pydantic import Field, field_validator, model_validator

from poptrain.config import CouplingConfig
from poptrain.couplings.base import Coupling, Quantity, Rewrite, register


class AverageConfig(CouplingConfig):
    params: list[str] = Field(default_factory=lambda: ["*"], description="Parameter name patterns averaged (fnmatch); default: all.")
    into: Optional[str] = Field(
        None,
        description="Target member (with `trainable: false`) that receives the average of `members`: seed 002's "
        "\"model 3 gets the mean of models 1 and 2\". Default: average back into the members themselves "
        "(local SGD / federated averaging).",
    )
    weights: Optional[list[float]] = Field(None, description="One weight per member of `members`, summing to 1; default: the plain mean.")
    every: int = Field(1, ge=1, description="Average every k exchanges (and always after the last step).")
    include_frozen: bool = Field(False, description="Also overwrite members' frozen parameters when averaging back into them.")
    rate: float = Field(
        1.0,
        description="PAPA (arXiv 2304.03094): each member moves this fraction of the way to the mean, "
        "`p_i <- (1 - rate) * p_i + rate * mean(p)`, at every `every`-th exchange and after the last step; "
        "0 < rate <= 1, and 1 (the default) replaces the members by the mean. Not with `into`.",
    )

    @field_validator("rate")
    @classmethod
    def _rate(cls, rate: float) -> float:
        if not 0 < rate <= 1:
            raise ValueError(f"`rate` is the fraction of the way to the mean each member moves: it must be in (0, 1], got {rate}")
        return rate

    @model_validator(mode="after")
    def _weights(self):
        if self.weights is not None:
            if any(w < 0 for w in self.weights) or abs(sum(self.weights) - 1.0) > 1e-6:
                raise ValueError(f"`weights` must be non-negative and sum to 1, got {self.weights}")
        if self.into is not None and self.rate != 1.0:
            raise ValueError(f"`rate` pulls members towards their mean, and `into` leaves them as they are: "
                             f"give one or the other (into {self.into!r}, rate {self.rate})")
        return self


@register("average")
class Average(Coupling):
    """Replaces parameters by the (weighted) mean over ``members``, at parameter exchanges.

    * ``into: target``: the target's parameters become the mean of the members' after every
      ``every``-th exchange and after the last step, so the saved target is exactly
      ``(p_1 + ... + p_n) / n`` of the members' final weights.
    * no ``into``: every member's parameters are replaced by the mean (local SGD / FedAvg). Each
      member keeps its own optimizer state (moments are not averaged), as local SGD does.
    * no ``into``, ``rate: a < 1``: PAPA's pull, ``p_i <- (1 - a) * p_i + a * mean(p)``, each member
      a fraction ``a`` of the way to the mean (which the pull leaves where it is). Exact with
      ``exchange.every: 1``: the mean of the values the members send at that very exchange.

    Adds no term to any objective; logs each member's distance to the mean (``divergence/<m>``).
    """

    Config = AverageConfig
    config: AverageConfig

    adds_term = False  # acts by replacing values, not through a gradient
    rewrites_values = True
    averages_members = True

    def __init__(self, config: AverageConfig, population):
        super().__init__(config, population)
        first = self.members[0] if self.members else None
        self.names = population.params_matching(first, config.params) if first in population.param_shapes else []
        self.last_round: tuple[int, Mapping[Quantity, torch.Tensor]] | None = None  # (step, new values) of the latest round

    @classmethod
    def default_members(cls, config: AverageConfig, population) -> list[str]:
        return [m for m in population.members if m != config.into]

    def reads(self) -> list[Quantity]:
        return [Quantity(m, "param", n) for m in self.members for n in self.names]

    def rewrites(self) -> list[Rewrite]:
        # Into a target: computed straight into its parameters when the coordinator maps them.
        return [Rewrite("param", tuple(self._written()), every=self.config.every, last=True, in_place=self.config.into is not None)]

    def _written(self) -> list[Quantity]:
        receivers = [self.config.into] if self.config.into else self.members
        out = []
        for member in receivers:
            trainable = self.population.trainable.get(member, {})
            for name in self.names:
                if self.config.into or self.config.include_frozen or trainable.get(name, True):
                    out.append(Quantity(member, "param", name))
        return out

    def _values(self, q: Mapping[Quantity, torch.Tensor], name: str) -> list[torch.Tensor]:
        return [q[Quantity(m, "param", name)] for m in self.members]

    def rewrite_at(self, kind, step, q, out):
        new = self.rewrite(kind, q, out)
        if self.config.into is None:  # the members themselves moved: their distances after the round are logged
            self.last_round = (step, new)
        return new

    def rewrite(self, kind, q, out):
        into, rate = self.config.into, self.config.rate
        targets = {w.key: t for w, t in out.items() if w.member == into} if into else {}
        means = {n: average_pass(self._values(q, n), self.config.weights, targets.get(n), distances=False)[0] for n in self.names}
        if rate == 1.0:
            return {w: means[w.key] for w in self._written()}
        return {w: pulled(q[w], means[w.key], rate) for w in self._written()}

    def metrics(self, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """``divergence/<m>``: each member's Euclidean distance to the mean, before averaging, in one
        more pass over the members' parameters (the mean is recomputed chunk by chunk in cache,
        bitwise as :meth:`rewrite` computes it, so the pass reads each value once)."""
        return divergences(q, self.members, self.names, self.config.weights)

    def metrics_at(self, step: int, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """:meth:`metrics`, and :func:`round_distances` (members averaged back into themselves only)."""
        return round_distances(self, step, q, self.config.weights)

    @classmethod
    def check_config(cls, config: AverageConfig, run) -> list[tuple[str, str]]:
        problems = []
        names = run.member_names
        members = config.members or [m for m in names if m != config.into]
        if config.into is not None:
            if config.into not in names:
                problems.append(("into", f"unknown member {config.into!r}; members are {names}"))
            elif run.member(config.into).trainable:
                problems.append(("into", f"target {config.into!r} is trained, so its average would be overwritten: set `trainable: false` on it"))
            if config.into in members:
                problems.append(("members", f"the target {config.into!r} cannot also be averaged from"))
        elif len(members) < 2:
            problems.append(("members", "averaging back into members needs at least two members"))
        if config.weights is not None and len(config.weights) != len(members):
            problems.append(("weights", f"{len(config.weights)} weights for {len(members)} members {members}"))
        return problems

    def check_population(self) -> list[tuple[str, str]]:
        return check_same_parameters(self.population, self.members + ([self.config.into] if self.config.into else []), self.names, self.config.params)


class MembersRoundConfig(CouplingConfig):
    """What every round over the members' own parameters (gossip, WASH, DiLoCo) is configured with."""

    params: list[str] = Field(default_factory=lambda: ["*"], description="Parameter name patterns the rounds rewrite (fnmatch); default: all.")
    include_frozen: bool = Field(False, description="Also overwrite members' frozen parameters.")


class MembersRound(Coupling):
    """A round over the members' own parameters at parameter exchanges: ``names``, the parameters
    matching ``params`` (every member has them, with the same shapes), are read from every member,
    and :meth:`round_values` gives members new values of ``written`` (each member's trainable ones,
    unless ``include_frozen``). Logs ``divergence/<m>``, each member's distance to the members'
    mean before the round, and :func:`round_distances`. A round comes at every ``every``-th
    parameter exchange of its config (and after the last step where ``round_after_last``); a
    subclass says what (:meth:`round_values`)."""

    Config = MembersRoundConfig
    config: MembersRoundConfig

    adds_term = False
    rewrites_values = True
    averages_members = True
    needs_two: ClassVar[str] = "it rewrites members' values from their peers'"  # why it needs two members, for the check
    round_after_last: ClassVar[bool] = False  # a round at the exchange after the last step too

    def __init__(self, config: MembersRoundConfig, population):
        super().__init__(config, population)
        first = self.members[0] if self.members else None
        self.names = population.params_matching(first, config.params) if first in population.param_shapes else []
        self.written = {m: [n for n in self.names if config.include_frozen or population.trainable.get(m, {}).get(n, True)] for m in self.members}
        self.last_round: tuple[int, Mapping[Quantity, torch.Tensor]] | None = None  # (step, new values) of the latest round

    def reads(self) -> list[Quantity]:
        return [Quantity(m, "param", n) for m in self.members for n in self.names]

    def rewrites(self) -> list[Rewrite]:
        return [Rewrite("param", self.written_quantities(), every=self.config.every, last=self.round_after_last)]

    @abstractmethod
    def round_values(self, step: int, q: Mapping[Quantity, torch.Tensor]) -> dict[Quantity, torch.Tensor]:
        """The new values of the round at ``step`` (of the quantities in :meth:`written_quantities`;
        one left out keeps its value), from the members' values ``q``, which must not be written."""

    def rewrite_at(self, kind, step, q, out):
        new = self.round_values(step, q)
        self.last_round = (step, new)
        return new

    def metrics(self, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """``divergence/<m>``: each member's Euclidean distance to the members' mean, before the round."""
        return divergences(q, self.members, self.names, None)

    def metrics_at(self, step: int, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """:meth:`metrics` and :func:`round_distances`."""
        return round_distances(self, step, q, None)

    def written_quantities(self) -> tuple[Quantity, ...]:
        return tuple(Quantity(m, "param", n) for m in self.members for n in self.written[m])

    def columns(self, q: Mapping[Quantity, torch.Tensor], name: str) -> torch.Tensor:
        """The members' values of parameter ``name`` side by side: ``(members, *shape)``, a new tensor."""
        return torch.stack([q[Quantity(m, "param", name)] for m in self.members])

    @classmethod
    def check_config(cls, config: MembersRoundConfig, run) -> list[tuple[str, str]]:
        if len(config.members or run.member_names) < 2:
            return [("members", f"{cls.needs_two}: it needs at least two members")]
        return []

    def check_population(self) -> list[tuple[str, str]]:
        return check_same_parameters(self.population, self.members, self.names, self.config.params)


class GossipConfig(MembersRoundConfig):
    """Gossip averaging, NoLoCo's random pairs (arXiv 2506.10911) on the parameters: each round, members averaged in pairs, no all-reduce."""

    every: int = Field(1, ge=1, description="A gossip round every k exchanges.")


@register("gossip")
class Gossip(MembersRound):
    """At every ``every``-th parameter exchange, ``members`` are paired at random and each pair's
    parameters are replaced by the pair's mean ``(p_a + p_b) / 2``; with an odd number of members
    the one left over keeps its own. The round's pairs are :func:`gossip_pairs` of the run's seed
    and the exchange's step, so a run and its resume (and a restarted member replaying a round)
    pair the same. Nothing happens after the last step: members end as their last round left them.

    Exact with ``exchange.every: 1``: each pair averages the values its members send at that very
    exchange. Each member keeps its own optimizer state. Logs ``divergence/<m>``, each member's
    distance to the population's mean before the round, as ``average`` does."""

    Config = GossipConfig
    config: GossipConfig
    needs_two = "gossip averages members in pairs"

    def round_values(self, step, q):
        new = {}
        for a, b in gossip_pairs(self.members, self.population.seed, step):
            for name in self.names:
                mean = average_pass([q[Quantity(a, "param", name)], q[Quantity(b, "param", name)]], None, distances=False)[0]
                new.update({Quantity(m, "param", name): mean for m in (a, b) if name in self.written[m]})
        return new


class WashConfig(MembersRoundConfig):
    """WASH (arXiv 2405.17517): members swap a random fraction of their weights, position by position."""

    fraction: float = Field(
        description="The share of positions shuffled each round: each position of the chosen parameters is drawn "
        "independently with this probability, and its values across the members are permuted at random; 0 < fraction <= 1. "
        "The paper shuffles a small share (its layer-aware variant shuffles early layers more: list a `wash` coupling per "
        "group of layers, each with its own `fraction`).",
    )
    every: int = Field(1, ge=1, description="A shuffle every k exchanges.")

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, fraction: float) -> float:
        if not 0 < fraction <= 1:
            raise ValueError(f"`fraction` is the probability that a position is shuffled: it must be in (0, 1], got {fraction}")
        return fraction


@register("wash")
class Wash(MembersRound):
    """At every ``every``-th parameter exchange, each position of each chosen parameter is drawn
    with probability ``fraction``, and the values the ``members`` hold there are permuted among
    them at random (:func:`wash_shuffle`, from the run's seed and the exchange's step, so a run and
    its resume shuffle the same). Every value stays in the population: the members' mean is left
    exactly where it was. Nothing happens after the last step.

    Exact with ``exchange.every: 1``: the shuffle moves the values the members send at that very
    exchange. Each member keeps its own optimizer state. Logs ``divergence/<m>``, each member's
    distance to the population's mean before the round."""

    Config = WashConfig
    config: WashConfig
    needs_two = "WASH shuffles values among members"

    def round_values(self, step, q):
        generator = round_generator("wash", self.population.seed, step)
        new = {}
        for name in self.names:
            shuffled = wash_shuffle(self.columns(q, name), self.config.fraction, generator)
            new.update({Quantity(m, "param", name): shuffled[i] for i, m in enumerate(self.members) if name in self.written[m]})
        return new


class DilocoConfig(MembersRoundConfig):
    """DiLoCo (arXiv 2311.08105): inner steps on each member's own optimizer, then an outer Nesterov step on the mean of their deltas."""

    every: int = Field(ge=1, description="H: an outer step every k exchanges (with `exchange.every: 1`, every H inner steps), and one after the last step.")
    outer_lr: float = Field(0.7, gt=0, description="The outer optimizer's learning rate (the paper's 0.7).")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="The outer optimizer's momentum (the paper's 0.9); 0: plain outer SGD.")
    nesterov: bool = Field(True, description="Nesterov momentum, as the paper's outer optimizer; `false`: heavy-ball momentum.")


@register("diloco")
class Diloco(MembersRound):
    """DiLoCo's outer loop on the coordinator. At the first parameter exchange the global weights
    ``g`` are the first member's (of ``members``), and every member starts from them, as DiLoCo's
    replicas start from one model. Then at every ``every``-th parameter exchange (and at the one
    after the last step) the mean over members of ``g - p_i``, the outer gradient, takes one step of SGD with (Nesterov) momentum on ``g``,
    written as ``torch.optim.SGD`` computes it::

        buf <- outer_grad (first outer step), else outer_momentum * buf + outer_grad
        g   <- g - outer_lr * (outer_grad + outer_momentum * buf)   (nesterov; else g - outer_lr * buf)

    and every member restarts from the new ``g``, keeping its own (inner) optimizer state. The run
    ends after that last outer step, every member at ``g``.

    ``g`` and ``buf`` are state held here (:meth:`state_dict`): a member restarted from its checkpoint
    is replayed the rounds it missed, and a resumed run restores them from beside the checkpoint it
    continues from. Exact with ``exchange.every: 1``. Logs ``divergence/<m>``, each member's distance
    to the members' mean before the round."""

    Config = DilocoConfig
    config: DilocoConfig
    needs_two = "DiLoCo averages the members' updates"
    round_after_last = True  # the members end at the global weights of a last outer step

    def __init__(self, config: DilocoConfig, population):
        super().__init__(config, population)
        self.global_params: dict[str, torch.Tensor] = {}  # empty until the first round
        self.momentum: dict[str, torch.Tensor] = {}  # the outer optimizer's buffers, from its first step on

    def round_values(self, step, q):
        new = {}
        for name in self.names:
            columns = self.columns(q, name)
            if name not in self.global_params:
                self.global_params[name] = columns[0].clone()  # one model that every member starts from
            else:
                outer_grad = (self.global_params[name] - columns).sum(dim=0).div_(len(self.members))
                self.global_params[name] = self._outer_step(name, outer_grad)
            new.update({Quantity(m, "param", name): self.global_params[name] for m in self.members if name in self.written[m]})
        return new

    def _outer_step(self, name: str, outer_grad: torch.Tensor) -> torch.Tensor:
        """``torch.optim.SGD``'s step (momentum, no dampening, optionally Nesterov), operation for
        operation. Out of place: the previous global weights may still be on their way to members."""
        momentum = self.config.outer_momentum
        update = outer_grad
        if momentum:
            buf = self.momentum.get(name)
            if buf is None:
                buf = self.momentum[name] = outer_grad.clone()
            else:
                buf.mul_(momentum).add_(outer_grad)
            update = outer_grad.add(buf, alpha=momentum) if self.config.nesterov else buf
        return self.global_params[name].add(update, alpha=-self.config.outer_lr)

    def state_dict(self) -> dict:
        return {"global": dict(self.global_params), "momentum": dict(self.momentum)}

    def load_state_dict(self, state: Mapping) -> None:
        unknown = [n for part in ("global", "momentum") for n in state[part] if n not in self.names]
        if unknown:
            raise ValueError(f"coupling {self.name!r}: the saved state has parameters {unknown} this run's coupling does not keep (its params: {self.names})")
        self.global_params, self.momentum = dict(state["global"]), dict(state["momentum"])


def round_generator(method: str, seed: int, step: int) -> torch.Generator:
    """The generator a coupling draws its round at ``step`` from: seeded with
    ``random.Random(f"poptrain-{method}-{seed}-{step}").getrandbits(63)``, so any process (a
    resumed run, a restarted coordinator) draws the same."""
    return torch.Generator().manual_seed(random.Random(f"poptrain-{method}-{seed}-{step}").getrandbits(63))


def wash_shuffle(columns: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """One WASH round of one parameter: ``columns`` ``(members, *shape)``, the members' values side
    by side. Draws ``chosen = torch.rand(numel) < fraction`` (the positions shuffled), then
    ``torch.rand(members, chosen.sum())`` whose column-wise ``argsort`` is each chosen position's
    permutation (uniform: the order of independent uniform draws); the result's member ``i`` holds,
    at chosen position ``j``, the value member ``order[i, j]`` held there. Tensor ops over the member
    dimension throughout; a new tensor, ``columns`` untouched."""
    members = columns.shape[0]
    flat = columns.reshape(members, -1)
    chosen = (torch.rand(flat.shape[1], generator=generator) < fraction).nonzero().squeeze(1)
    order = torch.rand(members, chosen.numel(), generator=generator).argsort(dim=0, stable=True)
    shuffled = flat.clone()
    shuffled[:, chosen] = flat[:, chosen].gather(0, order)
    return shuffled.view(columns.shape)


def gossip_pairs(members: list[str], seed: int, step: int) -> list[tuple[str, str]]:
    """The pairs of gossip's round at ``step``: ``members`` shuffled by
    ``random.Random(f"poptrain-gossip-{seed}-{step}")`` and taken two by two (the last one left
    out when their number is odd). Depends on nothing else, so any process decides the same."""
    order = list(members)
    random.Random(f"poptrain-gossip-{seed}-{step}").shuffle(order)
    return list(zip(order[0::2], order[1::2]))


def pulled(value: torch.Tensor, mean: torch.Tensor, rate: float) -> torch.Tensor:
    """PAPA's pull of one member's value: ``(1 - rate) * value + rate * mean``, as written."""
    return (1 - rate) * value + rate * mean


def round_distances(coupling, step: int, q: Mapping[Quantity, torch.Tensor], weights: list[float] | None) -> dict[str, float]:
    """The averaging family's metrics at ``step``: ``divergence/<m>``, each member's Euclidean
    distance to the members' (weighted) mean before the round, their ``distance/before/min``,
    ``median`` and ``max``, and, when the coupling's round at ``step`` moved the members
    (``coupling.last_round``), the same three of their distances to their mean after it
    (``distance/after/...``). The round's values are let go once reported."""
    before = divergences(q, coupling.members, coupling.names, weights)
    out = {**before, **_spread("distance/before", list(before.values()))}
    if coupling.last_round is not None and coupling.last_round[0] == step:
        after = divergences(ChainMap(coupling.last_round[1], q), coupling.members, coupling.names, weights)
        out.update(_spread("distance/after", list(after.values())))
        coupling.last_round = None
    return out


def _spread(prefix: str, values: list[float]) -> dict[str, float]:
    return {f"{prefix}/min": min(values), f"{prefix}/median": statistics.median(values), f"{prefix}/max": max(values)}


def divergences(q: Mapping[Quantity, torch.Tensor], members: list[str], names: list[str], weights: list[float] | None) -> dict[str, float]:
    """``divergence/<m>``: each member's Euclidean distance to the (weighted) mean over ``names``."""
    squares = [0.0] * len(members)
    for name in names:
        _, distances = average_pass([q[Quantity(m, "param", name)] for m in members], weights, keep=False)
        squares = [a + b for a, b in zip(squares, distances)]
    return {f"divergence/{m}": square**0.5 for m, square in zip(members, squares)}


PASS_THREADS = 8  # the most threads one averaging pass uses (the node's cores, when fewer)
_pool: ThreadPoolExecutor | None = None


def average_pass(
    values: list[torch.Tensor],
    weights: list[float] | None,
    out: torch.Tensor | None = None,
    keep: bool = True,
    distances: bool = True,
    chunk: int = 1 << 17,
) -> tuple[torch.Tensor | None, list[float] | None]:
    """``(v_1 + ... + v_n) / n`` (seed 002's ``(p1 + p2) / 2``), or ``w_1 v_1 + ... + w_n v_n``,
    into ``out`` (same shape and dtype) or a new tensor (none without ``keep``), and, with
    ``distances``, each ``v_i``'s squared Euclidean distance to it.

    One pass, a cache-sized chunk at a time: each value is read from memory once and the mean
    written once; the distances come from the chunk while it is in cache. Element by element the
    mean takes the same operations in the same order as the plain expression, so it is bitwise
    the same. Large tensors are split among threads that take the next chunk when done (torch
    releases the GIL inside operations), so one thread's preemption does not stall the others:
    with torch's own fixed split of each operation, a 100 MB average ran twice as slow in a Ray
    actor as in a quiet process."""
    flats = [v.reshape(-1) for v in values]
    numel, dtype = flats[0].numel(), flats[0].dtype
    if keep and out is None:
        out = torch.empty(values[0].shape, dtype=dtype)
    target = out.view(-1) if keep else None
    count = -(-numel // chunk)
    # Sums of squares in at least float32: in float16 a chunk's overflows (131072 gaps of 1 make inf).
    accumulate = torch.promote_types(dtype, torch.float32)
    dots = torch.empty(len(values), count, dtype=accumulate) if distances else None
    chunks = iter(range(count))  # shared by the threads; next() on it is atomic under the GIL

    def work() -> None:
        difference = torch.empty(min(chunk, numel), dtype=dtype) if distances else None
        widened = torch.empty(min(chunk, numel), dtype=accumulate) if distances and accumulate != dtype else None
        scratch = None if keep else torch.empty(min(chunk, numel), dtype=dtype)  # the mean's chunk, when not kept
        for index in chunks:
            start = index * chunk
            parts = [f[start : start + chunk] for f in flats]
            part = target[start : start + chunk] if keep else scratch[: parts[0].numel()]
            _mean_of(parts, weights, part)
            if distances:
                gap = difference[: part.numel()]
                for i, p in enumerate(parts):
                    torch.sub(p, part, out=gap)
                    wide = gap if widened is None else widened[: gap.numel()].copy_(gap)
                    torch.dot(wide, wide, out=dots[i, index])

    threads = min(count, PASS_THREADS, len(os.sched_getaffinity(0)))
    if threads > 1:
        global _pool
        if _pool is None:
            _pool = ThreadPoolExecutor(PASS_THREADS, thread_name_prefix="poptrain-average")
        for future in [_pool.submit(work) for _ in range(threads)]:
            future.result()
    else:
        work()
    squares = dots.to(torch.float64).sum(dim=1).tolist() if distances else None
    return out if keep else None, squares


def _mean_of(parts: list[torch.Tensor], weights: list[float] | None, out: torch.Tensor) -> None:
    if weights is None:
        if len(parts) == 1:
            out.copy_(parts[0])
        else:
            torch.add(parts[0], parts[1], out=out)
        for p in parts[2:]:
            out.add_(p)
        out.div_(len(parts))
    else:
        torch.mul(parts[0], weights[0], out=out)
        for weight, p in zip(weights[1:], parts[1:]):
            out.add_(p, alpha=weight)


def check_same_parameters(population, members: list[str], names: list[str], patterns: list[str]) -> list[tuple[str, str]]:
    """Every member has every parameter in ``names`` with the first member's shape (names both members on a mismatch)."""
    if not members:
        return []
    if not names:
        return [("params", f"patterns {patterns} match no parameter of member {members[0]!r}")]
    first, problems = members[0], []
    for member in members[1:]:
        shapes = population.param_shapes.get(member, {})
        for name in names:
            if name not in shapes:
                problems.append(("params", f"member {first!r} has parameter {name!r} but member {member!r} does not"))
            elif shapes[name] != population.param_shapes[first][name]:
                problems.append(
                    ("params", f"parameter {name!r} has shape {list(population.param_shapes[first][name])} in member {first!r} but {list(shapes[name])} in member {member!r}")
                )
    return problems
