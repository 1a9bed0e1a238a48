"""The coupling interface: a cross-member term answers a few questions and nothing else.

* :meth:`Coupling.reads` — which quantities of which members it needs
  (:class:`Quantity`: a member's named parameter, its loss or one of its terms).
* :meth:`Coupling.value` — a scalar computed from those quantities.
* ``trains`` — whose objective the (weighted) value enters. A member not trained by the
  coupling does not evaluate it at all, which is the same as seeing its own quantity detached.
* or, for a coupling that changes values at exchanges (averaging parameters, summing shared
  gradients), :meth:`Coupling.rewrites` — which of members' own quantities it replaces and when
  (:class:`Rewrite`) — and :meth:`Coupling.rewrite` — the new values, computed by the
  coordinator when the schedule says so.
* :meth:`Coupling.state_dict` / :meth:`Coupling.load_state_dict`, for a coupling that keeps state
  between rounds (DiLoCo's global weights and outer momentum): checkpointed by the coordinator.

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
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Generic, Literal, TypeVar, cast

import torch

from poptrain.config.registry import COUPLINGS, CouplingClass, register, resolve_coupling  # noqa: F401  (re-exported)
from poptrain.config.schema import CouplingConfig

if TYPE_CHECKING:
    from poptrain.config.schema import RunConfig

Kind = Literal["param", "loss", "pred", "grad", "local"]
# When a quantity is known within a step, which is when it can be exchanged (the exchange's phase):
# parameters before the forward pass, losses/terms and predictions (the model's outputs on the
# step's batch) after it, gradients after the backward pass.
# `local` quantities (a member's own batch `inputs` and its `outputs`) are never exchanged: a
# coupling reads them only in the member that owns them.
PHASES: tuple[str, ...] = ("param", "loss", "grad")
PHASE_OF: dict[str, str | None] = {"param": "param", "loss": "loss", "pred": "loss", "grad": "grad", "local": None}


@dataclass(frozen=True, order=True)
class Quantity:
    """One exchanged quantity: ``kind`` ``key`` of ``member`` (e.g. param ``activation.weight`` of ``m1``)."""

    member: str
    kind: Kind
    key: str

    def __str__(self) -> str:
        return f"{self.member}/{self.kind}/{self.key}"

    @property
    def phase(self) -> str | None:
        """The exchange it travels in: ``param``, ``loss`` (losses, terms, predictions), ``grad``, or
        None for a member's ``local`` quantities, which never leave it."""
        return PHASE_OF[self.kind]


class Columns(Mapping["Quantity", torch.Tensor]):
    """Several members' values as columns: for each ``(kind, key)``, one tensor whose row ``i`` is
    member ``names[i]``'s value (shape ``(len(names), *value shape)``), as a stacked group holds
    them. :meth:`column` hands a coupling a whole column (a population's values in one op); read as
    a mapping (``columns[Quantity(m, kind, key)]`` is ``m``'s row, a view), it is what a coupling
    written member by member reads, so both kinds of coupling take the same object. Rows are
    views: gradients flow from a row to its column."""

    def __init__(self, names: tuple[str, ...], columns: Mapping[tuple[Kind, str], torch.Tensor]):
        self.names = tuple(names)
        self.columns = dict(columns)
        self.row = {name: i for i, name in enumerate(self.names)}

    def column(self, kind: Kind, key: str, members: tuple[str, ...] | None = None) -> torch.Tensor:
        """The ``(kind, key)`` column, rows in the order of ``members`` (default: :attr:`names`, the
        column itself, no copy)."""
        values = self.columns[(kind, key)]
        if members is None or tuple(members) == self.names:
            return values
        return values[torch.tensor([self.row[m] for m in members], device=values.device)]

    def member(self, name: str) -> dict[Quantity, torch.Tensor]:
        """Member ``name``'s own values, ``{Quantity: row}``."""
        i = self.row[name]
        return {Quantity(name, kind, key): values[i] for (kind, key), values in self.columns.items()}

    def __getitem__(self, q: Quantity) -> torch.Tensor:
        if q.member not in self.row or (q.kind, q.key) not in self.columns:
            raise KeyError(q)
        return self.columns[(q.kind, q.key)][self.row[q.member]]

    def __iter__(self) -> Iterator[Quantity]:
        return (Quantity(name, kind, key) for kind, key in self.columns for name in self.names)

    def __len__(self) -> int:
        return len(self.columns) * len(self.names)


