"""``poptrain compare RUN_ID``: what differs between the members of a population, as a terminal table.

The same comparison as ticking the member runs in the MLflow UI and pressing *Compare*: one
column per member, one row per param that differs between members (every param with
``--all``), then the final values of the key metrics (held-out ``eval/*`` first, then ``loss``,
``objective``, ``term/*``, ``coupling/*``). With ``--all``, where each member ran too (its
``poptrain.placement.*`` tags, as rows ``placement.<key>``). Under it, the population's own
values from the parent run: the ensemble's ``ensemble/*``, the average model's
``population_average/*``, the best member's ``best/*`` and the
spread ``eval/<label>/min|median|max``; the best member (tag ``poptrain.best_member``) is marked.
"""

from __future__ import annotations

import math
from typing import Any

# Params that differ between members for reasons other than their config (where they ran: runs
# logged before placement became tags), and the member's own name (already the column header):
# shown only with ``all_params``.
INCIDENTAL = ("member", "placement.")
PLACEMENT_TAG = "poptrain.placement."
KEY_METRICS = ("loss", "objective")
KEY_METRIC_PREFIXES = ("eval/", "term/", "coupling/")
POPULATION_PREFIXES = ("ensemble/", "population_average/", "best/")  # the parent's own values, with eval/<label>/<statistic>
BEST_MEMBER_TAG = "poptrain.best_member"
BEST_BY_TAG = "poptrain.best_by"  # the metric it is best by, e.g. eval/accuracy


class NotAPopulation(ValueError):
    """The run id is unknown, or names a run that is not a poptrain population."""


def population_runs(client, parent_run_id: str):
    """``(parent, {member name: run})`` of a population, members in the population's order.

    Raises :class:`NotAPopulation` with a message naming what the id is instead.
    """
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as exc:
        raise NotAPopulation(f"no MLflow run {parent_run_id!r} at {client.tracking_uri} ({exc.error_code})") from None
    tags = parent.data.tags
    role = tags.get("poptrain.role")
    if role == "member":
        raise NotAPopulation(
            f"run {parent_run_id} is member {tags.get('poptrain.member')!r} of a population; pass its population's run id {tags.get('mlflow.parentRunId')}"
        )
    if role != "population":
        raise NotAPopulation(f"run {parent_run_id} ({parent.info.run_name!r}) is not a poptrain population (no tag poptrain.role=population)")
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000)
    members = {run.data.tags.get("poptrain.member", run.info.run_name): run for run in children}
    order = [m for m in tags.get("poptrain.members", "").split(",") if m in members]
    return parent, {name: members[name] for name in order + sorted(set(members) - set(order))}


def is_key_metric(key: str) -> bool:
    return key in KEY_METRICS or key.startswith(KEY_METRIC_PREFIXES)


def metric_order(key: str) -> tuple[int, str]:
    """Held-out metrics first (which member is best), then loss and objective, then the rest."""
    return (0 if key.startswith("eval/") else 1 if key in KEY_METRICS else 2, key)


def population_rows(parent) -> list[tuple[str, float]]:
    """``(key, value)`` of the parent run's population metrics: ``ensemble/*``, ``best/*`` and
    ``eval/<label>/<statistic>`` (min, median, max over members), their last values."""
    metrics = parent.data.metrics
    keys = [k for k in metrics if k.startswith(POPULATION_PREFIXES) or (k.startswith("eval/") and k.count("/") == 2)]
    return [(key, metrics[key]) for key in sorted(keys, key=lambda k: (not k.startswith("best/"), not k.startswith("ensemble/"), k))]


def compare_table(client, parent_run_id: str, all_params: bool = False) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)``: columns ``["kind", "key", <member>...]``; one row per param (kind
    ``param``, string values, None where a member lacks it) that differs between members (every
    param with ``all_params``), then one per key metric (kind ``metric``, its last value or None)."""
    return members_table(population_runs(client, parent_run_id)[1], all_params)


def members_table(members: dict, all_params: bool) -> tuple[list[str], list[list[Any]]]:
    runs = list(members.values())
    rows: list[list[Any]] = []
    params = sorted({k for run in runs for k in run.data.params})
    for key in params:
        values = [run.data.params.get(key) for run in runs]
        if all_params or (len(set(values)) > 1 and not key.startswith(INCIDENTAL)):
            rows.append(["param", key, *values])
    if all_params:  # where each member ran: tags (params in runs logged before, above)
        placement = sorted({k for run in runs for k in run.data.tags if k.startswith(PLACEMENT_TAG)})
        for key in placement:
            rows.append(["placement", key[len("poptrain.") :], *[run.data.tags.get(key) for run in runs]])
    metrics = sorted({k for run in runs for k in run.data.metrics if is_key_metric(k)}, key=metric_order)
    for key in metrics:
        rows.append(["metric", key, *[run.data.metrics.get(key) for run in runs]])
    return ["kind", "key", *members], rows


def _cell(value: Any) -> str:
    if value is None:
        return "[dim]-[/dim]"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, ".4g")
    return str(value)


def ui_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """How to open population run ``run_id`` in the MLflow UI's training view. MLflow 3's UI opens
    on its GenAI view in a fresh browser whatever the experiment's tags say (the switch is kept in
    the browser); ``?workflowType=machine_learning`` opens the training view. A local store needs
    ``mlflow ui`` first."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}   then open http://127.0.0.1:5000/{page}"


def render(columns: list[str], rows: list[list[Any]], title: str | None = None, console=None, best: str | None = None) -> None:
    """Print the table of :func:`compare_table` with rich: params (and placement) first, then
    metrics; the column of member ``best`` is marked."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title)
    table.add_column("param / metric", overflow="fold")
    for member in columns[2:]:
        table.add_column(f"{member} (best)" if member == best else member, justify="right", overflow="fold")
    params = [row for row in rows if row[0] in ("param", "placement")]
    metrics = [row for row in rows if row[0] == "metric"]
    if not params:
        table.add_row("[dim](no param differs between members)[/dim]", *[""] * (len(columns) - 2), end_section=True)
    for index, (_, key, *values) in enumerate(params):
        table.add_row(key, *map(_cell, values), end_section=index == len(params) - 1)
    for _, key, *values in metrics:
        table.add_row(f"[bold]{key}[/bold]", *map(_cell, values))
    console.print(table)


def render_population(parent, console=None) -> None:
    """Print the parent run's population metrics (:func:`population_rows`) and its best member, if any."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows = population_rows(parent)
    best = parent.data.tags.get(BEST_MEMBER_TAG)
    if not rows and not best:
        return
    table = Table(title="population")
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right")
    if best:
        by = parent.data.tags.get(BEST_BY_TAG)
        table.add_row("[bold]best member[/bold]" + (f" (by {by})" if by else ""), best, end_section=bool(rows))
    for key, value in rows:
        table.add_row(key, _cell(value))
    console.print(table)
