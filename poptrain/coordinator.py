"""The coordinator: the exchange barrier, couplings evaluated on the whole population, averaging.

Every ``exchange.every`` steps each participating member calls
``exchange(kind, step, member, values)`` once per kind it takes part in (``param`` before its
forward pass, ``loss`` after it, ``grad`` after its backward pass). When the last participant
of a round arrives the coordinator

1. merges everyone's values into one population mapping, with the members' parameters that
   live in memory shared with it (:mod:`poptrain.shared_memory`: never sent),
2. computes replacements (``exchange_transform``: averaged parameters, summed shared gradients)
   and writes those of shared parameters in place, after evaluating the couplings that read
   shared parameters (the members change them once released),
3. releases every waiting member with the same result object; results over
   ``SHARE_BY_REFERENCE_BYTES`` are put in Ray's object store once and every member reads the
   same object by reference (NumPy buffers are read zero-copy from shared memory),
4. then, with the members already released, evaluates every other coupling whose inputs are
   all known on the detached population and keeps the values (``coupling/<name>``) in its
   outbox, which the driver empties into MLflow.

Members talk to the coordinator directly; the driver is not on the per-step path. What crosses
the process boundary is a :class:`Wire` tuple (quantity indices, dtypes and shapes, then one
``bytes`` buffer or the arrays themselves), not a dict of Quantity -> array: Ray pickles the former several times faster, and a
round's cost is mostly that per-message overhead (``benchmarks/README.md``).
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from poptrain.config import RunConfig
from poptrain.couplings import Coupling, PopulationInfo, Quantity, build_couplings
from poptrain.couplings.base import PHASES
from poptrain.tracking import Item, MetricsOutbox

SHARE_BY_REFERENCE_BYTES = 256 * 1024
# Payloads at least this large travel as separate NumPy arrays (Ray passes them out of band and a
# reader maps them zero-copy); smaller ones as one ``bytes`` object (the cheapest thing to pickle).
FLAT_BYTES_LIMIT = 64 * 1024


class ExchangeTimeout(RuntimeError):
    """A barrier waited longer than ``exchange.timeout_s`` for some members."""


class ExchangePlan:
    """Who sends, receives and takes part in each kind of exchange, derived from the couplings.

    Members and the coordinator build the same plan from the same config, so nothing about the
    plan itself crosses the network.
    """

    def __init__(self, couplings: list[Coupling], population: PopulationInfo):
        members = population.members
        self.sends: dict[str, dict[str, list[Quantity]]] = {m: {k: [] for k in PHASES} for m in members}
        self.receives: dict[str, set[Quantity]] = {m: set() for m in members}
        self.reads_for_terms: dict[str, set[Quantity]] = {m: set() for m in members}
        self.replaced: dict[str, set[Quantity]] = {m: set() for m in members}
        takes_part: dict[str, set[str]] = {k: set() for k in PHASES}
        for coupling in couplings:
            reads = coupling.reads()
            for q in reads:
                if q not in self.sends[q.member][q.kind]:
                    self.sends[q.member][q.kind].append(q)
                takes_part[q.kind].add(q.member)
            for member in coupling.trains:
                self.reads_for_terms[member].update(reads)
                for q in reads:
                    if q.member != member:
                        self.receives[member].add(q)
                        takes_part[q.kind].add(member)
            for q in coupling.writes():
                self.replaced[q.member].add(q)
                takes_part[q.kind].add(q.member)
        for sends in self.sends.values():
            for kind in PHASES:
                sends[kind].sort()
        self.replaces_params = any("param" in c.transforms() for c in couplings)
        self.received = set().union(*self.receives.values())  # what any member reads of its peers
        # Parameters only the coordinator reads or writes (averaged, shared): what a member may keep
        # in memory shared with the coordinator (poptrain.shared_memory) instead of sending copies.
        self.coordinator_only: dict[str, list[str]] = {}
        for m in members:
            names = {q.key for q in self.sends[m]["param"] if q not in self.received}
            names |= {q.key for q in self.replaced[m] if q.kind == "param" and q not in self.received}
            self.coordinator_only[m] = sorted(names)
        # Fixed member order, so every round's participants are listed the same way everywhere.
        self.participants: dict[str, list[str]] = {k: [m for m in members if m in takes_part[k]] for k in PHASES}


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a contiguous NumPy array, without a copy where it already is one. bfloat16,
    which NumPy lacks, becomes a float32 copy (exact: every bfloat16 is a float32); whoever writes
    it back into a bfloat16 tensor casts it there."""
    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).contiguous().numpy()