class Overlay(ChainMap):
    """Some members' own live values (:class:`Columns`) over everyone's exchanged ones (a mapping
    of :class:`Quantity`): what a coupling reads as the population when those members compute at
    an exchange. :meth:`column` takes the live rows where there are and the exchanged ones
    elsewhere, differentiable in the live ones."""

    def __init__(self, own: Columns, exchanged: Mapping[Quantity, torch.Tensor]):
        # ChainMap only reads its maps here; typeshed types them as mutable, which these are not.
        super().__init__(own, exchanged)  # type: ignore[arg-type]
        self.own, self.exchanged = own, exchanged

    def column(self, kind: Kind, key: str, members: tuple[str, ...]) -> torch.Tensor:
        own, exchanged = self.own, self.exchanged
        mine = [i for i, m in enumerate(members) if m in own.row]
        if len(mine) == len(members):
            return own.column(kind, key, tuple(members))
        under = column_of(exchanged, kind, key, members)
        if not mine:
            return under
        live = own.column(kind, key, tuple(members[i] for i in mine))
        return under.to(live.dtype).index_put((torch.tensor(mine, device=under.device),), live)


def column_of(values: Mapping[Quantity, torch.Tensor], kind: Kind, key: str, members: list[str] | tuple[str, ...]) -> torch.Tensor:
    """``members``' values of ``(kind, key)`` in ``values`` stacked in their order, shape
    ``(len(members), *value shape)``: by the mapping's own ``column`` where it has one (a
    :class:`Columns`, or a member's :class:`~poptrain.training.member.PeerValues`, which keeps it until the
    next exchange), else stacked here."""
    column = getattr(values, "column", None)
    if column is not None:
        return column(kind, key, tuple(members))
    return torch.stack([values[Quantity(m, kind, key)] for m in members])


@dataclass
class PopulationInfo:
    """What couplings may know about the population before it starts: member names and parameter shapes."""

    members: list[str]
    param_shapes: dict[str, dict[str, tuple[int, ...]]]  # member -> parameter name -> shape
    trainable: dict[str, dict[str, bool]] = field(default_factory=dict)  # member -> parameter -> not frozen
    terms: dict[str, list[str]] = field(default_factory=dict)  # member -> its objective terms (always has "loss")
    exchange_every: int = 1
    # Members whose predictions a coupling reads: each one's output shape per sample, and what
    # decides which samples it sees in which order (batch size, shuffle, data seed, dataset size,
    # a digest of its targets), so a coupling can check that members' batches align.
    outputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    samples: dict[str, dict] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)  # member -> its model's config (name, kwargs)
    seed: int = 0  # the run's seed: what a coupling draws at random is drawn from it (and the round)
    log_every: int = 1  # the coordinator logs the couplings' metrics of every log_every-th step (tracking.log_every)

    def lacks_param(self, reader: str, member: str, param: str) -> str | None:
        """Why coupling ``reader`` cannot read parameter ``param`` of ``member`` (it has no such
        parameter: the message names its first parameters), else None."""
        shapes = self.param_shapes[member]
        if param in shapes:
            return None
        names = list(shapes)
        return (
            f"coupling {reader!r} reads parameter {param!r} of member {member!r}, which has no such parameter; "
            f"its parameters are {names[:12]}{' ...' if len(names) > 12 else ''}"
        )

    def params_matching(self, member: str, patterns: list[str]) -> list[str]:
        return [n for n in self.param_shapes[member] if any(fnmatch.fnmatchcase(n, p) for p in patterns)]

    def unaligned_batches(self, first: str, second: str) -> str | None:
        """Why two members' batches are not the same samples in the same order (a coupling that
        compares their predictions needs them to be), or None. Needs both in :attr:`samples`."""
        mine, theirs = self.samples[first], self.samples[second]
        differ = [k for k in ("size", "batch_size", "shuffle", "seed", "targets") if mine[k] != theirs[k]]
        if not differ:
            return None
        shown = ", ".join(f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in differ if k != "targets") + (", different targets" if "targets" in differ else "")
        return (
            f"members {first!r} and {second!r} do not see the same samples in the same order ({shown}): "
            "give them the same data (views of the same samples qualify), batch size, shuffle and data seed"
        )


