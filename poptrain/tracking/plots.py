"""PNG figures of a population run, drawn from what MLflow recorded (matplotlib, Agg backend).

* ``losses.png``: every member's ``loss`` on one chart;
* ``terms_<member>.png``: a member's loss terms, raw (``loss``, ``term/*``) and weighted (times
  ``weight/*``, or ``loss_weight`` for the loss, plus its already weighted ``coupling/*`` and its
  ``objective``);
* ``couplings.png``: each coupling's value ``coupling/<name>`` over steps, with its extras (e.g.
  pairwise distances) and the margin a coupling declares (``Coupling.plotted_margin``: separation's);
* ``coupled_<coupling>.png``: the coupled parameters ``coupling/<name>/<member>/<param>``, one
  line per member. For a separation coupling of two members, a band of width ``margin`` around
  their midpoint: they are apart once both lines are outside it (seed 000's alphas). With more
  members, each line carries a band of ``margin/2`` on each side: a pair is apart when their
  bands do not overlap.
* ``eval.png``: held-out evaluation, one chart per metric: each member's ``eval/<label>``, and from
  the parent run the ensemble's ``ensemble/<label>``, the best member's ``best/eval/<label>`` and
  the population's average model's ``population_average/<label>`` (one point, at the end).

A chart with nothing to draw is skipped. Figures are drawn on matplotlib's Agg canvas directly,
without pyplot: no display, no global backend switched in the caller's process.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from poptrain.tracking.compare import population_runs

Series = tuple[list[int], list[float]]


def _history(client, run_id: str, key: str) -> Series:
    points = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
    by_step = {step: value for step, _, value in points}  # the last write of a step wins
    return list(by_step), list(by_step.values())


def _filename(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _figure(rows: int, cols: int, size: tuple[float, float]):
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Figure, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    written.append(path)


def _coupling_settings(params: dict[str, str]) -> dict[str, dict[str, str]]:
    """Coupling label -> its settings, from the parent's params ``couplings.<i>.<key>``."""
    by_index: dict[str, dict[str, str]] = defaultdict(dict)
    for key, value in params.items():
        parts = key.split(".", 2)
        if len(parts) == 3 and parts[0] == "couplings":
            by_index[parts[1]][parts[2]] = value
    return {_coupling_label(s, i): s for i, s in by_index.items()}


def _coupling_label(setting: dict[str, str], index: str) -> str:
    """A coupling's label: its ``name`` where it has one, else its ``type``, else its index."""
    name = setting.get("name")
    return name if name and name != "None" else setting.get("type", index)


def _margin(setting: dict[str, str]) -> float | None:
    """The band a coupling declares for its figures (``Coupling.plotted_margin``), else None; None
    too where its class cannot be found now (a user's coupling by import path, not importable here)."""
    from poptrain.config.registry import resolve_coupling

    try:
        return resolve_coupling(setting.get("type", "")).plotted_margin(setting)
    except (ImportError, ValueError, TypeError, AttributeError):
        return None


MEMBERS_PLOTTED_ONE_BY_ONE = 8  # beyond, the population's spread instead of a line and a figure per member


