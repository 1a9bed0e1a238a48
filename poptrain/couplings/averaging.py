"""Parameter averaging (seed 002): a target model gets the mean of others, or members are averaged;
members pulled part of the way to their mean (PAPA); members averaged in random pairs (gossip);
values swapped among members position by position (WASH); an outer optimizer
stepping global weights on the members' mean update (DiLoCo)."""

from __future__ import annotations

import os
import random
import statistics
from abc import abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from pydantic import Field, field_validator, model_validator

from poptrain.config.schema import CouplingConfig
from poptrain.couplings.base import Coupling, Quantity, Rewrite, register


class AverageConfig(CouplingConfig):
    params: list[str] = Field(default_factory=lambda: ["*"], description="Parameter name patterns averaged (fnmatch); default: all.")
    into: str | None = Field(
        None,
        description="Target member (with `trainable: false`) that receives the average of `members`: seed 002's "
        '"model 3 gets the mean of models 1 and 2". Default: average back into the members themselves '
        "(local SGD / federated averaging).",
    )
    weights: list[float] | None = Field(None, description="One weight per member of `members`, summing to 1; default: the plain mean.")
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
            raise ValueError(
                f"`rate` pulls members towards their mean, and `into` leaves them as they are: give one or the other (into {self.into!r}, rate {self.rate})"
            )
        return self


