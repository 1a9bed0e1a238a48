"""The store writers (poptrain.tracking.writers): many runs per request into sqlite leaves the store
exactly as MLflow's own client does, run by run, and fails where the client fails."""

from __future__ import annotations

import math
import sqlite3

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from poptrain.tracking.runs import dataset_input
from poptrain.tracking.writers import ClientWriter, SqliteWriter, writer_for

# What is compared, table by table; run ids are replaced by the runs' names, times by whether they are set, other ids left out.
COMPARED = {
    "runs": "SELECT name, source_type, source_name, entry_point_name, user_id, status, end_time IS NOT NULL, deleted_time, source_version, "
    "lifecycle_stage FROM runs",
    "tags": "SELECT run_uuid, key, value FROM tags",
    "params": "SELECT run_uuid, key, value FROM params",
    "metrics": "SELECT run_uuid, key, value, timestamp, step, is_nan FROM metrics",
    "latest_metrics": "SELECT run_uuid, key, value, timestamp, step, is_nan FROM latest_metrics",
    "datasets": "SELECT name, digest, dataset_source_type, dataset_source, dataset_schema, dataset_profile FROM datasets",
    "inputs": "SELECT d.name, d.digest, i.source_type, i.destination_type, i.destination_id, i.step "
    "FROM inputs i JOIN datasets d ON d.dataset_uuid = i.source_id",
    "input_tags": "SELECT d.name, i.destination_id, t.name, t.value "
    "FROM input_tags t JOIN inputs i ON i.input_uuid = t.input_uuid JOIN datasets d ON d.dataset_uuid = i.source_id",
}


def _store(new_store, tmp_path, name: str) -> tuple[MlflowClient, str, str]:
    uri = new_store(name)
    client = MlflowClient(tracking_uri=uri)
    return client, client.create_experiment("e", artifact_location=str(tmp_path / name)), uri[len("sqlite:///") :]


def _a_population_written_by(writer, experiment_id: str) -> dict[str, str]:
    """What poptrain's Tracking writes, in its order: runs, params, tags (overwritten), metrics in
    passes (steps out of order, NaN and infinities, a point written twice), the end."""
    (parent,) = writer.create_runs(experiment_id, [("pop", {"poptrain.role": "population"})])
    members = writer.create_runs(experiment_id, [(f"m{i}", {"mlflow.parentRunId": parent, "poptrain.member": f"m{i}"}) for i in range(3)])
    writer.log({parent: {"steps": "10", "seed": "0"}}, {})
    writer.log({m: {"lr": str(0.1 * i), "name": f"m{i}"} for i, m in enumerate(members)}, {m: {"poptrain.placement.pid": "1"} for m in members})
    writer.log({}, {members[0]: {"poptrain.placement.pid": "2", "poptrain.restarts": "1"}, parent: {"poptrain.best_member": "m0"}})
    train = {"name": "synthetic", "digest": "abc", "context": "train", "source": "poptrain.builtins:synthetic_regression", "profile": {"rows": 10}}
    held_out = {**train, "digest": "def", "context": "eval"}
    writer.log_inputs({m: [dataset_input(train), dataset_input(held_out)] for m in members})
    other = {**train, "name": "other", "schema": {"x": "float"}}
    writer.log_inputs({members[0]: [dataset_input(train)], members[1]: [dataset_input(other)]})  # a resume: m0's again
    passes = [
        {m: [("loss", 1.0 / (i + 1), 0, 1000), ("loss", 0.5 / (i + 1), 10, 1001), ("objective", 2.0, 0, 1000)] for i, m in enumerate(members)},
        {
            members[0]: [("loss", math.nan, 20, 1002), ("eval/mse", math.inf, 19, 1003), ("loss", 0.5, 10, 1001)],
            members[1]: [("loss", 0.7, 5, 1004), ("objective", -math.inf, 20, 1005)],
            parent: [("population/loss/min", 0.1, 10, 1006)],
        },
        {members[2]: [("loss", 0.3, 10, 1001), ("loss", 0.2, 30, 999)]},
    ]
    for pending in passes:
        writer.log_metrics(pending)
        assert not any(pending.values()), "what was written is taken out of pending"
    writer.end_runs([*members, parent], "FINISHED")
    return {parent: "pop", **{m: f"m{i}" for i, m in enumerate(members)}}


