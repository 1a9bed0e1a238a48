"""The coordinator: the exchange barrier, couplings evaluated on the whole population, rewrites.

Every ``exchange.every`` steps each participating member sends its values of a kind (``param``,
``loss``, ``grad``; see :mod:`poptrain.exchange.wire`). In ``sync`` mode, when the last participant
of a round arrives, :meth:`Coordinator.exchange`

1. merges everyone's values into one population mapping, with the members' parameters that
   live in memory it maps (:mod:`poptrain.exchange.mapped_memory`: never sent),
2. computes the rewrites that are due (:class:`poptrain.couplings.Rewrite`: averaged parameters,
   summed shared gradients) and writes those of mapped parameters in place, after evaluating the
   couplings that read mapped parameters (the members change them once released),
3. releases every waiting member with the same reply,
4. then, with the members already released, evaluates every other coupling whose inputs are all
   known on the detached population, for logging (``coupling/<name>`` on the parent run).

In ``async`` mode :meth:`Coordinator.publish` keeps each member's newest values on a board and
answers with the peers' newest, waiting only while one is more than ``max_staleness`` behind.

Everything here is plain Python, driven by unit tests without Ray: :class:`CouplingEvaluator`
(the population's values, rewrites, coupling metrics), :class:`MetricRecorder` and
:class:`CouplingStates` (couplings' state beside the checkpoints) here; the rounds' bookkeeping in
:mod:`poptrain.coordinator.barrier`; held-out summaries in :mod:`poptrain.evaluation.board`; PBT's
rounds in :mod:`poptrain.pbt.rounds`. :class:`Coordinator` puts them together under one lock;
:mod:`poptrain.coordinator.actor` is the thin Ray actor around it: threads, the wire, the channel.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poptrain.config.schema import RunConfig
from poptrain.coordinator.barrier import AsyncBoard, Barrier, ReplayHistory, Round, StandIns, Values
from poptrain.couplings import PopulationInfo, Quantity, build_couplings
from poptrain.couplings.base import PHASES
from poptrain.evaluation.board import EvalBoard
from poptrain.exchange.wire import ExchangePlan, ExchangeTimeout, Reply, as_numpy
from poptrain.pbt.rounds import PBTRounds
from poptrain.tracking.outbox import Item, MetricsOutbox

# The name of the coordinator's thread that records each round's coupling metrics (Coordinator._record_round).
RECORDING_THREAD = "poptrain-round-metrics"


class CouplingEvaluator:
    """The population's latest values, the rewrites couplings make, and the couplings' values for logging."""

    def __init__(self, run: RunConfig, population: PopulationInfo):
        self.run = run
        self.couplings = build_couplings(run.couplings, population)
        self.plan = ExchangePlan.for_run(run, population, self.couplings)
        self.rewrites = [(c, r) for c in self.couplings for r in c.rewrites()]
        # The couplings reading or rewriting each quantity: a rewrite computes in place only into
        # memory no other coupling reads or writes (they would see the round half applied).
        self.touched_by: dict[Quantity, set[str]] = {}
        for c in self.couplings:
            for q in [*c.reads(), *(q for r in c.rewrites() for q in r.quantities)]:
                self.touched_by.setdefault(q, set()).add(c.name)
        self.latest: dict[Quantity, torch.Tensor] = {}  # the most recent value of every exchanged quantity
        # Each coupling is evaluated for logging at the last phase whose values it reads.
        self.evaluated_at = {c.name: PHASES[max((PHASES.index(q.phase) for q in c.reads() if q.phase is not None), default=0)] for c in self.couplings}
        # Members' parameters in memory this process maps: read and written in place, never sent.
        # Couplings reading them are evaluated before the release ("early"), as members change them then.
        self.mapped: dict[Quantity, torch.Tensor] = {}
        self.mapped_by_member: dict[str, list[Quantity]] = {}
        self.reads_mapped: set[str] = set()
        self.early_metrics: dict[tuple[str, int], dict[str, float]] = {}  # (kind, step) -> metrics

    def attach(self, member: str, views: dict[str, torch.Tensor]) -> None:
        """``member``'s parameters ``views`` (name -> tensor) live in memory this process maps."""
        for q in self.mapped_by_member.pop(member, []):
            del self.mapped[q]
        quantities = {Quantity(member, "param", name): view for name, view in views.items()}
        self.mapped.update(quantities)
        self.mapped_by_member[member] = list(quantities)
        self.reads_mapped = {c.name for c in self.couplings if any(q in self.mapped for q in c.reads())}

    def complete_round(self, kind: str, step: int, values: dict[str, Values]) -> tuple[Reply, dict[Quantity, torch.Tensor]]:
        """Merge one sync round: (the reply every member receives, the rewrites already written into
        members' mapped parameters, which need no sending). The round's coupling metrics are
        :meth:`coupling_metrics`, computed after the members are released, except for couplings
        reading mapped parameters: those are computed here, before the members change them."""
        merged: Values = {}
        for member_values in values.values():
            merged.update(member_values)
        self.observe(merged)
        if kind == "param":
            for member in values:
                for q in self.mapped_by_member.get(member, ()):
                    self.latest[q] = self.mapped[q]
        # Derived from the step, not counted, so a resumed or restarted run needs no coordinator state.
        index = step // self.run.exchange.every
        final = kind == "param" and step == self.run.steps
        replace: Values = {}
        into_mapped: dict[Quantity, torch.Tensor] = {}
        for coupling, rewrite in self.rewrites:
            if rewrite.kind != kind or not rewrite.due(index, final):
                continue
            out = {q: self.mapped[q] for q in rewrite.quantities if q in self.mapped and self.touched_by[q] == {coupling.name}} if rewrite.in_place else {}
            for q, tensor in coupling.rewrite(kind, step, self.latest, out).items():
                if q in self.mapped:
                    into_mapped[q] = tensor
                else:
                    replace[q] = as_numpy(tensor)
        # Metrics of couplings reading mapped parameters: now, before these are overwritten below
        # (rewrites not computed in place) or changed by the members once released. A rewrite
        # computed in place took what its own metrics need of the values before it wrote them.
        early = self.coupling_metrics(kind, step, early=True) if self.reads_mapped else {}
        if early:
            self.early_metrics[(kind, step)] = early
        with torch.no_grad():
            for q, tensor in into_mapped.items():
                if tensor is not self.mapped[q]:  # else the coupling computed it in place
                    self.mapped[q].copy_(tensor)
        # Send back only what some member reads of its peers (averaged sources, say, go nowhere).
        wanted = {q: a for q, a in merged.items() if q in self.plan.received}
        return Reply(wanted, replace), {q: self.mapped[q] for q in into_mapped}

    def observe(self, values: Values) -> None:
        """Keep each value as the latest. Arrays from Ray are read-only views of its shared memory,
        which nobody can change: they are kept as they are (zero-copy). A writable array (a caller
        in the same process) may change under us, so it is copied."""
        # torch warns that it cannot protect read-only memory; nothing here writes to it. One
        # filter for the whole round: one per value took 6 ms of a thousand members' round.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for q, array in values.items():
                self.latest[q] = torch.from_numpy(np.array(array, copy=True) if array.flags.writeable else array)

    def coupling_metrics(self, kind: str, step: int, early: bool = False) -> dict[str, float]:
        """Every coupling evaluated at ``kind`` on the latest population values (on logged steps).
        Couplings reading mapped parameters are evaluated by :meth:`complete_round` (``early``),
        before the members change those; their values are taken from there."""
        metrics = {} if early else self.early_metrics.pop((kind, step), {})
        if step % self.run.tracking.log_every:
            return metrics
        for coupling in self.couplings:
            if (coupling.name in self.reads_mapped) != early:
                continue
            if self.evaluated_at[coupling.name] != kind or any(q not in self.latest for q in coupling.reads()):
                continue
            with torch.no_grad():
                value = coupling.value(self.latest)
                if value is not None:
                    metrics[f"coupling/{coupling.name}"] = float(value)
                for key, extra in coupling.metrics(step, self.latest).items():
                    metrics[f"coupling/{coupling.name}/{key}"] = float(extra)
        return metrics