@register("average")
class Average(Coupling[AverageConfig]):
    """Replaces parameters by the (weighted) mean over ``members``, at parameter exchanges.

    * ``into: target``: the target's parameters become the mean of the members' after every
      ``every``-th exchange and after the last step, so the saved target is exactly
      ``(p_1 + ... + p_n) / n`` of the members' final weights.
    * no ``into``: every member's parameters are replaced by the mean (local SGD / FedAvg). Each
      member keeps its own optimizer state (moments are not averaged), as local SGD does.
    * no ``into``, ``rate: a < 1``: PAPA's pull, ``p_i <- (1 - a) * p_i + a * mean(p)``, each member
      a fraction ``a`` of the way to the mean (which the pull leaves where it is). Exact with
      ``exchange.every: 1``: the mean of the values the members send at that very exchange.

    Where the coordinator maps the written parameters (members on its node), the new values are
    computed straight into them, in one chunked pass per parameter that also takes the members'
    distances before the round. Adds no term to any objective; logs each member's distance to the
    mean (``divergence/<m>``).
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
        self.last_round: RoundDone | None = None  # the latest round that moved the members

    @classmethod
    def default_members(cls, config: AverageConfig, population) -> list[str]:
        return [m for m in population.members if m != config.into]

    def reads(self) -> list[Quantity]:
        return [Quantity(m, "param", n) for m in self.members for n in self.names]

    def rewrites(self) -> list[Rewrite]:
        # Computed straight into the written parameters (the target's, or the members' own) where the coordinator maps them.
        return [Rewrite("param", tuple(self._written()), every=self.config.every, last=True, in_place=True)]

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

    def rewrite(self, kind, step, q, out):
        if self.config.into is not None:
            targets = {w.key: t for w, t in out.items() if w.member == self.config.into}
            means = {n: average_pass(self._values(q, n), self.config.weights, targets.get(n), distances=False)[0] for n in self.names}
            return {w: means[w.key] for w in self._written()}
        # The members themselves move: their distances before the round come from the round's own
        # pass (``out`` may be their memory, which the metrics would read after), those after it are logged.
        new, before = self._into_members(q, out, distances=logged(self.population, step))
        self.last_round = RoundDone(step, new, before)
        return new

    def _into_members(self, q, out, distances: bool) -> tuple[dict[Quantity, torch.Tensor], dict[str, float] | None]:
        """The mean, or PAPA's pull, written back into the members: one chunked pass per parameter
        (:func:`average_pass`) that computes the chunk's mean, the members' distances to it (with
        ``distances``) and then each written member's new chunk, into ``out`` where given (the
        members' mapped memory, which may be ``q``'s own: each chunk is read whole before it is
        written) and into new tensors elsewhere (one mean shared by those with ``rate: 1``).
        PAPA's pull is computed as written, ``(1 - rate) * p + rate * mean`` (bitwise), of the mean
        as :func:`average_pass` computes it."""
        rate, written = self.config.rate, self._written()
        new: dict[Quantity, torch.Tensor] = {}
        squares = [0.0] * len(self.members)
        for name in self.names:
            values = self._values(q, name)
            mine = [w for w in written if w.key == name]
            unmapped = [w for w in mine if w not in out]
            if rate == 1.0:
                # The mean is kept in a new tensor only for members without mapped memory.
                mean = torch.empty(values[0].shape, dtype=values[0].dtype) if unmapped else None
                dests = [out[w].view(-1) for w in mine if w in out]
                if mean is not None:
                    new.update({w: mean for w in unmapped})

                def then(start, stop, mean_part, scratch, dests=dests):
                    for d in dests:
                        d[start:stop].copy_(mean_part)

                _, found = average_pass(values, self.config.weights, mean, keep=mean is not None, distances=distances, then=then)
            else:
                fresh = {w: torch.empty(values[0].shape, dtype=values[0].dtype) for w in unmapped}
                pairs = [(q[w].reshape(-1), (out[w] if w in out else fresh[w]).view(-1)) for w in mine]
                new.update(fresh)

                def then(start, stop, mean_part, scratch, pairs=pairs):
                    toward = torch.mul(mean_part, rate, out=scratch[0][: stop - start])  # rate * mean, once for every member
                    for source, dest in pairs:
                        part = torch.mul(source[start:stop], 1 - rate, out=dest[start:stop])
                        part.add_(toward)

                _, found = average_pass(values, self.config.weights, keep=False, distances=distances, then=then)
            new.update({w: out[w] for w in mine if w in out})
            if found is not None:  # with distances
                squares = [a + b for a, b in zip(squares, found, strict=True)]
        return new, (_as_divergences(self.members, squares) if distances else None)

    def metrics(self, step: int, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """:func:`round_distances`: ``divergence/<m>``, each member's Euclidean distance to the mean
        before averaging (taken by the round's own pass where it moved the members, else in one more
        pass, the mean recomputed chunk by chunk bitwise as :meth:`rewrite` computes it), and the
        spread of the distances before and after the round (members averaged back into themselves)."""
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
    if TYPE_CHECKING:  # each round's own config defines it, with its own default and description
        every: int


RoundConfigT = TypeVar("RoundConfigT", bound=MembersRoundConfig)


class MembersRound(Coupling[RoundConfigT]):
    """A round over the members' own parameters at parameter exchanges: ``names``, the parameters
    matching ``params`` (every member has them, with the same shapes), are read from every member,
    and :meth:`round_values` gives members new values of ``written`` (each member's trainable ones,
    unless ``include_frozen``), written in place into the members' memory where the coordinator
    maps it. Logs ``divergence/<m>``, each member's distance to the members' mean before the round
    (taken by the round before it writes, on logged steps), and :func:`round_distances`. A round comes at every ``every``-th
    parameter exchange of its config (and after the last step where ``round_after_last``); a
    subclass says what (:meth:`round_values`)."""

    Config: ClassVar[type[CouplingConfig]] = MembersRoundConfig

    adds_term = False
    rewrites_values = True
    averages_members = True
    needs_two: ClassVar[str] = "it rewrites members' values from their peers'"  # why it needs two members, for the check
    round_after_last: ClassVar[bool] = False  # a round at the exchange after the last step too

    def __init__(self, config: RoundConfigT, population):
        super().__init__(config, population)
        first = self.members[0] if self.members else None
        self.names = population.params_matching(first, config.params) if first in population.param_shapes else []
        self.written = {m: [n for n in self.names if config.include_frozen or population.trainable.get(m, {}).get(n, True)] for m in self.members}
        self.last_round: RoundDone | None = None  # the latest round that moved the members

    def reads(self) -> list[Quantity]:
        return [Quantity(m, "param", n) for m in self.members for n in self.names]

    def rewrites(self) -> list[Rewrite]:
        return [Rewrite("param", self.written_quantities(), every=self.config.every, last=self.round_after_last, in_place=True)]

    @abstractmethod
    def round_values(
        self, step: int, q: Mapping[Quantity, torch.Tensor], out: Mapping[Quantity, torch.Tensor], distances: bool
    ) -> tuple[dict[Quantity, torch.Tensor], dict[str, float] | None]:
        """The new values of the round at ``step`` (of the quantities in :meth:`written_quantities`;
        one left out keeps its value), from the members' values ``q``, which must not be written
        except through ``out``: the tensors of the written quantities in memory the coordinator
        maps (possibly ``q``'s own), which the round writes in place and returns; the others get
        new tensors. With ``distances``, also :func:`divergences` of ``q`` as they were before the
        round (taken before anything is written), else None."""

    def rewrite(self, kind, step, q, out):
        new, before = self.round_values(step, q, out, logged(self.population, step))
        self.last_round = RoundDone(step, new, before)
        return new

    def metrics(self, step: int, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """:func:`round_distances`: ``divergence/<m>``, each member's Euclidean distance to the
        members' mean before the round, and the spread of the distances before and after it."""
        return round_distances(self, step, q, None)

    def written_quantities(self) -> tuple[Quantity, ...]:
        return tuple(Quantity(m, "param", n) for m in self.members for n in self.written[m])

    @classmethod
    def check_config(cls, config: RoundConfigT, run) -> list[tuple[str, str]]:
        if len(config.members or run.member_names) < 2:
            return [("members", f"{cls.needs_two}: it needs at least two members")]
        return []

    def check_population(self) -> list[tuple[str, str]]:
        return check_same_parameters(self.population, self.members, self.names, self.config.params)


class GossipConfig(MembersRoundConfig):
    """Gossip averaging, NoLoCo's random pairs (arXiv 2506.10911) on the parameters: each round, members averaged in pairs, no all-reduce."""

    every: int = Field(1, ge=1, description="A gossip round every k exchanges.")


@register("gossip")
class Gossip(MembersRound[GossipConfig]):
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

    def round_values(self, step, q, out, distances):
        before = divergences(q, self.members, self.names, None) if distances else None  # the pairs write over q's mapped values
        new = {}
        for a, b in gossip_pairs(self.members, self.population.seed, step):
            for name in self.names:
                pair = [Quantity(m, "param", name) for m in (a, b) if name in self.written[m]]
                if not pair:
                    continue
                # The pair's mean goes straight into the mapped members' memory; members without
                # mapped memory share one new tensor.
                unmapped = [w for w in pair if w not in out]
                shared = torch.empty(q[pair[0]].shape, dtype=q[pair[0]].dtype) if unmapped else None
                new.update({w: out[w] if w in out else shared for w in pair})
                dests = [out[w].view(-1) for w in pair if w in out] + ([shared.view(-1)] if shared is not None else [])
                sources = [q[Quantity(m, "param", name)].reshape(-1) for m in (a, b)]
                in_chunks(sources[0].numel(), partial(partial, _pair_mean_chunk, sources, dests))  # each thread's worker: the pair's chunk function
        return new, before


def _start_chunk(source: torch.Tensor, target: torch.Tensor, dests: list[torch.Tensor], start: int, stop: int, mean_part, scratch) -> None:
    """DiLoCo's first round, one chunk: the global weights are the first member's, and every member's too."""
    first = target[start:stop].copy_(source[start:stop])
    for dest in dests:
        dest[start:stop].copy_(first)


def _pair_mean_chunk(sources: list[torch.Tensor], dests: list[torch.Tensor], start: int, stop: int) -> None:
    """``(a + b) / 2`` of one chunk, as :func:`_mean_of` computes it, into the first of ``dests`` (which
    may be ``a``'s or ``b``'s own memory: elementwise), copied into the others."""
    first = dests[0][start:stop]
    torch.add(sources[0][start:stop], sources[1][start:stop], out=first)
    first.div_(2)
    for dest in dests[1:]:
        dest[start:stop].copy_(first)


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
class Wash(MembersRound[WashConfig]):
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

    def round_values(self, step, q, out, distances):
        before = divergences(q, self.members, self.names, None) if distances else None  # the shuffle writes over q's mapped values
        generator = round_generator("wash", self.population.seed, step)
        new = {}
        for name in self.names:
            # Only the chosen positions move: gathered from every member first (out may be q's own
            # memory), then put back permuted, in place where mapped and into a copy elsewhere.
            chosen, shuffled = wash_moves([q[Quantity(m, "param", name)].reshape(-1) for m in self.members], self.config.fraction, generator)
            for i, member in enumerate(self.members):
                if name not in self.written[member]:
                    continue
                w = Quantity(member, "param", name)
                dest = out[w] if w in out else q[w].clone(memory_format=torch.contiguous_format)
                dest.view(-1)[chosen] = shuffled[i]
                new[w] = dest
        return new, before


class DilocoConfig(MembersRoundConfig):
    """DiLoCo (arXiv 2311.08105): inner steps on each member's own optimizer, then an outer Nesterov step on the mean of their deltas."""

    every: int = Field(ge=1, description="H: an outer step every k exchanges (with `exchange.every: 1`, every H inner steps), and one after the last step.")
    outer_lr: float = Field(0.7, gt=0, description="The outer optimizer's learning rate (the paper's 0.7).")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="The outer optimizer's momentum (the paper's 0.9); 0: plain outer SGD.")
    nesterov: bool = Field(True, description="Nesterov momentum, as the paper's outer optimizer; `false`: heavy-ball momentum.")


