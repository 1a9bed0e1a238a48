"""The population's held-out evaluation as the coordinator sees it: each member reports its metrics
(and its predictions, for the ensemble) at an evaluation step; once all have, :class:`EvalBoard`
gives the population's summaries, the best member by the ranking metric and the ensemble's metrics.
The members' own evaluation is :meth:`poptrain.training.member.MemberTrainer.evaluate`; the
population average's is :mod:`poptrain.evaluation.population_average`.
"""

from __future__ import annotations

import numpy as np
import torch

from poptrain.config.schema import RunConfig


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
        self.reports: dict[int, dict[str, tuple[dict[str, float], np.ndarray | None, np.ndarray | None]]] = {}
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
        ranked = {}
        if ranking is not None:
            ranked = {m: metrics[f"eval/{ranking.key}"] for m, (metrics, _, _) in reports.items() if f"eval/{ranking.key}" in metrics}
        if ranking is not None and ranked:
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
