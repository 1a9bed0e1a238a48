"""Who has arrived at an exchange, and what stands in for whom: the coordinator's bookkeeping of
rounds, in plain Python.

:class:`Barrier` holds the ``sync`` rounds (kind, step) until every participant has sent;
:class:`StandIns` fills a round for a member being restarted (``failure.while_restarting:
continue``) with its last values; :class:`ReplayHistory` keeps the replies a restarted member will
ask for again as it replays the steps since its checkpoint; :class:`AsyncBoard` keeps each member's
newest values in ``async`` mode and says who is too far behind. :class:`~poptrain.coordinator.coordinator.Coordinator`
uses them under its one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from poptrain.couplings import Quantity
from poptrain.couplings.base import PHASES
from poptrain.exchange.wire import Reply

Values = dict[Quantity, np.ndarray]


@dataclass
class Round:
    """One sync round (kind, step): who is expected, what has arrived, and the reply once complete."""

    expected: list[str]
    values: dict[str, Values] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None

    def missing(self) -> list[str]:
        return [m for m in self.expected if m not in self.values]


class Barrier:
    """The open sync rounds, one per (kind, step)."""

    def __init__(self, participants: dict[str, list[str]]):
        self.participants = participants
        self.rounds: dict[tuple[str, int], Round] = {}

    def arrive(self, kind: str, step: int, member: str, values: Values) -> Round:
        rnd = self.rounds.get((kind, step))
        if rnd is None:
            rnd = self.rounds[(kind, step)] = Round(expected=self.participants[kind])
        rnd.values[member] = values
        return rnd

    def close(self, kind: str, step: int, result: Any) -> None:
        """Release the members waiting at round (kind, step) with ``result``."""
        rnd = self.rounds.pop((kind, step))
        rnd.result = result
        rnd.done.set()


class StandIns:
    """``failure.while_restarting: continue``: members whose process died, or that replay behind
    their peers since, are *lagging*; rounds complete without them, their most recent values
    standing in. Each lagging member *pins* the oldest round it has yet to replay."""

    def __init__(self, enabled: bool, checkpoint_every: int):
        self.enabled, self.checkpoint_every = enabled, checkpoint_every
        self.lagging: set[str] = set()
        self.pinned: dict[str, int] = {}
        self.last_values: dict[str, dict[str, Values]] = {}  # kind -> member -> its most recent values
        self.last_step: dict[str, int] = {}

    def note(self, kind: str, step: int, member: str, values: Values) -> None:
        if self.enabled:
            self.last_values.setdefault(kind, {})[member] = values
            self.last_step[member] = step

    def replayed(self, member: str, step: int) -> None:
        """``member`` replays a completed round at ``step``: what it pins moves on."""
        if member in self.pinned:
            self.pinned[member] = step

    def caught_up(self, member: str) -> None:
        """``member`` is at its peers' step again: they wait for it from now on."""
        self.lagging.discard(member)
        self.pinned.pop(member, None)

    def down(self, member: str) -> None:
        """``member``'s process died: it will replay from its checkpoint (the one before its last
        step, in case it died writing the newest)."""
        self.lagging.add(member)
        every = self.checkpoint_every or 1
        self.pinned[member] = max(0, (self.last_step.get(member, 0) // every - 1) * every)

    def fill(self, kind: str, rnd: Round) -> dict[str, Values] | None:
        """The round's values with lagging members' stand-ins, or None while someone is still missing."""
        values = dict(rnd.values)
        for m in rnd.expected:
            if m not in values and m in self.lagging and m in self.last_values.get(kind, {}):
                values[m] = self.last_values[kind][m]
        return values if len(values) == len(rnd.expected) else None


class ReplayHistory:
    """Replies of completed rounds, kept long enough for a member restarted from its latest
    checkpoint to replay up to its peers: it gets exactly what it got the first time."""

    def __init__(self, steps: int):
        self.steps = steps  # 0: no history (checkpoints off)
        self.completed: dict[tuple[str, int], Any] = {}

    def get(self, kind: str, step: int) -> Any | None:
        return self.completed.get((kind, step))

    def remember(self, kind: str, step: int, reply: Any, pinned: list[int]) -> None:
        if not self.steps:
            return
        self.completed[(kind, step)] = reply
        oldest = min([step - self.steps, *pinned])
        while self.completed:  # oldest first: rounds complete in step order
            first = next(iter(self.completed))
            if first[1] >= oldest:
                break
            del self.completed[first]


class AsyncBoard:
    """``async`` mode: each member's newest values per kind, and the newest step logged per kind."""

    def __init__(self, participants: dict[str, list[str]], max_staleness: int, every: int):
        self.participants, self.max_staleness, self.every = participants, max_staleness, every
        self.newest: dict[str, dict[str, tuple[int, Values]]] = {k: {} for k in PHASES}
        self.logged: dict[str, int] = {}

    def post(self, kind: str, step: int, member: str, values: Values) -> bool:
        """Record ``member``'s values of ``step``; whether they are its newest. Two publishes of one
        member may be handled on different threads in either order: an older one never replaces
        a newer one."""
        current = self.newest[kind].get(member)
        if current is not None and current[0] > step:
            return False
        self.newest[kind][member] = (step, values)
        return True

    def behind(self, kind: str, member: str, used_at: int) -> dict[str, int | str]:
        """The peers whose newest values are more than ``max_staleness`` exchanges older than ``used_at``."""
        oldest = used_at - self.max_staleness * self.every
        newest = self.newest[kind]
        return {p: newest[p][0] if p in newest else "none yet" for p in self.participants[kind] if p != member and not (p in newest and newest[p][0] >= oldest)}

    def peers(self, kind: str, members: Sequence[str]) -> Reply:
        """For ``members`` (one host's): the newest values of every member but a lone caller's own
        (host-mates read each other's too, as any peer's), and the step each is from."""
        newest = self.newest[kind]
        mine = set(members) if len(members) == 1 else set()
        values = {q: a for p, (_, vals) in newest.items() if p not in mine for q, a in vals.items()}
        return Reply(values, {}, {p: s for p, (s, _) in newest.items() if p not in mine})

    def to_log(self, kind: str, step: int) -> bool:
        """Whether ``step``'s coupling metrics should be recorded now: everyone has posted, and no
        later step of ``kind`` was recorded yet."""
        if step <= self.logged.get(kind, -1) or len(self.newest[kind]) < len(self.participants[kind]):
            return False
        self.logged[kind] = step
        return True