class Wire:
    """The flat transport of exchanged values between members and the coordinator.

    ``pack({Quantity: array})`` gives ``(indices, layout, payload)``: each quantity's index in a
    table both ends build from the same :class:`ExchangePlan`, each array's dtype and shape, and
    the bytes: one ``bytes`` object for small payloads, the arrays themselves (read zero-copy from
    Ray's shared memory) from ``FLAT_BYTES_LIMIT`` on. Shapes and dtypes come back as they were,
    0-d arrays (losses) included. ``unpack`` gives back read-only arrays
    that view the payload (no copy). An empty mapping packs to ``()``.
    """

    def __init__(self, plan: ExchangePlan):
        table: set[Quantity] = set()
        for sends in plan.sends.values():
            for quantities in sends.values():
                table.update(quantities)
        for replaced in plan.replaced.values():
            table.update(replaced)
        self.table = sorted(table)
        self.index = {q: i for i, q in enumerate(self.table)}

    def pack(self, values: dict[Quantity, np.ndarray]) -> tuple:
        if not values:
            return ()
        arrays = [np.require(a, requirements="C") for a in values.values()]  # keeps 0-d arrays 0-d
        indices = tuple(self.index[q] for q in values)
        layout = tuple((a.dtype.str, a.shape) for a in arrays)
        if sum(a.nbytes for a in arrays) >= FLAT_BYTES_LIMIT:
            return indices, layout, arrays
        return indices, layout, b"".join(a.tobytes() for a in arrays)

    def unpack(self, wire: tuple) -> dict[Quantity, np.ndarray]:
        if not wire:
            return {}
        indices, layout, payload = wire
        if not isinstance(payload, bytes):
            return {self.table[i]: a for i, a in zip(indices, payload)}
        out, offset = {}, 0
        for i, (dtype, shape) in zip(indices, layout):
            dtype = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            out[self.table[i]] = np.frombuffer(payload, dtype, count, offset).reshape(shape)
            offset += count * dtype.itemsize
        return out

    def pack_result(self, result: dict) -> tuple:
        """A round's result (``values``, ``replace``, and in async mode the peers' ``steps``)."""
        return self.pack(result["values"]), self.pack(result["replace"]), result.get("steps")

    def unpack_result(self, wire: tuple) -> dict:
        values, replace, steps = wire
        return {"values": self.unpack(values), "replace": self.unpack(replace), **({"steps": steps} if steps else {})}


@dataclass
class Round:
    expected: list[str]
    values: dict[str, dict[Quantity, np.ndarray]] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None