class MetricRecorder:
    """Coupling metrics for the parent run, in an outbox the driver empties. At the last exchange
    step before a checkpoint step, what the outbox has not seen written is saved beside the
    members' checkpoints: every round of that step completes before the last member can write its
    checkpoint (it exchanges there first), so a complete checkpoint at step c always has the
    coupling metrics of the steps before c, and a resumed run writes them."""

    def __init__(self, run: RunConfig, run_dir: str | Path | None):
        from poptrain.storage.checkpoint import load_coordinator_metrics

        # checkpoint.every is None only before RunConfig's validation fills in its default; 0: checkpoints off.
        self.every, self.checkpoint_every = run.exchange.every, run.checkpoint.every or 0
        self.run_dir = Path(run_dir) if run_dir is not None and self.checkpoint_every else None
        self.outbox = MetricsOutbox(load_coordinator_metrics(self.run_dir) if self.run_dir is not None else [])

    def saves_at(self, step: int) -> bool:
        """Whether the outbox is saved at exchange step ``step`` (the last before a checkpoint step)."""
        return self.run_dir is not None and (step + self.every) % self.checkpoint_every == 0

    def record(self, step: int, metrics: dict[str, float], checkpoint: bool = True) -> None:
        """``checkpoint``: ``step`` is an exchange step, at which the outbox may be due for saving."""
        if metrics:
            self.outbox.add([(k, v, step, int(time.time() * 1000)) for k, v in metrics.items()])
        if checkpoint and self.run_dir is not None and self.saves_at(step):
            from poptrain.storage.checkpoint import coordinator_metrics_path, save_atomic

            save_atomic(self.outbox.unwritten(), coordinator_metrics_path(self.run_dir))