def write_plots(client, parent_run_id: str, out_dir: Path, member_names: list[str] | None = None) -> list[Path]:
    """Write the population's figures into ``out_dir``; returns the paths written. ``member_names``:
    the population's members, where the caller knows them; a large population's figures then read
    the parent run only, not its thousand member runs (seconds of the store's time)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    members: dict[str, Any]
    if member_names is not None and len(member_names) > MEMBERS_PLOTTED_ONE_BY_ONE:
        parent, members = client.get_run(parent_run_id), dict.fromkeys(member_names)
    else:
        parent, members = population_runs(client, parent_run_id)
    written: list[Path] = []

    large = len(members) > MEMBERS_PLOTTED_ONE_BY_ONE
    if large:  # the population's spread from the parent run's summaries, not a line (or a figure) per member
        _plot_population(client, parent, out_dir, written, len(members))

    # (a) every member's loss on one chart
    losses = {} if large else {name: _history(client, run.info.run_id, "loss") for name, run in members.items() if "loss" in run.data.metrics}
    if losses:
        fig, axes = _figure(1, 1, (8, 4.5))
        ax = axes[0, 0]
        for name, (steps, values) in losses.items():
            ax.plot(steps, values, label=name)
        ax.set(title=f"{parent.info.run_name}: loss per member", xlabel="step", ylabel="loss")
        ax.legend()
        _save(fig, out_dir / "losses.png", written)

    # (b) per member: its terms raw, and weighted as they enter its objective
    for name, run in ({} if large else members).items():
        keys = run.data.metrics
        if not any(k.startswith(("term/", "coupling/", "weight/")) for k in keys) and float(run.data.params.get("loss_weight", 1.0)) == 1.0:
            continue  # its objective is its loss alone: losses.png has all of it
        raw = {k: _history(client, run.info.run_id, k) for k in sorted(keys) if k == "loss" or k.startswith("term/")}
        if not raw:
            continue
        fig, axes = _figure(1, 2, (12, 4.5))
        left, right = axes[0]
        for key, (steps, values) in raw.items():
            left.plot(steps, values, label=key)
            term = "loss" if key == "loss" else key.split("/", 1)[1]
            if f"weight/{term}" in keys:
                weights = dict(zip(*_history(client, run.info.run_id, f"weight/{term}"), strict=True))
                points = [(s, v * weights[s]) for s, v in zip(steps, values, strict=True) if s in weights]
            else:
                constant = float(run.data.params.get("loss_weight", 1.0)) if term == "loss" else 1.0
                points = [(s, v * constant) for s, v in zip(steps, values, strict=True)]
            if points:
                right.plot(*zip(*points, strict=True), label=f"weighted {key}")
        for key in sorted(k for k in keys if k.startswith("coupling/")):
            right.plot(*_history(client, run.info.run_id, key), label=f"{key} (weighted)")
        if "objective" in keys:
            right.plot(*_history(client, run.info.run_id, "objective"), "k--", label="objective")
        left.set(title=f"{name}: terms, raw", xlabel="step")
        right.set(title=f"{name}: terms as weighted in its objective", xlabel="step")
        left.legend(fontsize="small")
        right.legend(fontsize="small")
        _save(fig, out_dir / f"terms_{_filename(name)}.png", written)

    # (c) each coupling's value, with its extras other than per-member parameters
    metrics = parent.data.metrics
    settings = _coupling_settings(parent.data.params)
    couplings = sorted(k.split("/", 1)[1] for k in metrics if k.count("/") == 1 and k.startswith("coupling/"))
    if couplings:
        fig, axes = _figure(len(couplings), 1, (8, 3.5 * len(couplings)))
        for ax, coupling in zip(axes[:, 0], couplings, strict=True):
            ax.plot(*_history(client, parent.info.run_id, f"coupling/{coupling}"), linewidth=2, label=f"coupling/{coupling}")
            for key in sorted(metrics):
                extra = key[len(f"coupling/{coupling}/") :]
                if key.startswith(f"coupling/{coupling}/") and extra.split("/", 1)[0] not in members:
                    ax.plot(*_history(client, parent.info.run_id, key), linewidth=1, label=extra)
            setting = settings.get(coupling, {})
            if _margin(setting) is not None:
                ax.axhline(_margin(setting), color="grey", linestyle=":", label="margin")
            ax.set(title=f"coupling {coupling}", xlabel="step")
            ax.legend(fontsize="small")
        _save(fig, out_dir / "couplings.png", written)

    # (d) coupled parameters' trajectories: coupling/<name>/<member>/<param>
    for coupling in couplings:
        series: dict[str, dict[str, Series]] = defaultdict(dict)  # param -> member -> series
        for key in sorted(metrics):
            rest = key[len(f"coupling/{coupling}/") :].split("/", 1)
            if key.startswith(f"coupling/{coupling}/") and len(rest) == 2 and rest[0] in members:
                series[rest[1]][rest[0]] = _history(client, parent.info.run_id, key)
        if not series:
            continue
        setting = settings.get(coupling, {})
        margin = _margin(setting)
        fig, axes = _figure(len(series), 1, (8, 4 * len(series)))
        for ax, (param, by_member) in zip(axes[:, 0], series.items(), strict=True):
            for member, (steps, values) in by_member.items():
                (line,) = ax.plot(steps, values, label=member)
                if margin is not None and len(by_member) > 2:  # a band per member: pairs apart when bands do not overlap
                    ax.fill_between(steps, [v - margin / 2 for v in values], [v + margin / 2 for v in values], color=line.get_color(), alpha=0.12)
            if margin is not None and len(by_member) == 2:  # one band around the midpoint: apart once both lines leave it
                (s1, v1), (s2, v2) = by_member.values()
                other = dict(zip(s2, v2, strict=True))
                steps = [s for s in s1 if s in other]
                middle = [(a + other[s]) / 2 for s, a in zip(s1, v1, strict=True) if s in other]
                ax.fill_between(
                    steps,
                    [m - margin / 2 for m in middle],
                    [m + margin / 2 for m in middle],
                    color="grey",
                    alpha=0.2,
                    label=f"margin {margin:g} around the midpoint",
                )
            elif margin is not None:
                ax.plot([], [], color="grey", linewidth=6, alpha=0.3, label=f"bands: each ± margin/2 ({margin / 2:g})")
            ax.set(title=f"coupling {coupling}: {param} per member", xlabel="step", ylabel=param)
            ax.legend(fontsize="small")
        _save(fig, out_dir / f"coupled_{_filename(coupling)}.png", written)

    if not large:  # a large population's held-out spread is in population.png
        _plot_evaluation(client, parent, members, out_dir, written)
    return written


def _plot_population(client, parent, out_dir: Path, written: list[Path], size: int) -> None:
    """``population.png``: per member metric the parent run summarises (``population/<key>/...``
    and ``eval/<key>/...``), the median and the band between the population's min and max."""
    metrics = parent.data.metrics
    summarised = sorted({k.rsplit("/", 1)[0] for k in metrics if k.endswith("/median") and k.startswith(("population/", "eval/"))})
    summarised = [k for k in summarised if k.count("/") == 1][:8]
    if not summarised:
        return
    fig, axes = _figure(len(summarised), 1, (8, 3.2 * len(summarised)))
    for ax, key in zip(axes[:, 0], summarised, strict=True):
        low, mid, high = (dict(zip(*_history(client, parent.info.run_id, f"{key}/{s}"), strict=True)) for s in ("min", "median", "max"))
        steps = sorted(set(low) & set(mid) & set(high))
        ax.fill_between(steps, [low[s] for s in steps], [high[s] for s in steps], alpha=0.25, label="min to max")
        ax.plot(steps, [mid[s] for s in steps], linewidth=2, label="median")
        best = f"best/{key}"
        if best in metrics:
            ax.plot(*_history(client, parent.info.run_id, best), color="grey", linestyle=":", label="best member")
        ax.set(title=f"{parent.info.run_name}: {key.split('/', 1)[1]} over {size} members ({key.split('/', 1)[0]})", xlabel="step")
        ax.legend(fontsize="small")
    _save(fig, out_dir / "population.png", written)