@dataclass(frozen=True)
class Rewrite:
    """What a coupling changes at exchanges, and when: members' own ``quantities`` of ``kind`` get
    the values :meth:`Coupling.rewrite` computes, at every ``every``-th exchange of that kind
    (``0``: none but the ones below), at the first one (``first``) and at the parameter exchange
    after the last step (``last``). The coordinator keeps this schedule; the coupling is called
    only when it is due. ``in_place``: :meth:`Coupling.rewrite` accepts ``out`` (see there)."""

    kind: Kind
    quantities: tuple[Quantity, ...]
    every: int = 1
    first: bool = False
    last: bool = False
    in_place: bool = False

    def due(self, exchange_index: int, final: bool) -> bool:
        """Whether the rewrite happens at exchange ``exchange_index`` (0-based, of its kind); ``final``:
        the parameter exchange after the last step."""
        if final:
            return self.last
        return bool(self.every and exchange_index % self.every == 0) or (self.first and exchange_index == 0)


ConfigT = TypeVar("ConfigT", bound=CouplingConfig)

# Methods of earlier interfaces, refused where a coupling class defines one, with what replaces it.
RETIRED = {
    "exchange_transform": "declare `rewrites_values = True` and implement `rewrites()` (what, when) and `rewrite(kind, step, q, out)`",
    "transforms": "declare `rewrites_values = True` and implement `rewrites()` and `rewrite(kind, step, q, out)`",
    "writes": "declare `rewrites_values = True` and implement `rewrites()` and `rewrite(kind, step, q, out)`",
    "rewrite_at": "`rewrite(kind, step, q, out)` takes the step",
    "metrics_at": "`metrics(step, q)` takes the step",
    "values_for": "a host asks `values_against(members, own, exchanged)` for several members' terms at once",
}