def _rows(path: str, names: dict[str, str]) -> dict[str, list[tuple]]:
    with sqlite3.connect(path) as db:
        return {
            table: sorted(tuple(names.get(v, v) if isinstance(v, str) else v for v in row) for row in db.execute(query)) for table, query in COMPARED.items()
        }


def test_sqlite_stores_get_the_bulk_writer_and_servers_the_client(new_store, tmp_path, mlflow_server):
    client, _, _ = _store(new_store, tmp_path, "a")
    assert isinstance(writer_for(client), SqliteWriter), "a silent fall back to run-by-run writes would cost a thousand members' runs most of the driver"
    assert isinstance(writer_for(MlflowClient(tracking_uri=mlflow_server)), ClientWriter)


def test_the_bulk_writer_leaves_the_store_as_the_client_does_row_for_row(new_store, tmp_path):
    by_client, experiment_a, path_a = _store(new_store, tmp_path, "client")
    by_bulk, experiment_b, path_b = _store(new_store, tmp_path, "bulk")
    names_a = _a_population_written_by(ClientWriter(by_client), experiment_a)
    names_b = _a_population_written_by(writer_for(by_bulk), experiment_b)
    rows_a, rows_b = _rows(path_a, names_a), _rows(path_b, names_b)
    assert rows_a == rows_b
    assert len(rows_b["metrics"]) == 16 and len(rows_b["latest_metrics"]) == 8, "the point written twice is kept once"
    assert len(rows_b["datasets"]) == 3 and len(rows_b["inputs"]) == 7, "one dataset per name and digest; one input per run and dataset"
    # Read back through MLflow itself: its latest values (highest step, then timestamp), NaN and the clamped infinities.
    member0 = by_bulk.get_run(next(r for r, n in names_b.items() if n == "m0"))
    assert math.isnan(member0.data.metrics["loss"]) and member0.data.metrics["eval/mse"] == 1.7976931348623157e308
    assert member0.data.params == {"lr": "0.0", "name": "m0"}
    assert member0.data.tags["poptrain.placement.pid"] == "2" and member0.data.tags["mlflow.runName"] == "m0"
    assert member0.info.status == "FINISHED" and member0.info.artifact_uri.endswith(f"{member0.info.run_id}/artifacts")
    member2 = by_bulk.get_run(next(r for r, n in names_b.items() if n == "m2"))
    assert member2.data.metrics["loss"] == 0.2 and sorted(m.step for m in by_bulk.get_metric_history(member2.info.run_id, "loss")) == [0, 10, 10, 30]
    children = by_bulk.search_runs([experiment_b], filter_string=f"tags.mlflow.parentRunId = '{next(iter(names_b))}'")
    assert sorted(r.info.run_name for r in children) == ["m0", "m1", "m2"]


@pytest.mark.parametrize("kind", ["client", "bulk"])
def test_a_changed_param_and_a_deleted_run_fail_as_mlflow_fails_them_with_nothing_written(new_store, tmp_path, kind):
    client, experiment_id, path = _store(new_store, tmp_path, kind)
    writer = ClientWriter(client) if kind == "client" else writer_for(client)
    first, second = writer.create_runs(experiment_id, [("a", {}), ("b", {})])
    writer.log({first: {"lr": "0.1"}}, {})
    with pytest.raises(MlflowException, match="Changing param values is not allowed"):
        writer.log({first: {"lr": "0.2"}}, {})
    client.delete_run(second)
    pending = {second: [("loss", 1.0, 0, 1000)]}
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        writer.log_metrics(pending)
    assert pending == {second: [("loss", 1.0, 0, 1000)]}, "what was not written stays pending"
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM params").fetchall() == [("0.1",)]
        assert db.execute("SELECT COUNT(*) FROM metrics").fetchone() == (0,)
