"""Population-based training's rounds on the coordinator: :class:`PBTRounds` gathers each member's
score, hyperparameters and state at every ``pbt.every``-th step and decides the round with
:mod:`poptrain.pbt.policy`, writing its decisions beside the checkpoints so a resumed run does not
decide them again.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from poptrain.config.schema import RunConfig


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
        self.quantile, self.perturbations = (run.pbt.quantile, run.pbt.hyperparameters) if run.pbt is not None else (0.0, {})
        # The exploits before the checkpoint a resumed run continues from (its rounds are not decided
        # again), and every round's decisions written beside the checkpoints as they are made.
        self.run_dir = Path(run_dir) if run_dir is not None and run.pbt is not None and run.checkpoint.every else None
        self.events: list[dict] = load_pbt_events(self.run_dir, latest_complete_step(self.run_dir, run.member_names)) if self.run_dir else []

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
        plan = exploit_plan(scores, self.members, self.quantile, self.higher, rng)
        self.decided[step] = {}
        self.states[step] = {m: arrived[m][2] for m in set(plan.values())}
        for receiver, donor in sorted(plan.items(), key=lambda kv: self.members.index(kv[0])):
            member = self.run.member(receiver)
            new, adjusted = explore(arrived[donor][1], self.perturbations, rng, partial(value_problem, member))
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