def _eval_labels(parent, members: dict) -> list[str]:
    """The evaluation metrics' labels: members' ``eval/<label>``, the parent's ``ensemble/<label>``."""
    labels = {k.split("/", 1)[1] for run in members.values() for k in run.data.metrics if k.startswith("eval/") and k.count("/") == 1}
    labels |= {k.split("/", 1)[1] for k in parent.data.metrics if k.startswith("ensemble/") and k.count("/") == 1}
    return sorted(labels)


def _plot_evaluation(client, parent, members: dict, out_dir: Path, written: list[Path]) -> None:
    """``eval.png``: per metric, each member's held-out curve, the ensemble's and the best member's,
    and the population's average model at the end."""
    labels = _eval_labels(parent, members)
    if not labels:
        return
    fig, axes = _figure(len(labels), 1, (8, 3.5 * len(labels)))
    best_member = parent.data.tags.get("poptrain.best_member")
    for ax, label in zip(axes[:, 0], labels, strict=True):
        for name, run in members.items():
            if f"eval/{label}" in run.data.metrics:
                ax.plot(*_history(client, run.info.run_id, f"eval/{label}"), marker="o", markersize=3, label=name + (" (best)" if name == best_member else ""))
        if f"ensemble/{label}" in parent.data.metrics:
            ax.plot(*_history(client, parent.info.run_id, f"ensemble/{label}"), "k--", marker="s", markersize=4, linewidth=2, label="ensemble")
        if f"population_average/{label}" in parent.data.metrics:  # the mean model, evaluated once at the end
            ax.plot(*_history(client, parent.info.run_id, f"population_average/{label}"), "r*", markersize=12, label="population average")
        if f"best/eval/{label}" in parent.data.metrics:
            ax.plot(
                *_history(client, parent.info.run_id, f"best/eval/{label}"),
                color="grey",
                linestyle=":",
                marker="^",
                markersize=4,
                linewidth=2,
                label="best member",
            )
        ax.set(title=f"held-out {label}", xlabel="step", ylabel=label)
        ax.legend(fontsize="small")
    _save(fig, out_dir / "eval.png", written)


def write_lineage_plot(events: list[dict], members: list[str], steps: int, out_dir: Path) -> Path:
    """``lineage.png``: one row per member over the steps, an arrow from donor to receiver at each
    exploit of population-based training, and each member's final origin at the right."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = _figure(1, 1, (10, max(2.5, 0.45 * len(members) + 1)))
    ax = axes[0][0]
    row = {m: i for i, m in enumerate(members)}
    for member in members:
        ax.hlines(row[member], 0, steps, color="0.8", linewidth=1)
    origin = {m: m for m in members}
    for event in sorted(events, key=lambda e: e["step"]):
        origin[event["receiver"]] = origin[event["donor"]]
        ax.annotate(
            "",
            xy=(event["step"], row[event["receiver"]]),
            xytext=(event["step"], row[event["donor"]]),
            arrowprops={"arrowstyle": "->", "color": "tab:blue", "alpha": 0.7},
        )
    ax.set_yticks(range(len(members)), [f"{m}  (weights of {origin[m]})" if origin[m] != m else m for m in members])
    ax.set_xlim(0, steps)
    ax.set_xlabel("step")
    ax.set_title("population-based training: who copied whom")
    path = out_dir / "lineage.png"
    written: list[Path] = []
    _save(fig, path, written)
    return path