@register("diloco")
class Diloco(MembersRound[DilocoConfig]):
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
        self.handed_out: set[str] = set()  # parameters whose global weights a reply took by reference: not written again

    def round_values(self, step, q, out, distances):
        new, squares = {}, [0.0] * len(self.members)
        for name in self.names:
            values = [q[Quantity(m, "param", name)] for m in self.members]
            written = [Quantity(m, "param", name) for m in self.members if name in self.written[m]]
            g = self.global_params.get(name)  # None before the first round
            first = g is None
            # The new global weights: in place, unless the old ones were handed to a member without
            # mapped memory (the reply may still hold them); then a new tensor, kept from then on.
            if first or name in self.handed_out:
                self.global_params[name] = torch.empty(values[0].shape, dtype=values[0].dtype)
            target = self.global_params[name]
            buf = self.momentum.get(name)
            started = buf is not None
            if not first and self.config.outer_momentum and not started:
                buf = torch.empty(values[0].shape, dtype=values[0].dtype)  # takes the first outer gradient
            # Members restart from the new global weights: written in the same pass into mapped memory (a
            # member whose memory already holds them, the first one at the first round, is left alone).
            dests = [out[w].view(-1) for w in written if w in out and not (first and out[w].data_ptr() == values[0].data_ptr())]
            flats = [v.reshape(-1) for v in values]
            if g is None:  # first: one model that every member starts from
                then = partial(_start_chunk, flats[0], target.view(-1), dests)
            else:
                then = partial(self._outer_chunk, flats, g.view(-1), None if buf is None else buf.view(-1), target.view(-1), dests, started)
            _, found = average_pass(values, None, keep=False, distances=distances, then=then, then_mean=False)
            if buf is not None:
                self.momentum[name] = buf
            new.update({w: out[w] if w in out else target for w in written})
            if any(w not in out for w in written):
                self.handed_out.add(name)
            else:
                self.handed_out.discard(name)
            if found is not None:  # with distances
                squares = [a + b for a, b in zip(squares, found, strict=True)]
        return new, (_as_divergences(self.members, squares) if distances else None)

    def _outer_chunk(self, flats, g, buf, target, dests, started, start, stop, mean_part, scratch) -> None:
        """One chunk of the outer step, ``torch.optim.SGD``'s (momentum, no dampening, optionally
        Nesterov) operation for operation: the outer gradient ``sum_i (g - p_i) / n`` summed in the
        members' order (a Python ``sum``'s), the momentum buffer (``started``: it has had its first
        step), then ``g - outer_lr * update`` into ``target`` (``g`` itself, or a new tensor) and
        every member's ``dests``. Every read of the chunk comes before its writes."""
        momentum, width = self.config.outer_momentum, stop - start
        grad, spare = scratch[0][:width], scratch[1][:width]
        part = g[start:stop]
        torch.sub(part, flats[0][start:stop], out=grad)
        for flat in flats[1:]:
            grad.add_(torch.sub(part, flat[start:stop], out=spare))
        grad.div_(len(flats))
        update = grad
        if momentum:
            moment = buf[start:stop]
            if started:
                moment.mul_(momentum).add_(grad)
            else:
                moment.copy_(grad)
            update = torch.add(grad, moment, alpha=momentum, out=spare) if self.config.nesterov else moment
        new = torch.add(part, update, alpha=-self.config.outer_lr, out=target[start:stop])
        for dest in dests:
            dest[start:stop].copy_(new)

    def state_dict(self) -> dict:
        return {"global": dict(self.global_params), "momentum": dict(self.momentum)}

    def load_state_dict(self, state: Mapping) -> None:
        unknown = [n for part in ("global", "momentum") for n in state[part] if n not in self.names]
        if unknown:
            raise ValueError(f"coupling {self.name!r}: the saved state has parameters {unknown} this run's coupling does not keep (its params: {self.names})")
        self.global_params, self.momentum = dict(state["global"]), dict(state["momentum"])
        self.handed_out = set()


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
    flat = columns.reshape(columns.shape[0], -1)
    chosen, moved = wash_moves(list(flat), fraction, generator)
    shuffled = flat.clone()
    shuffled[:, chosen] = moved
    return shuffled.view(columns.shape)