class Coupling(CouplingClass, ABC, Generic[ConfigT]):
    """Base of every coupling. A *term* coupling implements :meth:`reads` and :meth:`value` and is
    done; a coupling that changes members' values at exchanges sets ``adds_term = False`` and
    ``rewrites_values = True``, and implements :meth:`rewrites` (what and when) and
    :meth:`rewrite` (the new values). Either may extend :attr:`Config` with its own fields, and
    then names it as the type parameter (``class Mine(Coupling[MyConfig])``), so that a type
    checker reads ``self.config`` and the classmethods' ``config`` as a ``MyConfig``."""

    Config: ClassVar[type[CouplingConfig]] = CouplingConfig
    config: ConfigT
    # Declared, not inferred: whether it adds a term to the objectives of the members it trains
    # (else `trains` is empty whatever the config says), and whether it rewrites values at
    # exchanges (which needs every member at the same exchange: `exchange.mode: sync`).
    adds_term: ClassVar[bool] = True
    rewrites_values: ClassVar[bool] = False
    # False where the coupling keeps members' parameters identical step by step, which restoring
    # one member alone from its checkpoint (`failure.nonfinite: rollback`) would break.
    allows_rollback: ClassVar[bool] = True
    # True where value_for(m, q) has the same gradient with respect to m's own quantities as
    # value(q) (so where value_for is value, its default): a host training several members stacked
    # then takes all their coupling gradients from one backward of value (poptrain.training.stacked).
    # False where each member's term is an objective of its own (mutual learning).
    term_is_joint: ClassVar[bool] = True
    # True where its rounds average its members' parameters (the averaging family): the mean of
    # their final weights is then the population's average model (`evaluation.population_average`).
    averages_members: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        # Checked where a coupling class is defined, not guessed later: a method of the interface
        # before `rewrites`, which nothing would call; and term_is_joint, which must agree with
        # value_for and which no one can check by running it.
        super().__init_subclass__(**kwargs)
        renamed = [f"{old} ({instead})" for old, instead in RETIRED.items() if old in vars(cls)]
        if renamed:  # written for an earlier interface: nothing would call it
            raise TypeError(f"{cls.__qualname__} defines methods couplings no longer have: {'; '.join(renamed)} (see poptrain.couplings.base)")
        if "value_for" in vars(cls) and not any("term_is_joint" in vars(k) for k in cls.__mro__ if k is not Coupling and issubclass(k, Coupling)):
            raise TypeError(
                f"{cls.__qualname__} overrides value_for but does not declare term_is_joint: set `term_is_joint = True` where "
                "value_for's gradient for a member's own quantities is value's (a cheaper form of the joint term), or `False` where "
                "each member's term is an objective of its own (mutual learning); a host training members stacked relies on it"
            )

    def __init__(self, config: ConfigT, population: PopulationInfo):
        self.config = config
        self.population = population
        self.name = config.label
        self.weight = config.weight
        self.members: list[str] = list(config.members or self.default_members(config, population))
        self.trains: list[str] = list(config.trains if config.trains is not None else self.members) if self.adds_term else []

    @classmethod
    def default_members(cls, config: ConfigT, population: PopulationInfo) -> list[str]:
        """The members it reads when the config lists none: every member."""
        return list(population.members)

    # -- the questions a coupling answers ------------------------------------------------------

    @abstractmethod
    def reads(self) -> list[Quantity]:
        """The quantities :meth:`value` needs. Parameters are read before the forward pass,
        losses and terms after it (so a loss-reading coupling exchanges mid-step)."""

    def value(self, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        """The coupling term (a 0-dim tensor, before ``weight``), differentiable in the quantities.
        ``None`` means this coupling adds no term (it acts through :meth:`rewrite`)."""
        return None

    def value_for(self, member: str, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        """The term ``member`` adds to its objective (before ``weight``): by default :meth:`value`,
        the joint term, whose gradient with respect to the member's own quantities is the joint
        objective's. A coupling whose members each have a term of their own (mutual learning:
        each learns towards its peers) returns that member's here, and their sum from :meth:`value`."""
        return self.value(q)

    def values_against(self, members: list[str], own: Columns, exchanged: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        """Each of ``members``' :meth:`value_for` as it computes it alone: on its own quantities in
        ``own`` (columns, row i member i's, live in the autograd graph) and everyone else's in
        ``exchanged`` (their values at the last exchange, the members' own among them; a coupling
        takes a column of them with :func:`column_of`), shape (len(members),); None when none has a
        term. Row i's gradient with respect to member i's quantities is exactly member i's, so a host
        training them stacked takes all their gradients from one backward of the sum even between
        exchanges, when ``own`` and ``exchanged`` differ (:mod:`poptrain.training.stacked`). By default member
        by member; a coupling over many members does it in a few tensor ops on the columns
        (separation)."""
        # ChainMap only reads its maps here; typeshed types them as mutable.
        values = [self.value_for(m, ChainMap(own.member(m), exchanged)) for m in members]  # type: ignore[arg-type]
        if all(v is None for v in values):
            return None
        like = next(v for v in values if v is not None)
        return torch.stack([torch.zeros((), dtype=like.dtype, device=like.device) if v is None else v.reshape(()) for v in values])

    def metrics(self, step: int, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """Extra values to log under ``coupling/<name>/...`` on the parent run (e.g. pairwise
        distances), computed by the coordinator on the whole population ``q`` (the values the members
        sent at the exchange of ``step``), after that exchange's rewrite if one was due: a coupling
        that reports what its round did (the averaging family's distances after it) reads ``step``."""
        return {}

    def metrics_for(self, member: str, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """Extra values ``member`` logs on its own run under ``coupling/<name>/...``, from what it
        sees (its own quantities and its peers' from the last exchange), on logged steps."""
        return {}

    def read_every(self) -> int:
        """Its exchanged quantities are sent every this many exchanges (1: every exchange); in
        between, members keep the values of the last one it was sent at."""
        return 1

    def rewrites(self) -> list[Rewrite]:
        """What this coupling changes at exchanges and when (empty for term couplings)."""
        return []

    def rewrite(self, kind: Kind, step: int, q: Mapping[Quantity, torch.Tensor], out: Mapping[Quantity, torch.Tensor]) -> dict[Quantity, torch.Tensor]:
        """New values for the quantities of the :class:`Rewrite` of ``kind`` due at the exchange of
        ``step`` (the step about to be taken; ``steps`` for the exchange after the last one),
        computed once by the coordinator on the whole population ``q`` (values in ``q`` must not be
        written). Values that depend on the round read ``step`` (gossip draws each round's pairs
        from the run's seed and ``step``, so a run and its resume decide the same). ``out``, for a
        rewrite declared ``in_place``: ``{Quantity: tensor}`` of the members' own parameters that
        live in memory mapped by the coordinator and that no other coupling reads or rewrites; the
        coupling may compute their new values straight into them and return those same tensors
        (anything else returned is copied in). Empty otherwise. ``out`` may be the very memory of
        ``q``'s values (the members' mapped parameters are both): read what the rewrite needs of a
        region before writing it, and take what the metrics need of the values before the round
        (:meth:`metrics` comes after). A quantity left out of the result keeps its value."""
        return {}

    # -- state kept between rounds -------------------------------------------------------------

    def state_dict(self) -> dict | None:
        """What the coupling keeps between rounds (tensors and plain data, loadable with
        ``weights_only=True``), or None (the default): it keeps nothing. The coordinator saves a
        coupling's state beside the members' checkpoints, as it is before the checkpoint's step, and
        a resumed run hands it back to :meth:`load_state_dict` before its first round; a resumed run
        with no state saved for a coupling that keeps some is refused. (A member restarted from its
        checkpoint needs nothing: the coordinator, which holds the state, replays the rounds it missed.)"""
        return None

    def load_state_dict(self, state: Mapping) -> None:
        """Take back what :meth:`state_dict` returned (in a resumed run, before its first round)."""
        raise NotImplementedError(f"{type(self).__name__} returns a state from state_dict() but cannot load it back: implement load_state_dict")

    # -- what the end-of-run figures draw ------------------------------------------------------

    @classmethod
    def plotted_margin(cls, setting: Mapping[str, str]) -> float | None:
        """The distance the coupling asks its members' coupled parameters to keep, drawn as a band
        on its figures (``couplings.png``, ``coupled_<name>.png``), from its settings as the
        parent run's params hold them (strings); None (the default): no band."""
        return None

    # -- checks, before anything starts ------------------------------------------------------

    @classmethod
    def check_config(cls, config: ConfigT, run: RunConfig) -> list[tuple[str, str]]:
        """Problems visible from the config alone, as (key relative to the coupling, reason)."""
        return []

    def check_population(self) -> list[tuple[str, str]]:
        """Problems that need the models (missing parameters, shape mismatches)."""
        return []

    # -- helpers for subclasses --------------------------------------------------------------

    def term(self, member: str, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        """``weight *`` :meth:`value_for` ``member``: what the member adds to its objective."""
        value = self.value_for(member, q)
        return None if value is None else self.weight * value


def build_couplings(configs: list[CouplingConfig], population: PopulationInfo) -> list[Coupling]:
    return [coupling_class(c.given_or_name)(c, population) for c in configs]


def coupling_class(type_name: str | type) -> type[Coupling]:
    """:func:`poptrain.config.registry.resolve_coupling`, typed as the couplings know it: every class it
    returns derives from :class:`Coupling` (its root ``CouplingClass`` exists so that the registry
    and the config need not import the couplings)."""
    return cast("type[Coupling]", resolve_coupling(type_name))
