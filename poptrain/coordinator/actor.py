"""The coordinator as a process: :class:`CoordinatorActor`, the thin Ray actor around a
:class:`~poptrain.coordinator.coordinator.Coordinator` (its threads, the wire, the direct channel
hosts connect to), :func:`start_coordinator` that places it, and :class:`InProcessClient`, the same
calls in one process for tests and benchmarks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from poptrain.config.schema import RunConfig
from poptrain.coordinator.coordinator import Coordinator
from poptrain.couplings import PopulationInfo, Quantity
from poptrain.couplings.base import PHASES
from poptrain.exchange.wire import BY_REFERENCE_BYTES, Wire, by_reference
from poptrain.tracking.outbox import Item

if TYPE_CHECKING:
    from poptrain.exchange.channel import ChannelServer


class InProcessClient:
    """A member's client for a :class:`Coordinator` in the same process (tests, benchmarks): calls
    go through the same wire and the same barrier as an actor's, each on a thread of its own."""

    def __init__(self, coordinator: Coordinator, wire: Wire, threads: int):
        self.coordinator, self.wire = coordinator, wire
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="poptrain-in-process")

    def call(self, method: str, kind: str, step: int, members: Sequence[str], packed: tuple, *rest) -> Callable[[], Any]:
        future = self.pool.submit(getattr(self.coordinator, method), kind, step, members, self.wire.unpack(packed), *rest)
        return future.result

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def in_process_coordinator(run: RunConfig, population: PopulationInfo) -> tuple[Coordinator, Wire]:
    """A coordinator whose replies are packed for the wire, as the actor's are (no Ray)."""
    coordinator = Coordinator(run, population, pack=lambda reply: wire.pack_reply(reply))
    wire = Wire(coordinator.plan)  # the coordinator's own plan: its couplings are not built twice
    return coordinator, wire


