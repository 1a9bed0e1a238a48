"""The exchange: who sends and receives what and when (:class:`ExchangePlan`), how values cross a
process boundary as columns (:class:`Wire`), and what comes back (:class:`Reply`).

A member exchanges every ``exchange.every`` steps, once per kind it takes part in: ``param``
before its forward pass, ``loss`` after it, ``grad`` after its backward pass. The plan says which
of its quantities it sends and which peers' it receives at each; the wire packs a host's values as
one array per quantity family (kind, key) whose row i is member i's value, and unpacks the
coordinator's :class:`Reply` (the peers' values, new values for the members' own quantities) as
columns again. The values reach the coordinator over a link (:mod:`poptrain.exchange.links`),
which returns a pending reply the member waits on only when it needs it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from poptrain.couplings.base import PHASES, Coupling, Kind, PopulationInfo, Quantity, build_couplings

# Results at least this large are put in Ray's object store once and read by every member by
# reference (NumPy buffers zero-copy from shared memory) instead of being sent to each.
BY_REFERENCE_BYTES = 256 * 1024
# Payloads at least this large travel as separate NumPy arrays (Ray passes them out of band and a
# reader maps them zero-copy); smaller ones as one ``bytes`` object (the cheapest thing to pickle).
FLAT_BYTES_LIMIT = 64 * 1024


class ExchangeTimeout(RuntimeError):
    """A wait at the exchange took longer than ``exchange.timeout_s``; the message names who is missing."""


class ExchangePlan:
    """Who sends, receives and takes part in each exchange (``param``, ``loss``, ``grad``: the phases
    of a step, see :data:`poptrain.couplings.base.PHASES`), derived from the couplings.

    Members and the coordinator build the same plan from the same config, so nothing about the
    plan itself crosses the network.
    """

    def __init__(self, couplings: list[Coupling], population: PopulationInfo, mapped_params: bool = True):
        members = population.members
        self.sends: dict[str, dict[str, list[Quantity]]] = {m: {k: [] for k in PHASES} for m in members}
        # What each member receives of its peers, per coupling (the members it trains, the
        # quantities it exchanges): worked out per member only when asked (receives), since a
        # thousand members each receiving a thousand peers' values are a million entries.
        exchanges: list[tuple[frozenset[str], tuple[Quantity, ...]]] = []
        # Each member's own quantities that the couplings training it read (live in its terms).
        self.own_reads: dict[str, set[Quantity]] = {m: set() for m in members}
        self.replaced: dict[str, set[Quantity]] = {m: set() for m in members}
        takes_part: dict[str, set[str]] = {k: set() for k in PHASES}
        self.period: dict[Quantity, int] = {}  # a quantity sent only every k-th exchange: k
        for coupling in couplings:
            reads = coupling.reads()
            trained = set(coupling.trains)
            for q in reads:
                if q.member in trained:
                    self.own_reads[q.member].add(q)
            exchanged = [(q, q.phase) for q in reads if q.phase is not None]  # local quantities stay with their member
            for q, phase in exchanged:
                if q not in self.sends[q.member][phase]:
                    self.sends[q.member][phase].append(q)
                takes_part[phase].add(q.member)
                self.period[q] = math.gcd(self.period.get(q, 0), coupling.read_every())
            trains = frozenset(coupling.trains)
            if trains and exchanged:
                exchanges.append((trains, tuple(q for q, _ in exchanged)))
                for phase in {phase for _, phase in exchanged}:
                    senders = {q.member for q, p in exchanged if p == phase}
                    # A member it trains takes part in a phase where it receives a peer's value.
                    takes_part[phase].update(m for m in trains if len(senders) > 1 or m not in senders)
            for rewrite in coupling.rewrites():
                for q in rewrite.quantities:
                    if q.phase is None:  # it would otherwise fail below as a KeyError, far from its cause
                        raise ValueError(f"coupling {coupling.name!r} rewrites {q}, a member's local quantity, which never leaves the member")
                    self.replaced[q.member].add(q)
                    takes_part[q.phase].add(q.member)
        for sends in self.sends.values():
            for kind in PHASES:
                sends[kind].sort()
        self.replaces_params = any(r.kind == "param" for c in couplings for r in c.rewrites())
        self.receives = Receives(exchanges)
        # What any member reads of its peers: a value is read by a peer when its coupling trains a member other than its own.
        self.received = {q for trains, quantities in exchanges for q in quantities if len(trains) > 1 or q.member not in trains}
        self.predictions_received = any(q.kind == "pred" for q in self.received)  # once: each of a thousand members asks
        # The members whose values of each family (kind, key) are read: a reply's column is taken
        # whole when it holds only those (poptrain.training.stacked), without a look at each value.
        by_family: dict[tuple[str, str], set[str]] = {}
        for q in self.received:
            by_family.setdefault((q.kind, q.key), set()).add(q.member)
        self.received_by_family = {family: frozenset(members) for family, members in by_family.items()}
        # Parameters only the coordinator reads or writes (averaged, shared): what a member may keep
        # in memory mapped by the coordinator (poptrain.exchange.mapped_memory) instead of sending copies.
        # Only at a sync barrier is there a moment when the coordinator may read them (`mapped_params`).
        self.coordinator_only: dict[str, list[str]] = {m: [] for m in members}
        if mapped_params:
            for m in members:
                names = {q.key for q in self.sends[m]["param"] if q not in self.received}
                names |= {q.key for q in self.replaced[m] if q.kind == "param" and q not in self.received}
                self.coordinator_only[m] = sorted(names)
        # Fixed member order, so every round's participants are listed the same way everywhere.
        self.participants: dict[str, list[str]] = {k: [m for m in members if m in takes_part[k]] for k in PHASES}
        self.takes_part: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in self.participants.items()}  # looked up per member and step

    @classmethod
    def for_run(cls, run, population: PopulationInfo, couplings: list[Coupling] | None = None) -> ExchangePlan:
        """The plan of a run (``couplings``: its built couplings, else built here). Parameters may be
        mapped only at a sync barrier, the one moment the coordinator may read them."""
        if couplings is None:
            couplings = build_couplings(run.couplings, population)
        return cls(couplings, population, mapped_params=run.exchange.shared_memory is not False and run.exchange.mode == "sync")


class Receives(Mapping[str, frozenset[Quantity]]):
    """Member -> the peers' quantities it receives (those of the couplings that train it, other
    than its own), worked out for a member when first asked and kept."""

    def __init__(self, exchanges: list[tuple[frozenset[str], tuple[Quantity, ...]]]):
        self.exchanges = exchanges
        self.members = frozenset().union(*(trains for trains, _ in exchanges))
        self.known: dict[str, frozenset[Quantity]] = {}

    def __getitem__(self, member: str) -> frozenset[Quantity]:
        if member not in self.known:
            self.known[member] = frozenset(q for trains, quantities in self.exchanges if member in trains for q in quantities if q.member != member)
        return self.known[member]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.members))

    def __len__(self) -> int:
        return len(self.members)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a contiguous NumPy array, without a copy where it already is one. bfloat16,
    which NumPy lacks, becomes a float32 copy (exact: every bfloat16 is a float32); whoever writes
    it back into a bfloat16 tensor casts it there."""
    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).contiguous().numpy()