def wash_moves(flats: list[torch.Tensor], fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' flat values of one parameter (``flats``, one each) after a WASH round, at the
    positions it moves only: the chosen positions ``(k,)`` and ``(members, k)``, row ``i`` the
    values member ``i`` takes there (:func:`wash_draw`'s permutation of what they held). Read from
    ``flats`` before anything is written: a round may write them back in place."""
    chosen, order = wash_draw(flats[0].numel(), len(flats), fraction, generator)
    return chosen, torch.stack([f[chosen] for f in flats]).gather(0, order)


def wash_draw(numel: int, members: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`wash_shuffle`'s draws for a parameter of ``numel`` positions: the chosen positions
    (``(k,)``, ascending: those whose uniform draw is below ``fraction``) and each one's
    permutation (``(members, k)``: row ``i`` is the member whose value member ``i`` takes). The
    uniform draw over every position, single-threaded from the seeded generator, is most of a
    round's time (0.10 of 0.16 s for 25M positions); a run and its resume draw the same."""
    chosen = (torch.rand(numel, generator=generator) < fraction).nonzero().squeeze(1)
    order = torch.rand(members, chosen.numel(), generator=generator).argsort(dim=0, stable=True)
    return chosen, order


def gossip_pairs(members: list[str], seed: int, step: int) -> list[tuple[str, str]]:
    """The pairs of gossip's round at ``step``: ``members`` shuffled by
    ``random.Random(f"poptrain-gossip-{seed}-{step}")`` and taken two by two (the last one left
    out when their number is odd). Depends on nothing else, so any process decides the same."""
    order = list(members)
    random.Random(f"poptrain-gossip-{seed}-{step}").shuffle(order)
    return list(zip(order[0::2], order[1::2], strict=False))  # an odd number: the last one sits out


@dataclass(frozen=True)
class RoundDone:
    """A round that moved the members, kept until its metrics are reported: its ``step``, the ``new``
    values (the members' mapped memory where written in place) and ``before``, the members'
    :func:`divergences` taken before anything was written (None on a step not logged)."""

    step: int
    new: Mapping[Quantity, torch.Tensor]
    before: dict[str, float] | None


def logged(population, step: int) -> bool:
    """Whether the coordinator logs the couplings' metrics of ``step`` (every ``tracking.log_every``-th)."""
    return step % population.log_every == 0


def round_distances(coupling, step: int, q: Mapping[Quantity, torch.Tensor], weights: list[float] | None) -> dict[str, float]:
    """The averaging family's metrics at ``step``: ``divergence/<m>``, each member's Euclidean
    distance to the members' (weighted) mean before the round, their ``distance/before/min``,
    ``median`` and ``max``, and, when the coupling's round at ``step`` moved the members
    (``coupling.last_round``, a :class:`RoundDone`), the same three of their distances to their mean
    after it (``distance/after/...``). The distances before a round come from the round itself
    when it took them (``q`` may hold its results by then: it wrote into the members' memory). The
    round's values are let go once reported."""
    done = coupling.last_round if coupling.last_round is not None and coupling.last_round.step == step else None
    before = done.before if done is not None and done.before is not None else divergences(q, coupling.members, coupling.names, weights)
    out = {**before, **_spread("distance/before", list(before.values()))}
    if done is not None:
        # The parameters the distances read: the round's new values where it wrote them, else q's
        # (what a ChainMap of the two reads; typeshed wants a ChainMap's maps mutable, and q is not).
        read = [Quantity(m, "param", n) for m in coupling.members for n in coupling.names]
        after = divergences({w: done.new[w] if w in done.new else q[w] for w in read}, coupling.members, coupling.names, weights)
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
        assert distances is not None  # computed: `distances` is on by default
        squares = [a + b for a, b in zip(squares, distances, strict=True)]
    return _as_divergences(members, squares)


def _as_divergences(members: list[str], squares: list[float]) -> dict[str, float]:
    """``divergence/<m>`` from each member's squared distance summed over the parameters in order."""
    return {f"divergence/{m}": square**0.5 for m, square in zip(members, squares, strict=True)}


PASS_THREADS = 8  # the most threads one averaging pass uses (the node's cores, when fewer)
CHUNK = 1 << 20  # elements: a pass works on one chunk of every value at a time (1M: 15% faster than 128K on this 2-core host, benchmarks/README.md)
_pool: ThreadPoolExecutor | None = None


def in_chunks(numel: int, worker: Callable[[], Callable[[int, int], None]], chunk: int = CHUNK) -> None:
    """Run a pass over ``range(numel)`` a chunk at a time: each thread makes its own
    ``worker()`` (its scratch buffers) and calls it with ``(start, stop)`` for the next chunk not
    yet taken, until none is left. Large tensors are split among threads that take the next chunk
    when done (torch releases the GIL inside operations), so one thread's preemption does not
    stall the others: with torch's own fixed split of each operation, a 100 MB average ran twice as
    slow in a Ray actor as in a quiet process. Chunks are disjoint: a worker may write its chunk
    of a tensor that other chunks read."""
    count = -(-numel // chunk)
    chunks = iter(range(count))  # shared by the threads; next() on it is atomic under the GIL

    def work() -> None:
        call = worker()
        for index in chunks:
            call(index * chunk, min(numel, (index + 1) * chunk))

    threads = min(count, PASS_THREADS, len(os.sched_getaffinity(0)))
    if threads > 1:
        global _pool
        if _pool is None:
            _pool = ThreadPoolExecutor(PASS_THREADS, thread_name_prefix="poptrain-average")
        for future in [_pool.submit(work) for _ in range(threads)]:
            future.result()
    else:
        work()


def average_pass(
    values: list[torch.Tensor],
    weights: list[float] | None,
    out: torch.Tensor | None = None,
    keep: bool = True,
    distances: bool = True,
    chunk: int = CHUNK,
    then: Callable[[int, int, torch.Tensor | None, torch.Tensor], None] | None = None,
    then_mean: bool = True,
) -> tuple[torch.Tensor | None, list[float] | None]:
    """``(v_1 + ... + v_n) / n`` (seed 002's ``(p1 + p2) / 2``), or ``w_1 v_1 + ... + w_n v_n``,
    into ``out`` (same shape and dtype) or a new tensor (none without ``keep``), and, with
    ``distances``, each ``v_i``'s squared Euclidean distance to it.

    One pass, a cache-sized chunk at a time (:func:`in_chunks`): each value is read from memory
    once and the mean written once; the distances come from the chunk while it is in cache. Element
    by element the mean takes the same operations in the same order as the plain expression, so it
    is bitwise the same. ``then(start, stop, mean, scratch)``, when given, is called for each chunk
    after its mean and distances, with the chunk's mean and two scratch rows of the chunk's size
    (``(2, chunk)``, the thread's own), while the chunk is still in cache: a round that rewrites
    the values from their mean writes them there, in place (they have been read). Without
    ``then_mean`` (a ``then`` that needs no mean), neither ``keep`` nor ``distances``, no mean is
    computed and ``then`` gets None for it."""
    flats = [v.reshape(-1) for v in values]
    numel, dtype = flats[0].numel(), flats[0].dtype
    target = None  # the kept mean, flat
    if keep:
        if out is None:
            out = torch.empty(values[0].shape, dtype=dtype)
        target = out.view(-1)
    count = -(-numel // chunk)
    # Sums of squares in at least float32: in float16 a chunk's overflows (131072 gaps of 1 make inf).
    accumulate = torch.promote_types(dtype, torch.float32)
    dots = torch.empty(len(values), count, dtype=accumulate) if distances else None
    mean = keep or distances or (then is not None and then_mean)
    width = min(chunk, numel)

    def worker() -> Callable[[int, int], None]:
        difference = torch.empty(width, dtype=dtype) if distances else None
        widened = torch.empty(width, dtype=accumulate) if distances and accumulate != dtype else None
        scratch = None if keep or not mean else torch.empty(width, dtype=dtype)  # the mean's chunk, when not kept
        rows = torch.empty(2, width, dtype=dtype) if then is not None else None

        def call(start: int, stop: int) -> None:
            part = None  # the chunk's mean: kept, or in scratch (none without a mean)
            if target is not None:
                part = target[start:stop]
            elif scratch is not None:
                part = scratch[: stop - start]
            if part is not None:
                parts = [f[start:stop] for f in flats]
                _mean_of(parts, weights, part)
            if difference is not None and dots is not None and part is not None:  # distances (which take a mean)
                gap = difference[: stop - start]
                for i, p in enumerate(parts):
                    torch.sub(p, part, out=gap)
                    wide = gap if widened is None else widened[: gap.numel()].copy_(gap)
                    torch.dot(wide, wide, out=dots[i, start // chunk])
            if then is not None and rows is not None:
                then(start, stop, part, rows)

        return call

    in_chunks(numel, worker, chunk)
    squares = dots.to(torch.float64).sum(dim=1).tolist() if dots is not None else None
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
        for weight, p in zip(weights[1:], parts[1:], strict=True):
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
                    (
                        "params",
                        f"parameter {name!r} has shape {list(population.param_shapes[first][name])} "
                        f"in member {first!r} but {list(shapes[name])} in member {member!r}",
                    )
                )
    return problems
