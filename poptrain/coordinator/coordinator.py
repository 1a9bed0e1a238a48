"""The coordinator: the exchange barrier, couplings evaluated on the whole population, averaging.

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

Everything here is plain Python, and each concern is a small object a unit test drives without
Ray: :class:`CouplingEvaluator` (the population's values, rewrites, coupling metrics),
:class:`Barrier` (sync rounds), :class:`StandIns` (``failure.while_restarting: continue``),
:class:`ReplayHistory` (rounds a restarted member replays), :class:`AsyncBoard`,
:class:`MetricRecorder` and :class:`CouplingStates` (couplings' state beside the checkpoints). :class:`Coordinator` puts them together under one lock.
:class:`CoordinatorActor` is the thin Ray actor around it: threads, the wire, the channel.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from poptrain.config.schema import RunConfig
from poptrain.couplings import PopulationInfo, Quantity, build_couplings
from poptrain.couplings.base import PHASES
from poptrain.exchange.wire import BY_REFERENCE_BYTES, ExchangePlan, ExchangeTimeout, Reply, Wire, as_numpy, by_reference
from poptrain.tracking.outbox import Item, MetricsOutbox

Values = dict[Quantity, np.ndarray]


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
            for q, tensor in coupling.rewrite_at(kind, step, self.latest, out).items():
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
        for q, array in values.items():
            if array.flags.writeable:
                self.latest[q] = torch.from_numpy(np.array(array, copy=True))
            else:
                with warnings.catch_warnings():  # torch warns that it cannot protect read-only memory; nothing here writes to it
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    self.latest[q] = torch.from_numpy(array)

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
                for key, extra in coupling.metrics_at(step, self.latest).items():
                    metrics[f"coupling/{coupling.name}/{key}"] = float(extra)
        return metrics


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


class EvalBoard:
    """Members' held-out evaluations, step by step: once every evaluated member has reported a step,
    the population's summaries of each metric (``eval/<label>/min|median|max``), the best member's
    value by the ranking metric (``best/eval/<label>``), and the ensemble of members evaluated on
    the same samples (``ensemble/<label>``): the mean of their predicted probabilities for
    classification (logged as log-probabilities, so ``loss`` is the ensemble's cross-entropy), of
    their outputs otherwise."""

    def __init__(self, run: RunConfig):
        from poptrain.components.build import resolve_metrics

        self.evaluation = run.evaluation
        self.expected = [m.name for m in run.members if m.held_out_data() is not None]
        self.metric_fns = resolve_metrics(run.evaluation, None)
        self.reports: dict[int, dict[str, tuple[dict[str, float], np.ndarray, np.ndarray]]] = {}
        self.completed: set[int] = set()
        self.best: tuple[int, str, float] | None = None  # (step, member, value) at the newest complete step

    def arrive(self, step: int, member: str, metrics: dict[str, float], outputs: np.ndarray | None, targets: np.ndarray | None):
        """Record ``member``'s evaluation at ``step``; every member's reports of that step once it is
        complete, else None (a restarted member reporting a step again changes nothing)."""
        if step in self.completed:
            return None
        reports = self.reports.setdefault(step, {})
        reports[member] = (metrics, outputs, targets)
        if len(reports) < len(self.expected):
            return None
        self.completed.add(step)
        return self.reports.pop(step)

    def summarize(self, reports) -> tuple[dict[str, float], tuple[str, float] | None]:
        """The population's metrics of one complete step, and its best member with its value (no
        state changes: computed outside the coordinator's lock)."""
        out: dict[str, float] = {}
        for key in {k for metrics, _, _ in reports.values() for k in metrics}:
            values = sorted(metrics[key] for metrics, _, _ in reports.values() if key in metrics)
            out.update({f"{key}/min": values[0], f"{key}/median": float(np.median(values)), f"{key}/max": values[-1]})
        ranking, best = self.evaluation.ranking, None
        ranked = {m: metrics[f"eval/{ranking.key}"] for m, (metrics, _, _) in reports.items() if f"eval/{ranking.key}" in metrics}
        if ranked:
            # In member order, so that of equal values the first member's wins whatever the arrival order.
            member = (max if ranking.higher else min)([m for m in self.expected if m in ranked], key=ranked.__getitem__)
            out[f"best/eval/{ranking.key}"] = ranked[member]
            best = (member, ranked[member])
        if self.evaluation.ensemble:
            out.update(self._ensemble(reports))
        return out, best

    def note_best(self, step: int, best: tuple[str, float] | None) -> None:
        if best is not None and (self.best is None or step >= self.best[0]):
            self.best = (step, *best)

    def _ensemble(self, reports) -> dict[str, float]:
        """The ensemble of the largest group (two or more) of members whose targets are the same."""
        groups: dict[tuple, list] = {}
        for _, outputs, targets in reports.values():
            if outputs is None:
                continue
            groups.setdefault((targets.dtype.str, targets.shape, targets.tobytes(), outputs.shape), []).append((outputs, targets))
        group = max(groups.values(), key=len, default=[])
        if len(group) < 2:
            return {}
        outputs = torch.stack([torch.from_numpy(np.array(o)) for o, _ in group])
        targets = torch.from_numpy(np.array(group[0][1]))
        classification = not targets.is_floating_point() and outputs.dim() == 3 and outputs.shape[-1] > 1
        if classification:  # the mean of predicted probabilities, as log-probabilities
            mean = outputs.float().softmax(dim=-1).mean(dim=0).clamp_min(1e-12).log()
        else:
            mean = outputs.float().mean(dim=0)
        out = {f"ensemble/{key}": float(fn(mean, targets)) for key, fn in self.metric_fns.items()}
        if classification and any(m.name == "loss" for m in self.evaluation.metrics):
            out["ensemble/loss"] = float(torch.nn.functional.nll_loss(mean, targets.long()))
        out["ensemble/members"] = float(len(group))
        return out


class PBTRounds:
    """Population-based training's rounds: at each ``pbt.every``-th step the members in the schedule
    arrive with their score, hyperparameters and a reference to their state; once all have, the
    round is decided (:func:`poptrain.pbt.exploit_plan`, :func:`poptrain.pbt.policy.explore`) with the
    step's own generator. Decisions are kept: a restarted member replaying a round gets the same one,
    and the donors' states of the rounds it may replay stay referenced here."""

    def __init__(self, run: RunConfig, run_dir: str | None = None):
        from poptrain.pbt.policy import pbt_members, ranking
        from poptrain.storage.checkpoint import latest_complete_step, load_pbt_events

        self.run, self.members = run, pbt_members(run)
        self.metric, self.higher = ranking(run) if run.pbt is not None else ("", True)
        self.arrived: dict[int, dict[str, tuple[float | None, dict[str, float], Any]]] = {}
        self.decided: dict[int, dict[str, dict]] = {}  # step -> receiver -> its exploit
        self.states: dict[int, dict[str, Any]] = {}  # step -> member -> reference to its state (kept for replays)
        rounds_replayed = -(-2 * (run.checkpoint.every or 1) // run.pbt.every) + 1 if run.pbt is not None else 0
        self.keep = max(2, rounds_replayed)
        # The exploits before the checkpoint a resumed run continues from (its rounds are not decided
        # again), and every round's decisions written beside the checkpoints as they are made.
        self.run_dir = run_dir if run.pbt is not None and run.checkpoint.every else None
        self.events: list[dict] = load_pbt_events(run_dir, latest_complete_step(run_dir, run.member_names)) if self.run_dir else []

    def arrive(self, step: int, member: str, score: float | None, hyperparameters: dict[str, float], state: Any) -> bool:
        """Record ``member`` at round ``step``; whether the round is decided (now or before)."""
        if step in self.decided:
            return True
        self.arrived.setdefault(step, {})[member] = (score, hyperparameters, state)
        if len(self.arrived[step]) < len(self.members):
            return False
        self._decide(step, self.arrived.pop(step))
        return True

    def _decide(self, step: int, arrived) -> None:
        from poptrain.pbt.policy import exploit_plan, explore, round_rng, value_problem

        rng = round_rng(self.run, step)
        scores = {m: arrived[m][0] for m in self.members}
        plan = exploit_plan(scores, self.members, self.run.pbt.quantile, self.higher, rng)
        self.decided[step] = {}
        self.states[step] = {m: arrived[m][2] for m in set(plan.values())}
        for receiver, donor in sorted(plan.items(), key=lambda kv: self.members.index(kv[0])):
            member = self.run.member(receiver)
            new, adjusted = explore(arrived[donor][1], self.run.pbt.hyperparameters, rng, partial(value_problem, member))
            event = {
                "step": step,
                "receiver": receiver,
                "donor": donor,
                "metric": self.metric,
                "receiver_score": scores[receiver],
                "donor_score": scores[donor],
                "old_hyperparameters": arrived[receiver][1],
                "new_hyperparameters": new,
            }
            if adjusted:  # on the receiver's run with the exploit (a tag) and as pbt/adjusted
                event["adjusted"] = adjusted
            self.decided[step][receiver] = {**event, "state": self.states[step][donor]}
            self.events.append(event)
        for old in sorted(self.states)[: -self.keep]:
            del self.states[old]
        if self.run_dir is not None:
            from poptrain.storage.checkpoint import pbt_events_path, save_atomic

            save_atomic(json.dumps(self.events, default=str), pbt_events_path(self.run_dir))

    def decision(self, step: int, member: str) -> dict | None:
        """``member``'s exploit at round ``step`` (with the donor's state reference), or None."""
        decided = self.decided[step].get(member)
        if decided is None:
            return None
        if step not in self.states:
            raise RuntimeError(f"member {member!r} replays the population-based-training round at step {step}, whose donor state is no longer kept")
        return decided


class MetricRecorder:
    """Coupling metrics for the parent run, in an outbox the driver empties. At the last exchange
    step before a checkpoint step, what the outbox has not seen written is saved beside the
    members' checkpoints: every round of that step completes before the last member can write its
    checkpoint (it exchanges there first), so a complete checkpoint at step c always has the
    coupling metrics of the steps before c, and a resumed run writes them."""

    def __init__(self, run: RunConfig, run_dir: str | None):
        from poptrain.storage.checkpoint import load_coordinator_metrics

        self.every, self.checkpoint_every = run.exchange.every, run.checkpoint.every
        self.run_dir = run_dir if run.checkpoint.every else None
        self.outbox = MetricsOutbox(load_coordinator_metrics(run_dir) if self.run_dir else [])

    def record(self, step: int, metrics: dict[str, float], checkpoint: bool = True) -> None:
        """``checkpoint``: ``step`` is an exchange step, at which the outbox may be due for saving."""
        if metrics:
            self.outbox.add([(k, v, step, int(time.time() * 1000)) for k, v in metrics.items()])
        if checkpoint and self.run_dir is not None and (step + self.every) % self.checkpoint_every == 0:
            from poptrain.storage.checkpoint import coordinator_metrics_path, save_atomic

            save_atomic(self.outbox.unwritten(), coordinator_metrics_path(self.run_dir))


class CouplingStates:
    """The state couplings keep between rounds (:meth:`Coupling.state_dict`: DiLoCo's global weights
    and outer momentum), saved beside the members' checkpoints. After the last parameter round
    before a checkpoint step c the couplings' state is saved for c: that round completes before the
    last member can write its checkpoint at c (it exchanges there first), so a complete checkpoint
    always has its couplings' state. A resumed run's coordinator starts from the state saved for the
    step it continues from (:func:`poptrain.driver.population.resume` refuses a run that lacks it)."""

    def __init__(self, run: RunConfig, couplings: list, run_dir: str | None):
        from poptrain.storage.checkpoint import latest_complete_step, load_coupling_state

        self.keeping = [c for c in couplings if c.state_dict() is not None]
        self.run_dir = run_dir if run.checkpoint.every and self.keeping else None
        self.run = run
        resumed_from = latest_complete_step(run_dir, run.member_names) if self.run_dir else None
        if resumed_from:
            states = load_coupling_state(run_dir, resumed_from, [c.name for c in self.keeping])
            for coupling in self.keeping:
                coupling.load_state_dict(states[coupling.name])

    def after_param_round(self, step: int) -> None:
        if self.run_dir is None:
            return
        from poptrain.storage.checkpoint import save_coupling_state

        every, last = self.run.checkpoint.every, min(step + self.run.exchange.every, self.run.steps - 1)
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
        self.stand_ins = StandIns(run.failure.while_restarting == "continue", run.checkpoint.every)
        self.history = ReplayHistory(2 * run.checkpoint.every + run.exchange.every if run.checkpoint.every else 0)
        self.board = AsyncBoard(self.plan.participants, run.exchange.max_staleness, run.exchange.every)
        self.recorder = MetricRecorder(run, run_dir)
        self.states = CouplingStates(run, self.evaluator.couplings, run_dir)
        self.evaluations = EvalBoard(run)
        self.pbt = PBTRounds(run, run_dir)
        self.timeout_s = run.exchange.timeout_s
        self.aborted: str | None = None  # why the run stopped (see abort)
        self.lock = threading.Condition()  # guards everything above; async publishes wait on it

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
            with self.lock:  # the peers are on their way already; this host logs the round
                self.recorder.record(step, self.evaluator.coupling_metrics(kind, step))
        elif not rnd.done.wait(self.timeout_s):
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
                self.recorder.record(step, self.evaluator.coupling_metrics(kind, step))
            reply = self.board.peers(kind, members)
        return self.pack(reply)

    def member_down(self, member: str) -> None:
        """The driver saw ``member``'s process die (``failure.while_restarting: continue``): complete
        the rounds waiting for it with its most recent values, and keep every round it will replay."""
        with self.lock:
            self.stand_ins.down(member)
            for (kind, step), rnd in list(self.barrier.rounds.items()):
                if self._complete_if_ready(kind, step, rnd):
                    self.recorder.record(step, self.evaluator.coupling_metrics(kind, step))

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
        with self.lock:
            return self.recorder.outbox.take(written, resend)


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
        self.server = self.coordinator = None
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


def _by_member(members: Sequence[str], values: Values) -> dict[str, Values]:
    """One host's values split by the member each belongs to (every one of ``members`` listed)."""
    out: dict[str, Values] = {m: {} for m in members}
    for q, array in values.items():
        out[q.member][q] = array
    return out


def _naming(members: Sequence[str]) -> str:
    return f"member {members[0]!r}" if len(members) == 1 else f"members {list(members)}"


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