def numpy_copy(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU copy as a NumPy array, which the tensor's later changes do not reach: what a
    member sends (bfloat16 as float32, see :func:`as_numpy`)."""
    return as_numpy(tensor.detach().to("cpu", copy=True))


def tensor_copy(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A tensor on ``device`` owning its memory (arrays read from Ray's object store are read-only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        tensor = torch.from_numpy(array)
    return tensor.to(device, copy=True)


class Wire:
    """The flat transport of exchanged values between members and the coordinator, as columns.

    ``pack({Quantity: array})`` gives ``(entries, payload)``: one entry per quantity family
    (``(kind, key)``) and array layout in the message, ``(family, members, dtype, row shape)``,
    family and members as indices into tables both ends build from the same :class:`ExchangePlan`,
    and the payload: each family's rows as one column (member i's value is row i; a host of 1,000
    members sends its slopes as one array, not 1,000), or, for rows of ``FLAT_BYTES_LIMIT`` and
    more (averaged parameters), the members' own arrays (read zero-copy from Ray's shared memory:
    stacking them would be a copy). Small messages travel as one ``bytes`` object. Shapes and dtypes
    come back as they were, 0-d arrays (losses) included. ``unpack`` gives back read-only arrays
    that view the payload (no copy), ``unpack_columns`` the columns too. An empty mapping packs to
    ``()``. Ray pickles a few arrays far faster than a dict of Quantity -> array, or a thousand
    small arrays, and a round's cost is mostly that per-message overhead.
    """

    def __init__(self, plan: ExchangePlan):
        table: set[Quantity] = set()
        for sends in plan.sends.values():
            for quantities in sends.values():
                table.update(quantities)
        for replaced in plan.replaced.values():
            table.update(replaced)
        self.table = sorted(table)  # every quantity it may carry
        self.families = sorted({(q.kind, q.key) for q in table})
        self.family_index = {f: i for i, f in enumerate(self.families)}
        self.members = sorted({q.member for q in table})
        self.member_index = {m: i for i, m in enumerate(self.members)}

    def pack(self, values: Mapping[Quantity, np.ndarray]) -> tuple:
        if not values:
            return ()
        groups: dict[tuple, tuple[list[int], list[np.ndarray]]] = {}
        for q, array in values.items():
            array = np.require(array, requirements="C")  # keeps 0-d arrays 0-d
            members, rows = groups.setdefault((self.family_index[(q.kind, q.key)], array.dtype.str, array.shape), ([], []))
            members.append(self.member_index[q.member])
            rows.append(array)
        entries = tuple((family, tuple(members), dtype, shape) for (family, dtype, shape), (members, _) in groups.items())
        if sum(a.nbytes for _, rows in groups.values() for a in rows) < FLAT_BYTES_LIMIT:
            return entries, b"".join(a.tobytes() for _, rows in groups.values() for a in rows)
        parts = [np.stack(rows) if rows[0].nbytes < FLAT_BYTES_LIMIT else tuple(rows) for _, rows in groups.values()]
        return entries, parts

    def unpack_columns(self, wire: tuple) -> tuple[RowViews, dict[tuple[str, str], tuple[tuple[str, ...], np.ndarray]]]:
        """``(values, columns)``: every value (a row view of its column, or its own array; made on
        first use, :class:`RowViews`), and the columns (``(kind, key) -> (members, array)``, row i
        member i's, members in the order sent) of the families sent as one array: every value of
        a family in ``columns`` is in its column."""
        if not wire:
            return RowViews([]), {}
        entries, payload = wire
        parts: list[tuple[str, str, tuple[str, ...], Any]] = []
        columns: dict[tuple[str, str], tuple[tuple[str, ...], np.ndarray] | None] = {}
        offset = 0
        for index, (family, members, dtype, shape) in enumerate(entries):
            kind, key = self.families[family]
            names = tuple(self.members[m] for m in members)
            if isinstance(payload, bytes):
                dtype = np.dtype(dtype)
                count = len(members) * math.prod(shape)
                part = np.frombuffer(payload, dtype, count, offset).reshape(len(members), *shape)
                offset += count * dtype.itemsize
            else:
                part = payload[index]
            # A family sent in rows of several shapes or dtypes (several entries), or as the rows'
            # own arrays, has no one column.
            columns[(kind, key)] = (names, part) if (kind, key) not in columns and isinstance(part, np.ndarray) else None
            parts.append((kind, key, names, part))
        return RowViews(parts), {family: column for family, column in columns.items() if column is not None}

    def unpack(self, wire: tuple) -> dict[Quantity, np.ndarray]:
        return self.unpack_columns(wire)[0].as_dict()

    def pack_reply(self, reply: Reply) -> tuple:
        return self.pack(reply.values), self.pack(reply.replace), reply.steps

    def unpack_reply(self, wire: tuple) -> Reply:
        values, replace, steps = wire
        values, columns = self.unpack_columns(values)
        return Reply(values, self.unpack(replace), steps, columns=columns)


class RowViews(Mapping[Quantity, np.ndarray]):
    """An exchange's values one by one, each member's a row view of its family's array (or its own
    array), from the ``(kind, key, members, part)`` parts a message unpacks to, made on first use:
    a host that stacks its members takes the families' columns (:attr:`Reply.columns`), and a
    thousand members' values are never made one by one there. A message carries each quantity
    once, so the count is known without them."""

    def __init__(self, parts: list[tuple[str, str, tuple[str, ...], Any]]):
        self.parts = parts
        self.count = sum(len(names) for _, _, names, _ in parts)
        self.rows: dict[Quantity, np.ndarray] | None = None

    def as_dict(self) -> dict[Quantity, np.ndarray]:
        """The values as a dict, made once (not copied again: what the coordinator keeps of a message)."""
        if self.rows is None:
            self.rows = {
                Quantity(name, cast(Kind, kind), key): part[i, ...] if isinstance(part, np.ndarray) else part[i]
                for kind, key, names, part in self.parts
                for i, name in enumerate(names)
            }
        return self.rows

    def __getitem__(self, q: Quantity) -> np.ndarray:
        return self.as_dict()[q]

    def __iter__(self) -> Iterator[Quantity]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return self.count


@dataclass
class Reply:
    """What a member gets back from one exchange."""

    values: Mapping[Quantity, np.ndarray]  # peers' values that this member reads
    replace: dict[Quantity, np.ndarray] = field(default_factory=dict)  # new values of members' own quantities
    steps: dict[str, int] | None = None  # async: the step each peer's values are from
    # The values as the wire carried them: (kind, key) -> (members, column), row i member i's value.
    columns: dict[tuple[str, str], tuple[tuple[str, ...], np.ndarray]] = field(default_factory=dict, repr=False, compare=False)
    tensors: dict[tuple[Quantity, str, bool], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def tensor(self, q: Quantity, device: torch.device, replaced: bool = False) -> torch.Tensor:
        """Quantity ``q``'s value in :attr:`values` (``replaced``: its new value in :attr:`replace`;
        a quantity can be in both, as sent and as rewritten) as a tensor on ``device``, made once
        per reply and device: the members of a host that all read a peer's value share one tensor
        (nobody writes into a peer's value), instead of a copy each (N² copies in a population of N)."""
        key = (q, str(device), replaced)
        if key not in self.tensors:
            self.tensors[key] = tensor_copy((self.replace if replaced else self.values)[q], device)
        return self.tensors[key]


def by_reference(packed: tuple) -> Any:
    """``packed`` (a :meth:`Wire.pack_reply` tuple) as it is, or, when its arrays are large, put in
    Ray's object store once: every member then gets the same reference (wrapped in a list so Ray
    does not resolve it on return) and reads the NumPy buffers zero-copy from shared memory."""
    # Flat `bytes` parts are under FLAT_BYTES_LIMIT each: only array parts are worth sharing.
    size = sum(
        a.nbytes if isinstance(a, np.ndarray) else sum(row.nbytes for row in a)
        for part in packed[:2]
        if part and not isinstance(part[1], bytes)
        for a in part[1]
    )
    if size < BY_REFERENCE_BYTES:
        return packed
    import ray

    return [ray.put(packed)]