class CouplingStates:
    """The state couplings keep between rounds (:meth:`Coupling.state_dict`: DiLoCo's global weights
    and outer momentum), saved beside the members' checkpoints. After the last parameter round
    before a checkpoint step c the couplings' state is saved for c: that round completes before the
    last member can write its checkpoint at c (it exchanges there first), so a complete checkpoint
    always has its couplings' state. A resumed run's coordinator starts from the state saved for the
    step it continues from (:func:`poptrain.driver.population.resume` refuses a run that lacks it)."""

    def __init__(self, run: RunConfig, couplings: list, run_dir: str | Path | None):
        from poptrain.storage.checkpoint import latest_complete_step, load_coupling_state

        self.keeping = [c for c in couplings if c.state_dict() is not None]
        # checkpoint.every is None only before RunConfig's validation fills in its default; 0: checkpoints off.
        self.checkpoint_every = run.checkpoint.every or 0
        self.run_dir = Path(run_dir) if run_dir is not None and self.checkpoint_every and self.keeping else None
        self.run = run
        if self.run_dir is not None:
            resumed_from = latest_complete_step(self.run_dir, run.member_names)
            if resumed_from:
                states = load_coupling_state(self.run_dir, resumed_from, [c.name for c in self.keeping])
                for coupling in self.keeping:
                    coupling.load_state_dict(states[coupling.name])

    def after_param_round(self, step: int) -> None:
        if self.run_dir is None:
            return
        from poptrain.storage.checkpoint import save_coupling_state

        every, last = self.checkpoint_every, min(step + self.run.exchange.every, self.run.steps - 1)
        for checkpoint_step in range((step // every + 1) * every, last + 1, every):  # the next param round is after it
            save_coupling_state(self.run_dir, checkpoint_step, {c.name: c.state_dict() for c in self.keeping}, self.run.checkpoint.keep + 1)


class Coordinator:
    """The coordinator's logic: thread-safe, without Ray. ``pack`` turns a :class:`Reply` into
    what callers receive (the actor packs it for the wire; in one process it can stay as it is)."""

    def __init__(self, run: RunConfig, population: PopulationInfo, run_dir: str | None = None, pack: Callable[[Reply], Any] = lambda r: r):
        self.run, self.pack = run, pack
        self.evaluator = CouplingEvaluator(run, population)
        self.plan = self.evaluator.plan
        self.barrier = Barrier(self.plan.participants)
        self.stand_ins = StandIns(run.failure.while_restarting == "continue", run.checkpoint.every or 0)
        self.history = ReplayHistory(2 * run.checkpoint.every + run.exchange.every if run.checkpoint.every else 0)
        self.board = AsyncBoard(self.plan.participants, run.exchange.max_staleness, run.exchange.every)
        self.recorder = MetricRecorder(run, run_dir)
        self.states = CouplingStates(run, self.evaluator.couplings, run_dir)
        self.evaluations = EvalBoard(run)
        self.pbt = PBTRounds(run, run_dir)
        self.timeout_s = run.exchange.timeout_s
        self.aborted: str | None = None  # why the run stopped (see abort)
        self.lock = threading.Condition()  # guards everything above; async publishes wait on it
        self.recording = ThreadPoolExecutor(1, thread_name_prefix=RECORDING_THREAD)  # see _record_round
        self.recording_done: Future | None = None  # the latest round's metrics being recorded
        self.recording_pending = False  # whether they are yet to be (guarded by the lock)
        self.recording_error: BaseException | None = None  # why they failed

    def attach(self, member: str, views: dict[str, torch.Tensor]) -> None:
        with self.lock:
            self.evaluator.attach(member, views)

    def exchange(self, kind: str, step: int, members: Sequence[str], values: Values) -> Any:
        """``sync`` mode: the values of round (kind, step) of ``members`` (one host's: one message
        for them all); returns the round's reply once every participant has sent its values (at
        most ``exchange.timeout_s`` later)."""
        mine = _by_member(members, values)
        with self.lock:
            self._raise_if_aborted()
            for member in members:
                self.stand_ins.note(kind, step, member, mine[member])
            replay = self.history.get(kind, step)
            if replay is not None:  # a restarted host replaying a round its peers have finished
                for member in members:
                    self.stand_ins.replayed(member, step)
                return replay
            for member in members:
                self.stand_ins.caught_up(member)
                rnd = self.barrier.arrive(kind, step, member, mine[member])
            completed = self._complete_if_ready(kind, step, rnd)
            if completed:
                self._record_round(kind, step)
        if not completed and not rnd.done.wait(self.timeout_s):
            with self.lock:
                self._raise_if_aborted()
                if not rnd.done.is_set():  # else it completed while this thread waited for the lock
                    raise ExchangeTimeout(
                        f"exchange of {kind!r} at step {step}: {_naming(members)} waited {self.timeout_s:g} s for "
                        f"{rnd.missing()} (exchange.timeout_s). A peer is stalled or dead; see its log."
                    )
        if rnd.result is None:  # released by abort(), not by the round's completion
            self._raise_if_aborted()
        return rnd.result

    def _record_round(self, kind: str, step: int) -> None:
        """Round (kind, step)'s coupling metrics into the parent run's outbox; the caller holds the
        lock and the round has just released its members. Computed on a thread of their own
        (:attr:`recording`) once this thread lets the lock go, so the host that completed the round
        has its reply as soon as its peers: all pairs of a thousand members' separation take about
        11 ms. Nothing changes what they read meanwhile: the next round completes (and changes the
        values and the couplings' state) only after them (:meth:`_await_recording`), and fails with
        their error. At the exchange before a checkpoint step, here, before the reply: the metrics
        saved beside the checkpoints must hold them (:class:`MetricRecorder`)."""
        if self.recorder.saves_at(step):
            self._log_round(kind, step)
            return

        def record() -> None:
            with self.lock:
                try:
                    self._log_round(kind, step)
                except BaseException as exc:
                    self.recording_error = exc
                    raise
                finally:
                    self.recording_pending = False
                    self.lock.notify_all()

        self.recording_pending = True
        self.recording_done = self.recording.submit(record)

    def _log_round(self, kind: str, step: int) -> None:
        """Round (kind, step)'s coupling metrics into the parent run's outbox, now (the caller holds the lock)."""
        self.recorder.record(step, self.evaluator.coupling_metrics(kind, step))

    def _await_recording(self) -> None:
        """With the lock held: until the last round's metrics are recorded (the lock is let go
        meanwhile); their error, if they failed."""
        self.lock.wait_for(lambda: not self.recording_pending)
        if self.recording_error is not None:
            raise self.recording_error

    def wait_for_recording(self) -> None:
        """Without the lock: until the rounds' metrics on their way into the outbox are in it. Their
        error is not raised here: the members' next exchange raises it, and the run fails there."""
        if self.recording_done is not None:
            wait([self.recording_done])

    def close(self) -> None:
        """After the run: the last round's metrics recorded, and the thread that records them ended."""
        self.recording.shutdown(wait=True)

    def abort(self, reason: str) -> None:
        """The run is stopping (a member failed): every member waiting here, or arriving later,
        raises instead of waiting out ``exchange.timeout_s`` for a peer that will not come."""
        with self.lock:
            self.aborted = reason
            for rnd in self.barrier.rounds.values():
                rnd.done.set()
            self.lock.notify_all()

    def _raise_if_aborted(self) -> None:
        if self.aborted is not None:
            raise ExchangeTimeout(f"the exchange was stopped: {self.aborted}")

    def _complete_if_ready(self, kind: str, step: int, rnd: Round) -> bool:
        """Complete ``rnd`` once every participant (or its stand-in) has sent its values; release the
        waiting members. Whether it completed. The caller holds the lock and records the metrics."""
        self._await_recording()  # the last round's metrics read the values and couplings as that round left them
        if rnd.done.is_set():  # completed by another thread while this one waited (a stand-in's)
            return False
        values = self.stand_ins.fill(kind, rnd)
        if values is None:
            return False
        reply, written = self.evaluator.complete_round(kind, step, values)
        if kind == "param":
            self.states.after_param_round(step)
        packed = self.pack(reply)
        replay = packed
        if self.history.steps and written:
            # A member replaying this round from its checkpoint needs the values written in place,
            # as they are now: a copy goes into the history.
            copies = {q: np.array(as_numpy(t), copy=True) for q, t in written.items()}
            replay = self.pack(Reply(reply.values, {**reply.replace, **copies}))
        self.barrier.close(kind, step, packed)
        self.history.remember(kind, step, replay, list(self.stand_ins.pinned.values()))
        return True

    def publish(self, kind: str, step: int, members: Sequence[str], values: Values, used_at: int | None = None) -> Any:
        """``async`` mode: record the values of ``members`` (one host's) and return the freshest
        values of their peers, waiting only while a peer's newest values are more than
        ``max_staleness`` exchanges older than ``used_at``, the step at which the members will use
        the reply (default ``step``)."""
        mine = _by_member(members, values)
        with self.lock:
            for member in members:
                if self.board.post(kind, step, member, mine[member]):
                    self.evaluator.observe(mine[member])
            self.lock.notify_all()
            used_at = step if used_at is None else used_at
            behind = lambda: {p: s for m in members for p, s in self.board.behind(kind, m, used_at).items() if p not in members}  # noqa: E731
            if not self.lock.wait_for(lambda: self.aborted or not behind(), self.timeout_s):
                raise ExchangeTimeout(
                    f"async exchange of {kind!r} at step {step}: {_naming(members)} waited {self.timeout_s:g} s for peers "
                    f"more than {self.run.exchange.max_staleness} exchange(s) behind, at steps {behind()} "
                    "(exchange.timeout_s)"
                )
            self._raise_if_aborted()
            if self.board.to_log(kind, step):
                self._log_round(kind, step)
            reply = self.board.peers(kind, members)
        return self.pack(reply)

    def member_down(self, member: str) -> None:
        """The driver saw ``member``'s process die (``failure.while_restarting: continue``): complete
        the rounds waiting for it with its most recent values, and keep every round it will replay."""
        with self.lock:
            self.stand_ins.down(member)
            for (kind, step), rnd in list(self.barrier.rounds.items()):
                if self._complete_if_ready(kind, step, rnd):
                    self._log_round(kind, step)

    def report_evals(self, step: int, reports: list[tuple[str, dict[str, float], np.ndarray | None, np.ndarray | None]]) -> None:
        """Held-out evaluations after ``step`` steps of one host's members, (member, metrics, outputs,
        targets) each (see :class:`EvalBoard`); outputs and targets only for the ensemble. The
        population's maths runs outside the lock that every exchange needs."""
        with self.lock:
            complete = [self.evaluations.arrive(step, *report) for report in reports]
        for reports in complete:
            if reports is not None:
                self._summarize(step, reports)

    def _summarize(self, step: int, reports) -> None:
        """The population's summary of ``step``'s evaluations, once every member has reported."""
        summary, best = self.evaluations.summarize(reports)
        with self.lock:
            self.evaluations.note_best(step, best)
            self.recorder.record(step, summary, checkpoint=False)

    def pbt_round(self, step: int, arrivals: list[tuple[str, float | None, dict[str, float], Any]]) -> list[dict | None]:
        """Population-based training's round at ``step`` (see :class:`PBTRounds`) for one host's
        members, ``arrivals`` of (member, score, hyperparameters, state reference): waits until
        every member in the schedule has arrived (at most ``exchange.timeout_s``); each member's
        exploit (donor, its state reference, new hyperparameters, what decided it), or None."""
        with self.lock:
            self._raise_if_aborted()
            decided = [self.pbt.arrive(step, *arrival) for arrival in arrivals][-1]
            self.lock.notify_all()
            if not decided:
                if not self.lock.wait_for(lambda: step in self.pbt.decided or self.aborted, self.timeout_s):
                    missing = [m for m in self.pbt.members if m not in self.pbt.arrived.get(step, {})]
                    raise ExchangeTimeout(
                        f"population-based training at step {step}: {_naming([a[0] for a in arrivals])} "
                        f"waited {self.timeout_s:g} s for {missing} (exchange.timeout_s)"
                    )
                self._raise_if_aborted()
            return [self.pbt.decision(step, arrival[0]) for arrival in arrivals]

    def pbt_events(self) -> list[dict]:
        with self.lock:
            return list(self.pbt.events)

    def best_member(self) -> tuple[str, float] | None:
        """The best member by the ranking metric at the newest evaluated step, and its value."""
        with self.lock:
            best = self.evaluations.best
        return None if best is None else (best[1], best[2])

    def take_metrics(self, written: bool, resend: bool = False) -> list[Item]:
        """The coupling and population metrics since the last call (see :class:`MetricsOutbox`)."""
        self.wait_for_recording()
        with self.lock:
            return self.recorder.outbox.take(written, resend)


def _by_member(members: Sequence[str], values: Values) -> dict[str, Values]:
    """One host's values split by the member each belongs to (every one of ``members`` listed)."""
    out: dict[str, Values] = {m: {} for m in members}
    for q, array in values.items():
        out[q.member][q] = array
    return out


def _naming(members: Sequence[str]) -> str:
    return f"member {members[0]!r}" if len(members) == 1 else f"members {list(members)}"