class CoordinatorActor:
    """Threaded Ray actor around :class:`Coordinator`: unpacks members' values from the wire, packs
    replies (large ones by reference), and listens on a direct connection (:mod:`poptrain.exchange.channel`).

    Every call runs on a thread of its own (``max_concurrency``, see :func:`start_coordinator`)
    and blocks at the barrier on an event, outside the lock that guards the coordinator's state.
    A threaded actor turned out cheaper per call than an asyncio one (``benchmarks/README.md``).
    """

    coordinator: Coordinator  # the run's, set by _start and let go by park
    wire: Wire
    server: ChannelServer | None

    def __init__(self, run: RunConfig, population: PopulationInfo, run_dir: str | None = None, hosts: int | None = None):
        self.hosts = len(population.members) if hosts is None else hosts  # the processes that call it
        self._start(run, population, run_dir)

    def rebind(self, run: RunConfig, population: PopulationInfo, run_dir: str | None = None) -> bool:
        """Coordinate another run of the same shape in this process (a warm process, see
        :mod:`poptrain.driver.pool`): the last run's state and connection are dropped, everything is built
        anew as a new process would build it. Called while no member is exchanging."""
        self.park()
        self._start(run, population, run_dir)
        return True

    def park(self) -> bool:
        """Let go of the finished run (its state, round history, members' mapped memory, the
        channel) while this warm process waits for the next."""
        import gc

        if self.server is not None:
            self.server.close()
        self.server = None
        coordinator = self.__dict__.get("coordinator")
        if coordinator is not None:
            coordinator.close()
        for run_state in ("coordinator", "wire"):  # a call before the next run's _start fails loudly; parking twice is fine
            self.__dict__.pop(run_state, None)
        gc.collect()  # unmaps the last run's mapped parameters (their files are gone already)
        return True

    def _start(self, run: RunConfig, population: PopulationInfo, run_dir: str | None) -> None:
        import ray

        self.coordinator = Coordinator(run, population, run_dir, pack=lambda r: by_reference(self.wire.pack_reply(r)))
        self.wire = Wire(self.coordinator.plan)  # the coordinator's own plan: its couplings are not built twice
        self.node_id = ray.get_runtime_context().get_node_id()
        # Members reach exchange/publish over a direct connection when every value is small
        # (poptrain.exchange.channel); else with Ray calls, whose object store carries large arrays zero-copy.
        self.server = None
        if self._values_are_small(population):
            from poptrain.exchange.channel import ChannelServer

            host = ray.util.get_node_ip_address()
            try:
                self.server = ChannelServer(
                    {"exchange": self.exchange, "publish": self.publish},
                    host=host,
                    inline=run.exchange.mode == "sync",
                    threads=calls_in_flight(self.hosts),
                )
            except OSError as exc:  # e.g. an IPv6 node address, which multiprocessing.connection cannot bind
                warnings.warn(f"poptrain: the coordinator cannot listen on {host} ({exc}); members exchange through Ray calls", RuntimeWarning, stacklevel=2)

    def _values_are_small(self, population: PopulationInfo) -> bool:
        plan = self.coordinator.plan
        if any(plan.replaced.values()):  # averaging, sharing: whole parameters come back
            return False
        return 8 * sum(_elements(q, population) for q in self.wire.table) < BY_REFERENCE_BYTES

    def attach(self, member: str, layout) -> bool:
        """``member`` keeps its coordinator-only parameters in mapped memory (a
        :class:`poptrain.exchange.mapped_memory.MappedLayout`): map it, when on this node. Whether it did;
        if not, the member sends copies."""
        from poptrain.exchange import mapped_memory

        views = mapped_memory.attach(layout, self.node_id)
        if views is None:
            return False
        self.coordinator.attach(member, views)
        return True

    def channel(self) -> tuple[tuple[str, int], bytes] | None:
        """The direct connection's address and key, or None: then members call :meth:`exchange`
        and :meth:`publish` through Ray."""
        return None if self.server is None else (self.server.address, self.server.authkey)

    def exchange(self, kind: str, step: int, members: Sequence[str], packed: tuple):
        """``sync`` mode: see :meth:`Coordinator.exchange`; values and reply as :class:`Wire` tuples."""
        return self.coordinator.exchange(kind, step, members, self.wire.unpack(packed))

    def publish(self, kind: str, step: int, members: Sequence[str], packed: tuple, used_at: int | None = None):
        """``async`` mode: see :meth:`Coordinator.publish`; values and reply as :class:`Wire` tuples."""
        return self.coordinator.publish(kind, step, members, self.wire.unpack(packed), used_at)

    def member_down(self, member: str) -> None:
        self.coordinator.member_down(member)

    def take_metrics(self, written: bool, resend: bool = False) -> list[Item]:
        return self.coordinator.take_metrics(written, resend)

    def report_evals(self, step: int, reports: list) -> None:
        self.coordinator.report_evals(step, reports)

    def abort(self, reason: str) -> None:
        self.coordinator.abort(reason)

    def pbt_round(self, step: int, arrivals: list[tuple[str, float | None, dict[str, float], Any]]) -> list[dict | None]:
        return self.coordinator.pbt_round(step, arrivals)

    def pbt_events(self) -> list[dict]:
        return self.coordinator.pbt_events()

    def best_member(self) -> tuple[str, float] | None:
        return self.coordinator.best_member()

    def ping(self) -> bool:
        return True


def _elements(q: Quantity, population: PopulationInfo) -> int:
    """How many numbers quantity ``q`` is on the wire."""
    if q.kind == "loss":
        return 1
    if q.kind == "pred":  # a batch of outputs
        return population.samples[q.member]["batch_size"] * int(np.prod(population.outputs[q.member]))
    return int(np.prod(population.param_shapes[q.member][q.key]))


def start_coordinator(run: RunConfig, population: PopulationInfo, run_dir: str | None = None, hosts: int | None = None, **options):
    """The coordinator as a Ray actor (no CPU reserved), with enough threads that a call blocked at
    a barrier never starves the one that would release it: per host (``hosts``, default one per
    member), up to two calls per exchange kind in flight (async pipelining) and a
    population-based-training round, plus evaluation reports (quick: they wait for nobody) and the
    driver's calls (take_metrics, member_down)."""
    import ray

    hosts = len(population.members) if hosts is None else hosts
    threads = calls_in_flight(hosts) + hosts + min(len(population.members), 64) + 4
    return ray.remote(CoordinatorActor).options(num_cpus=0, max_concurrency=threads, **options).remote(run, population, run_dir, hosts)


def calls_in_flight(hosts: int) -> int:
    """The most exchange calls hosts can have waiting at the coordinator at once: two per host
    and exchange kind (an async publish and the pipelined one after it)."""
    return 2 * len(PHASES) * hosts