class Coordinator:
    """The coordinator's logic, without Ray: completing one exchange round."""

    def __init__(self, run: RunConfig, population: PopulationInfo):
        self.run = run
        self.couplings = build_couplings(run.couplings, population)
        self.plan = ExchangePlan(self.couplings, population)
        self.latest: dict[Quantity, torch.Tensor] = {}  # the most recent value of every exchanged quantity
        # Each coupling is evaluated for logging at the last phase whose values it reads.
        self.evaluated_at = {c.name: max((PHASES.index(q.kind) for q in c.reads()), default=0) for c in self.couplings}
        # Members' parameters in memory shared with this process (poptrain.shared_memory): read and
        # written in place, never sent. Couplings reading them are evaluated before the release.
        self.shared: dict[Quantity, torch.Tensor] = {}
        self.shared_by_member: dict[str, list[Quantity]] = {}
        self.reads_shared: set[str] = set()
        self.writes_into = {c.name: "out" in inspect.signature(c.exchange_transform).parameters for c in self.couplings}
        self.early_metrics: dict[tuple[str, int], dict[str, float]] = {}  # (kind, step) -> metrics

    def attach(self, member: str, views: dict[str, torch.Tensor]) -> None:
        """``member``'s parameters ``views`` (name -> tensor) live in memory this process maps."""
        for q in self.shared_by_member.pop(member, []):
            del self.shared[q]
        quantities = {Quantity(member, "param", name): view for name, view in views.items()}
        self.shared.update(quantities)
        self.shared_by_member[member] = list(quantities)
        self.reads_shared = {c.name for c in self.couplings if any(q in self.shared for q in c.reads())}

    def complete(self, kind: str, step: int, values: dict[str, dict[Quantity, np.ndarray]]) -> tuple[dict, dict[str, float]]:
        """Merge one round; returns (the result every member receives, coupling metrics to log)."""
        return self.release(kind, step, values), self.coupling_metrics(kind, step)

    def release(self, kind: str, step: int, values: dict[str, dict[Quantity, np.ndarray]]) -> dict:
        """Merge one round; returns what every member receives: ``values`` (what peers read),
        ``replace`` (replacements to send) and ``written`` (replacements already written into
        members' shared parameters, which need no sending). The round's coupling metrics are
        :meth:`coupling_metrics`, computed after the members are released, except for couplings
        reading shared parameters: those are computed here, before the members change them."""
        merged: dict[Quantity, np.ndarray] = {}
        for member_values in values.values():
            merged.update(member_values)
        self.observe(merged)
        if kind == "param":
            for member in values:
                for q in self.shared_by_member.get(member, ()):
                    self.latest[q] = self.shared[q]
        # Derived from the step, not counted, so a resumed or restarted run needs no coordinator state.
        index = step // self.run.exchange.every

        replace: dict[Quantity, np.ndarray] = {}
        into_shared: dict[Quantity, torch.Tensor] = {}
        for coupling in self.couplings:
            if kind not in coupling.transforms():
                continue
            final = kind == "param" and step == self.run.steps
            out = {q: self.shared[q] for q in coupling.writes() if q in self.shared} if self.writes_into[coupling.name] else {}
            produced = coupling.exchange_transform(kind, self.latest, index, final, **({"out": out} if out else {}))
            for q, tensor in produced.items():
                if q in self.shared:
                    into_shared[q] = tensor
                else:
                    replace[q] = as_numpy(tensor)
        # Metrics of couplings reading shared parameters: now, before these are overwritten below
        # (averaging back into the members) or changed by the members once released.
        early = self.coupling_metrics(kind, step, early=True) if self.reads_shared else {}
        if early:
            self.early_metrics[(kind, step)] = early
        with torch.no_grad():
            for q, tensor in into_shared.items():
                if tensor is not self.shared[q]:  # else the coupling computed it in place
                    self.shared[q].copy_(tensor)
        written = {q: self.shared[q] for q in into_shared}
        # Send back only what some member reads of its peers (averaged sources, say, go nowhere).
        wanted = {q: a for q, a in merged.items() if q in self.plan.received}
        return {"values": wanted, "replace": replace, "written": written}

    def observe(self, values: dict[Quantity, np.ndarray]) -> None:
        """Keep each value as the latest. Arrays from Ray are read-only views of its shared memory,
        which nobody can change: they are kept as they are (zero-copy). A writable array (a caller
        in the same process) may change under us, so it is copied."""
        for q, array in values.items():
            if array.flags.writeable:
                self.latest[q] = torch.from_numpy(np.array(array, copy=True))
            else:
                with warnings.catch_warnings():  # torch warns that it cannot protect read-only memory; nothing here writes to it
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    self.latest[q] = torch.from_numpy(array)

    def coupling_metrics(self, kind: str, step: int, early: bool = False) -> dict[str, float]:
        """Every coupling evaluated at ``kind`` on the latest population values (on logged steps).
        Couplings reading shared parameters are evaluated by :meth:`release` (``early``), before
        the members change those; their values are taken from there."""
        metrics = {} if early else self.early_metrics.pop((kind, step), {})
        if step % self.run.tracking.log_every:
            return metrics
        for coupling in self.couplings:
            if (coupling.name in self.reads_shared) != early:
                continue
            if PHASES[self.evaluated_at[coupling.name]] != kind or any(q not in self.latest for q in coupling.reads()):
                continue
            with torch.no_grad():
                value = coupling.value(self.latest)
                if value is not None:
                    metrics[f"coupling/{coupling.name}"] = float(value)
                for key, extra in coupling.metrics(self.latest).items():
                    metrics[f"coupling/{coupling.name}/{key}"] = float(extra)
        return metrics


