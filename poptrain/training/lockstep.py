"""Driving members' steps: one member through its own link, or several members of one host in
lockstep through the host's one link.

A member's step is a *program* (:meth:`poptrain.training.member.MemberTrainer.step_program`): a generator
that yields :class:`Send` (its values of one exchange phase; it is resumed with a pending reply)
and :class:`Wait` (it is resumed with the :class:`~poptrain.exchange.wire.Reply`), and returns the
step's metrics. Keeping the exchange out of the member is what lets one process carry many
members: :func:`step_together` runs each member until it reaches an exchange, sends the values of
every member of the host that reached the same phase as one message, and hands each its reply.
Members compute one after another, each inside its own random streams
(:class:`poptrain.training.randomness.MemberRandomness`), so a member's results do not depend on which
host carries it or next to whom.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from poptrain.couplings.base import PHASES, Quantity
from poptrain.exchange.links import Link, Pending
from poptrain.exchange.wire import Reply

if TYPE_CHECKING:  # pragma: no cover
    from poptrain.training.randomness import MemberRandomness


@dataclass
class Send:
    """A member's values of exchange phase ``kind`` at ``step`` (its own quantities only)."""

    kind: str
    step: int
    values: dict[Quantity, np.ndarray]


@dataclass
class Wait:
    """The member needs the reply ``pending`` stands for."""

    pending: Pending


StepProgram = Generator[Any, Any, Any]


class Programmed(Protocol):
    """What a driver needs of what it steps (a member, or a :class:`poptrain.training.stacked.StackedGroup`
    of members): the names of the members it stands for, its random streams and link."""

    @property
    def names(self) -> tuple[str, ...]: ...

    randomness: MemberRandomness
    link: Link | None


def run_alone(program: StepProgram, member: Programmed) -> Any:
    """Run ``program`` to its end with the member's own link; what it returns."""
    with member.randomness.active():
        try:
            op = next(program)
            while True:
                if isinstance(op, Send):
                    assert member.link is not None, "a member run alone exchanges over its own link"
                    op = program.send(member.link.send(op.kind, op.step, member.names, op.values))
                else:
                    op = program.send(op.pending())
        except StopIteration as done:
            return done.value


def drive(units: list[Programmed], programs: list[StepProgram]) -> list[Any]:
    """Run ``programs`` (one per unit, in order) to their ends: a lone unit through its own link
    (:func:`run_alone`), several in lockstep through the link they share, their host's
    (:func:`step_together`). What each returns."""
    if len(units) == 1:
        return [run_alone(programs[0], units[0])]
    link = units[0].link
    assert link is not None and all(u.link is link for u in units), "the units of one host share its link"
    return step_together(units, programs, link)


class _Batch:
    """One message for the members of a host that sent the same phase: its reply, read once."""

    def __init__(self, pending: Pending):
        self.pending = pending
        self.reply: Reply | None = None

    def get(self) -> Reply:
        if self.reply is None:
            self.reply = self.pending()
        return self.reply


def step_together(members: list[Programmed], programs: list[StepProgram], link: Link) -> list[Any]:
    """Run the programs of ``members`` (one host's, in a fixed order) to their ends through the
    host's ``link``; what each returns, in order.

    A member runs until it yields. Once none can run, the members waiting to send the earliest
    phase (param, loss, grad: every member meets them in that order) go out as one message, and
    each is resumed with that message's reply. A member that waits for a reply not yet in is
    resumed only when no member can run or send a phase at most as early as its own: every value
    a peer's round may need from this host has gone out before the host blocks."""
    order = {kind: i for i, kind in enumerate(PHASES)}
    results: list[Any] = [None] * len(members)
    resume: dict[int, Any] = {i: None for i in range(len(members))}  # runnable -> what it is resumed with
    sending: dict[int, Send] = {}
    waiting: dict[int, tuple[_Batch, str]] = {}
    started: set[int] = set()
    while resume or sending or waiting:
        for i in sorted(resume):
            value = resume.pop(i)
            with members[i].randomness.active():
                try:
                    op = programs[i].send(value) if i in started else next(programs[i])
                    started.add(i)
                except StopIteration as done:
                    results[i] = done.value
                    continue
            if isinstance(op, Send):
                sending[i] = op
            else:
                batch, kind = op.pending
                if batch.reply is not None:
                    resume[i] = batch.reply
                else:
                    waiting[i] = (batch, kind)
        if resume:
            continue
        if not sending and not waiting:
            break
        first_send = min((order[op.kind] for op in sending.values()), default=len(PHASES))
        first_wait = min((order[kind] for _, kind in waiting.values()), default=len(PHASES))
        if sending and first_send <= first_wait:
            chosen = [i for i, op in sending.items() if order[op.kind] == first_send]
            kind, step = sending[chosen[0]].kind, sending[chosen[0]].step
            values: dict[Quantity, np.ndarray] = {}
            for i in chosen:
                values.update(sending.pop(i).values)
            batch = _Batch(link.send(kind, step, tuple(name for i in chosen for name in members[i].names), values))
            for i in chosen:
                resume[i] = (batch, kind)  # what the member's Wait will hand back
            continue
        i = min(waiting, key=lambda k: order[waiting[k][1]])
        batch, _ = waiting.pop(i)
        resume[i] = batch.get()
    return results
