"""A host's way to the coordinator: a :class:`Link` takes a host's values of one exchange, sends
them packed by the :class:`~poptrain.exchange.wire.Wire`, and returns a :data:`Pending` reply, a
function that waits for the :class:`~poptrain.exchange.wire.Reply`; a member calls it only once it
needs the peers' values, computing meanwhile.

* :class:`SyncLink` (``exchange.mode: sync``): the reply is the round's result, once every
  participant has sent its values (the coordinator's barrier). Exact with ``every: 1``.
* :class:`AsyncLink` (``async``): the reply holds the peers' newest values, at most
  ``max_staleness`` exchanges old. Pipelined: the reply to this exchange's publish is used at the
  member's next one, so a member never waits out a round trip.

Both reach the coordinator through a :class:`poptrain.exchange.channel.CoordinatorClient` (a direct
connection for small values, else Ray calls) or, in one process, straight through
:class:`poptrain.coordinator.coordinator.Coordinator` (:class:`~poptrain.coordinator.actor.InProcessClient`):
the same barrier either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from poptrain.couplings.base import Quantity
from poptrain.exchange.wire import ExchangePlan, Reply, Wire

Pending = Callable[[], Reply]  # waits for (and returns) an exchange's reply


class Client(Protocol):
    """A way to call the coordinator: ``call(method, *args)`` returns a function waiting for the reply."""

    def call(self, method: str, *args: Any) -> Callable[[], Any]: ...

    def close(self) -> None: ...


class Link:
    """A host's way to the coordinator: :meth:`send` the values of ``kind`` at ``step`` of some of
    its members (one message for all of them) and get a :data:`Pending` reply, one for them all.
    :meth:`drain` waits for what is still in flight (before the host's ``train`` returns, so the
    coordinator has logged every round). A host always sends the same members for a kind."""

    def __init__(self, client: Client, wire: Wire):
        self.client, self.wire = client, wire

    def send(self, kind: str, step: int, members: tuple[str, ...], values: dict[Quantity, np.ndarray]) -> Pending:
        raise NotImplementedError

    def drain(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()

    def _reply(self, answer: Callable[[], Any]) -> Pending:
        return lambda: self._unpack(answer())

    def _unpack(self, packed: Any) -> Reply:
        if isinstance(packed, list):  # a large result comes as one object reference, shared by every member
            import ray

            packed = ray.get(packed[0])
        return self.wire.unpack_reply(packed)


class SyncLink(Link):
    """``exchange.mode: sync``: the reply is the round's result, once every participant has sent."""

    def send(self, kind: str, step: int, members: tuple[str, ...], values: dict[Quantity, np.ndarray]) -> Pending:
        return self._reply(self.client.call("exchange", kind, step, members, self.wire.pack(values)))


class AsyncLink(Link):
    """``exchange.mode: async``: publish the member's values, get its peers' newest ones.

    With ``max_staleness > 0`` publishes are pipelined: each exchange submits its publish and uses
    the reply of the previous one, which the coordinator held until the peers were within
    ``max_staleness`` of the step it is used at (``used_at``), so the bound holds where it matters.
    The first exchange of a kind waits for its own reply and starts the pipeline.
    """

    def __init__(self, client: Client, wire: Wire, every: int, steps: int, max_staleness: int):
        super().__init__(client, wire)
        self.every, self.steps, self.max_staleness = every, steps, max_staleness
        self.in_flight: dict[str, Callable[[], Any]] = {}  # per kind, the reply to the last publish

    def send(self, kind: str, step: int, members: tuple[str, ...], values: dict[Quantity, np.ndarray]) -> Pending:
        packed = self.wire.pack(values)
        next_step = step + self.every
        if self.max_staleness > 0 and kind in self.in_flight:
            used_at = next_step if next_step < self.steps else step
            previous, self.in_flight[kind] = self.in_flight[kind], self.client.call("publish", kind, step, members, packed, used_at)
            return self._reply(previous)
        reply = self._unpack(self.client.call("publish", kind, step, members, packed)())
        if self.max_staleness > 0 and next_step < self.steps:
            self.in_flight[kind] = self.client.call("publish", kind, step, members, packed, next_step)
        return lambda: reply

    def drain(self) -> None:
        for answer in self.in_flight.values():
            answer()
        self.in_flight.clear()


def open_link(run, plan: ExchangePlan, client: Client) -> Link:
    """The link ``run.exchange.mode`` asks for, over ``client``."""
    wire = Wire(plan)
    if run.exchange.mode == "sync":
        return SyncLink(client, wire)
    return AsyncLink(client, wire, run.exchange.every, run.steps, run.exchange.max_staleness)