class CoordinatorActor:
    """Threaded Ray actor around :class:`Coordinator`: one barrier per (kind, step).

    Every call runs on a thread of its own (``max_concurrency``, see :func:`start_coordinator`)
    and blocks at the barrier on an event, outside the lock that guards the coordinator's state.
    A threaded actor turned out cheaper per call than an asyncio one (``benchmarks/README.md``).
    """

    def __init__(self, run: RunConfig, population: PopulationInfo, run_dir: str | None = None):
        self._start(run, population, run_dir)

    def rebind(self, run: RunConfig, population: PopulationInfo, run_dir: str | None = None) -> bool:
        """Coordinate another run of the same shape in this process (a warm process, see
        :mod:`poptrain.pool`): the last run's state and connection are dropped, everything is built
        anew as a new process would build it. Called while no member is exchanging."""
        self.park()
        self._start(run, population, run_dir)
        return True

    def park(self) -> bool:
        """Let go of the finished run (its state, round history, members' shared memory, the
        channel) while this warm process waits for the next."""
        import gc

        if self.server is not None:
            self.server.close()
        self.server = self.logic = self.rounds = self.completed = self.published = self.outbox = None
        gc.collect()  # unmaps the last run's shared-memory parameters (their files are gone already)
        return True

    def _start(self, run: RunConfig, population: PopulationInfo, run_dir: str | None) -> None:
        from poptrain.checkpoint import load_coordinator_metrics

        self.logic = Coordinator(run, population)
        self.wire = Wire(self.logic.plan)
        self.lock = threading.Condition()  # guards everything below; async publishes wait on it
        # Coupling metrics, taken by the driver. What it had not seen written by the last exchange
        # before a checkpoint step is saved beside the members' checkpoints, so a resumed run
        # writes it (members replay only from their checkpoint, so the coordinator would not
        # compute those steps again).
        self.run_dir = run_dir if run.checkpoint.every else None
        self.outbox = MetricsOutbox(load_coordinator_metrics(run_dir) if self.run_dir else [])
        self.timeout_s = run.exchange.timeout_s
        self.rounds: dict[tuple[str, int], Round] = {}
        # Results of completed rounds, kept long enough for a member restarted from its latest
        # checkpoint to replay up to its peers: it gets exactly what it got the first time.
        self.completed: dict[tuple[str, int], Any] = {}
        self.history_steps = 2 * run.checkpoint.every + run.exchange.every if run.checkpoint.every else 0
        # `failure.while_restarting: continue`: members whose process died, or that replay behind
        # their peers since; rounds complete without them, with their most recent values. Each
        # pins the completed rounds it has yet to replay.
        self.continue_without_dead = run.failure.while_restarting == "continue"
        self.checkpoint_every = run.checkpoint.every
        self.lagging: set[str] = set()
        self.pinned: dict[str, int] = {}
        self.last_values: dict[str, dict[str, dict]] = {}  # kind -> member -> its most recent values
        self.last_step: dict[str, int] = {}
        # async mode: each member's newest values per kind
        self.max_staleness = run.exchange.max_staleness
        self.published: dict[str, dict[str, tuple[int, dict]]] = {}
        self.logged: dict[str, int] = {}
        # Members reach exchange/publish over a direct connection when every value is small
        # (poptrain.channel); else with Ray calls, whose object store carries large arrays zero-copy.
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.server = None
        if self._values_are_small(population):

            from poptrain.channel import ChannelServer

            host = ray.util.get_node_ip_address()
            try:
                self.server = ChannelServer(
                    {"exchange": self.exchange, "publish": self.publish},
                    host=host,
                    inline=run.exchange.mode == "sync",
                    threads=calls_in_flight(len(population.members)),
                )
            except OSError as exc:  # e.g. an IPv6 node address, which multiprocessing.connection cannot bind
                warnings.warn(f"poptrain: the coordinator cannot listen on {host} ({exc}); members exchange through Ray calls", RuntimeWarning, stacklevel=2)

    def _values_are_small(self, population: PopulationInfo) -> bool:
        plan = self.logic.plan
        if any(plan.replaced.values()):  # averaging, sharing: whole parameters come back
            return False
        elements = sum(1 if q.kind == "loss" else int(np.prod(population.param_shapes[q.member][q.key])) for q in self.wire.table)
        return 8 * elements < SHARE_BY_REFERENCE_BYTES

    def attach(self, member: str, layout) -> bool:
        """``member`` keeps its coordinator-only parameters in shared memory (a
        :class:`poptrain.shared_memory.SharedLayout`): map it, when on this node. Whether it did;
        if not, the member sends copies."""
        from poptrain import shared_memory

        views = shared_memory.attach(layout, self.node_id)
        if views is None:
            return False
        with self.lock:
            self.logic.attach(member, views)
        return True

    def channel(self) -> tuple[tuple[str, int], bytes] | None:
        """The direct connection's address and key, or None: then members call :meth:`exchange`
        and :meth:`publish` through Ray."""
        return None if self.server is None else (self.server.address, self.server.authkey)

    def exchange(self, kind: str, step: int, member: str, wire: tuple):
        """``sync`` mode: ``member``'s values (a :class:`Wire` tuple) for round (kind, step); returns
        the round's packed result once every participant has sent its values."""
        values = self.wire.unpack(wire)
        key = (kind, step)
        with self.lock:
            if self.continue_without_dead:
                self.last_values.setdefault(kind, {})[member] = values
                self.last_step[member] = step
            if key in self.completed:  # a restarted member replaying a round its peers have finished
                if member in self.pinned:
                    self.pinned[member] = step
                return self.completed[key]
            self.lagging.discard(member)  # at its peers' step again: they wait for it from now on
            self.pinned.pop(member, None)
            rnd = self.rounds.get(key)
            if rnd is None:
                rnd = self.rounds[key] = Round(expected=self.logic.plan.participants[kind])
            rnd.values[member] = values
            completed = self._complete_if_ready(key, rnd)
        if completed:
            with self.lock:  # the peers are on their way already; this member logs the round
                self._record(step, self.logic.coupling_metrics(kind, step))
        elif not rnd.done.wait(self.timeout_s):
            with self.lock:
                missing = [m for m in rnd.expected if m not in rnd.values]
            raise ExchangeTimeout(
                f"exchange of {kind!r} at step {step}: member {member!r} waited {self.timeout_s:g} s for "
                f"{missing} (exchange.timeout_s). A peer is stalled or dead; see its log."
            )
        return rnd.result

    def publish(self, kind: str, step: int, member: str, wire: tuple, used_at: int | None = None):
        """``async`` mode: record a member's values and return the freshest values of its peers,
        waiting only while a peer's newest values are more than ``max_staleness`` exchanges older
        than ``used_at``, the step at which the member will use the reply (default ``step``)."""
        values = self.wire.unpack(wire)
        with self.lock:
            newest = self.published.setdefault(kind, {})
            newest[member] = (step, values)
            self.logic.observe(values)
            self.lock.notify_all()
            peers = [m for m in self.logic.plan.participants[kind] if m != member]
            oldest = (step if used_at is None else used_at) - self.max_staleness * self.logic.run.exchange.every
            ready = lambda: all(p in newest and newest[p][0] >= oldest for p in peers)  # noqa: E731
            if not self.lock.wait_for(ready, self.timeout_s):
                behind = {p: newest[p][0] if p in newest else "none yet" for p in peers if not (p in newest and newest[p][0] >= oldest)}
                raise ExchangeTimeout(
                    f"async exchange of {kind!r} at step {step}: member {member!r} waited {self.timeout_s:g} s for peers "
                    f"more than {self.max_staleness} exchange(s) behind, at steps {behind} (exchange.timeout_s)"
                )
            if step > self.logged.get(kind, -1) and len(newest) == len(self.logic.plan.participants[kind]):
                self.logged[kind] = step
                self._record(step, self.logic.coupling_metrics(kind, step))
            merged = {q: a for p, (_, vals) in newest.items() if p != member for q, a in vals.items()}
            steps = {p: newest[p][0] for p in peers}
        return self.wire.pack_result({"values": merged, "replace": {}, "steps": steps})

    def _complete_if_ready(self, key: tuple[str, int], rnd: Round) -> bool:
        """Complete ``rnd`` once every participant has sent its values, a lagging member's most
        recent values standing in for it; release the waiting members. Whether it completed.
        The caller holds the lock, and records the round's coupling metrics."""
        kind, step = key
        values = dict(rnd.values)
        for m in rnd.expected:
            if m not in values and m in self.lagging and m in self.last_values.get(kind, {}):
                values[m] = self.last_values[kind][m]
        if len(values) < len(rnd.expected):
            return False
        result = self.logic.release(kind, step, values)
        rnd.result = self._share(self.wire.pack_result(result))
        replay = rnd.result
        if self.history_steps and result["written"]:
            # A member replaying this round from its checkpoint needs the values written in place,
            # as they are now: a copy goes into the history.
            written = {q: np.array(as_numpy(t), copy=True) for q, t in result["written"].items()}
            replay = self._share(self.wire.pack_result({**result, "replace": {**result["replace"], **written}}))
        rnd.done.set()
        del self.rounds[key]
        self._remember(key, replay)
        return True

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        """Put a round's coupling metrics in the outbox. At the last exchange step before a
        checkpoint step, also save what the outbox has not seen written: every round of that step
        completes before the last member can write its checkpoint (it exchanges there first), so
        a complete checkpoint at step c always has the coupling metrics of the steps before c."""
        if metrics:
            self.outbox.add([(k, v, step, int(time.time() * 1000)) for k, v in metrics.items()])
        if self.run_dir is not None and (step + self.logic.run.exchange.every) % self.checkpoint_every == 0:
            from poptrain.checkpoint import coordinator_metrics_path, save_atomic

            save_atomic(self.outbox.unwritten(), coordinator_metrics_path(self.run_dir))

    def member_down(self, member: str) -> None:
        """The driver saw ``member``'s process die (``failure.while_restarting: continue``): complete
        the rounds waiting for it with its most recent values, and keep every round it will replay
        from its checkpoint (the one before its last step, in case it died writing the newest)."""
        with self.lock:
            self.lagging.add(member)
            last = self.last_step.get(member, 0)
            every = self.checkpoint_every or 1
            self.pinned[member] = max(0, (last // every - 1) * every)
            for key, rnd in list(self.rounds.items()):
                if self._complete_if_ready(key, rnd):
                    self._record(key[1], self.logic.coupling_metrics(*key))

    def _remember(self, key: tuple[str, int], result: Any) -> None:
        if not self.history_steps:
            return
        self.completed[key] = result
        oldest = min([key[1] - self.history_steps, *self.pinned.values()])
        while self.completed:  # oldest first: rounds complete in step order
            first = next(iter(self.completed))
            if first[1] >= oldest:
                break
            del self.completed[first]

    @staticmethod
    def _share(result: tuple) -> Any:
        # Flat `bytes` parts are under FLAT_BYTES_LIMIT each: only array parts are worth sharing.
        size = sum(a.nbytes for part in result[:2] if part and not isinstance(part[2], bytes) for a in part[2])
        if size < SHARE_BY_REFERENCE_BYTES:
            return result
        import ray

        # Put once; every member gets the same reference (wrapped in a list so Ray does not
        # resolve it on return) and reads the NumPy buffers zero-copy from shared memory.
        return [ray.put(result)]

    def take_metrics(self, written: bool, resend: bool = False) -> list[Item]:
        """The coupling metrics since the last call (see :class:`MetricsOutbox`)."""
        with self.lock:
            return self.outbox.take(written, resend)

    def ping(self) -> bool:
        return True


def start_coordinator(run: RunConfig, population: PopulationInfo, run_dir: str | None = None, **options):
    """The coordinator as a Ray actor (no CPU reserved), with enough threads that a call blocked at
    a barrier never starves the one that would release it: per member, up to two calls per
    exchange kind in flight (async pipelining), plus the driver's (take_metrics, member_down)."""
    import ray

    threads = calls_in_flight(len(population.members)) + 4
    return ray.remote(CoordinatorActor).options(num_cpus=0, max_concurrency=threads, **options).remote(run, population, run_dir)


def calls_in_flight(members: int) -> int:
    """The most exchange calls members can have waiting at the coordinator at once: two per
    member and exchange kind (an async publish and the pipelined one after it)."""
    return 2 * len(PHASES) * members
