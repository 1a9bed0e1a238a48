"""``poptrain compare RUN_ID``: what differs between the members of a population, as a terminal table.

The same comparison as ticking the member runs in the MLflow UI and pressing *Compare*: one
column per member, one row per param that differs between members (every param with
``--all``), then the final values of the key metrics (``loss``, ``objective``, ``term/*``,
``coupling/*``).
"""

from __future__ import annotations

import math
from typing import Any


# Params that differ between members for reasons other than their config (where they ran), and
# the member's own name (already the column header): shown only with ``all_params``.
INCIDENTAL = ("member", "placement.")
KEY_METRICS = ("loss", "objective")
KEY_METRIC_PREFIXES = ("term/", "coupling/")


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
            f"run {parent_run_id} is member {tags.get('poptrain.member')!r} of a population; "
            f"pass its population's run id {tags.get('mlflow.parentRunId')}"
        )
    if role != "population":
        raise NotAPopulation(f"run {parent_run_id} ({parent.info.run_name!r}) is not a poptrain population (no tag poptrain.role=population)")
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000
    )
    members = {run.data.tags.get("poptrain.member", run.info.run_name): run for run in children}
    order = [m for m in tags.get("poptrain.members", "").split(",") if m in members]
    return parent, {name: members[name] for name in order + sorted(set(members) - set(order))}


def _is_key_metric(key: str) -> bool:
    return key in KEY_METRICS or key.startswith(KEY_METRIC_PREFIXES)


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
    metrics = sorted({k for run in runs for k in run.data.metrics if _is_key_metric(k)}, key=lambda k: (k not in KEY_METRICS, k))
    for key in metrics:
        rows.append(["metric", key, *[run.data.metrics.get(key) for run in runs]])
    return ["kind", "key", *members], rows


def _cell(value: Any) -> str:
    if value is None:
        return "[dim]-[/dim]"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, ".4g")
    return str(value)


def render(columns: list[str], rows: list[list[Any]], title: str | None = None, console=None) -> None:
    """Print the table of :func:`compare_table` with rich: params first, then metrics."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title)
    table.add_column("param / metric", overflow="fold")
    for member in columns[2:]:
        table.add_column(member, justify="right", overflow="fold")
    params = [row for row in rows if row[0] == "param"]
    metrics = [row for row in rows if row[0] == "metric"]
    if not params:
        table.add_row("[dim](no param differs between members)[/dim]", *[""] * (len(columns) - 2), end_section=True)
    for index, (_, key, *values) in enumerate(params):
        table.add_row(key, *map(_cell, values), end_section=index == len(params) - 1)
    for _, key, *values in metrics:
        table.add_row(f"[bold]{key}[/bold]", *map(_cell, values))
    console.print(table)
