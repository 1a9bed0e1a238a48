"""How a population's MLflow writes reach the store: many runs at once.

MLflow's client writes one run per request: ``create_run``, ``log_batch`` and ``set_terminated``
each cost a few milliseconds of the client's and the store's Python whatever they carry, and
every metric in a ``log_batch`` some 65 µs more (an ORM object, a latest-value merge). For a
thousand members that was most of the driver's CPU: about 45 CPU-seconds of a one-minute run on
two cores, taken from the members' hosts.

:class:`ClientWriter` writes through the client, run by run, and works with every store (an
``mlflow server`` over HTTP, a database). :class:`SqliteWriter` writes the same rows for many
runs in one transaction into an sqlite store (poptrain's embedded default), through the store's
own engine and MLflow's own table models, with MLflow's own validation and value sanitising, and
as its ``SqlAlchemyStore`` would: the same runs, tags, params, metrics and latest values, read
back the same by the client, the UI and ``mlflow.search_runs`` (tested row for row against the
client's writes in ``tests/test_tracking_writers.py``). :func:`writer_for` picks one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any, Protocol

from poptrain.tracking.outbox import Item

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch
IN_CLAUSE = 500  # ids per SQL `IN (...)`: under sqlite's bound-parameter limit everywhere


class RunWriter(Protocol):
    """Writes of many runs at once. Each method raises what the store raised, having written
    either all of its request or, where it says so, what it removed from it."""

    def create_runs(self, experiment_id: str, runs: list[tuple[str, dict[str, str]]]) -> list[str]:
        """Runs named ``runs[i][0]`` with tags ``runs[i][1]``, RUNNING from now: their ids, in order."""
        ...

    def log(self, params: dict[str, dict[str, str]], tags: dict[str, dict[str, str]]) -> None:
        """Params (write-once: a changed value is MLflow's error) and tags (set or overwritten), by run id."""
        ...

    def log_inputs(self, inputs: dict[str, list[Any]]) -> None:
        """Datasets (MLflow ``DatasetInput``) as runs' inputs, by run id; one of a name and digest
        the run has already is not added again."""
        ...

    def log_metrics(self, pending: dict[str, list[Item]]) -> None:
        """Metrics ``(key, value, step, timestamp_ms)`` by run id; what is written is removed from
        ``pending``, so that after an error what is left there is what was not."""
        ...

    def end_runs(self, run_ids: list[str], status: str) -> None:
        """End the runs with ``status`` (FINISHED, FAILED, KILLED) and now as their end time."""
        ...


def writer_for(client) -> RunWriter:
    """:class:`SqliteWriter` for a client on an sqlite store, else :class:`ClientWriter`."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = client._tracking_client.store  # the client's own store object: its engine, its sessions
    except (ImportError, AttributeError):
        return ClientWriter(client)
    if isinstance(store, SqlAlchemyStore) and store.engine.dialect.name == "sqlite":
        return SqliteWriter(store)
    return ClientWriter(client)


class ClientWriter:
    """:class:`RunWriter` through ``MlflowClient``: one request per run (and per MLflow limit)."""

    def __init__(self, client):
        self.client = client

    def create_runs(self, experiment_id: str, runs: list[tuple[str, dict[str, str]]]) -> list[str]:
        return [self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id for name, tags in runs]

    def log(self, params: dict[str, dict[str, str]], tags: dict[str, dict[str, str]]) -> None:
        from mlflow.entities import Param, RunTag

        for run_id in {**params, **tags}:
            items = [Param(k, v) for k, v in sorted(params.get(run_id, {}).items())]
            with_tags = [RunTag(k, v) for k, v in sorted(tags.get(run_id, {}).items())]
            for start in range(0, max(1, len(items)), MAX_PARAMS_PER_BATCH):
                chunk = items[start : start + MAX_PARAMS_PER_BATCH]
                if chunk or (with_tags and start == 0):
                    self.client.log_batch(run_id, params=chunk, tags=with_tags if start == 0 else [])

    def log_inputs(self, inputs: dict[str, list[Any]]) -> None:
        for run_id, datasets in inputs.items():
            self.client.log_inputs(run_id, datasets=datasets)

    def log_metrics(self, pending: dict[str, list[Item]]) -> None:
        from mlflow.entities import Metric

        for run_id, items in pending.items():
            while items:
                chunk = items[:MAX_METRICS_PER_BATCH]
                self.client.log_batch(run_id, metrics=[Metric(k, float(v), int(ts), int(step)) for k, v, step, ts in chunk])
                del items[: len(chunk)]

    def end_runs(self, run_ids: list[str], status: str) -> None:
        for run_id in run_ids:
            self.client.set_terminated(run_id, status)


class SqliteWriter:
    """:class:`RunWriter` into an sqlite ``SqlAlchemyStore``: every request one transaction, its
    rows inserted in bulk (the store's ``create_run``, ``log_batch`` and ``update_run_info``, for
    many runs at once). A run that is not active (deleted) fails the request as the store's own
    check does, with nothing written."""

    def __init__(self, store):
        self.store = store

    def create_runs(self, experiment_id: str, runs: list[tuple[str, dict[str, str]]]) -> list[str]:
        from mlflow.entities import RunStatus, SourceType
        from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
        from mlflow.utils.uri import append_to_uri_path
        from mlflow.utils.validation import _validate_tag
        from sqlalchemy import insert

        experiment = self.store.get_experiment(experiment_id)
        self.store._check_experiment_is_active(experiment)
        now = int(time.time() * 1000)
        run_rows, tag_rows, ids = [], [], []
        for name, tags in runs:
            run_id = uuid.uuid4().hex
            ids.append(run_id)
            run_rows.append(
                {
                    "run_uuid": run_id,
                    "name": name,
                    "artifact_uri": append_to_uri_path(experiment.artifact_location, run_id, self.store.ARTIFACTS_FOLDER_NAME),
                    "experiment_id": experiment_id,
                    "source_type": SourceType.to_string(SourceType.UNKNOWN),
                    "source_name": "",
                    "entry_point_name": "",
                    "user_id": tags.get(MLFLOW_USER, "unknown"),  # as MlflowClient.create_run
                    "status": RunStatus.to_string(RunStatus.RUNNING),
                    "start_time": now,
                    "end_time": None,
                    "deleted_time": None,
                    "source_version": "",
                    "lifecycle_stage": "active",
                }
            )
            for key, value in {**tags, MLFLOW_RUN_NAME: name}.items():
                tag = _validate_tag(key, value)
                tag_rows.append({"run_uuid": run_id, "key": tag.key, "value": tag.value})
        with self.store.ManagedSessionMaker(read_only=False) as session:
            session.execute(insert(SqlRun), run_rows)
            session.execute(insert(SqlTag), tag_rows)
        return ids

    def log(self, params: dict[str, dict[str, str]], tags: dict[str, dict[str, str]]) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
        from mlflow.store.tracking.dbmodels.models import SqlParam, SqlRun, SqlTag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
        from mlflow.utils.validation import _validate_param, _validate_tag
        from sqlalchemy import delete, insert, select, tuple_, update

        param_rows = [{"run_uuid": r, "key": p.key, "value": p.value} for r, ps in params.items() for p in (_validate_param(k, v) for k, v in ps.items())]
        tag_rows = [{"run_uuid": r, "key": t.key, "value": t.value} for r, ts in tags.items() for t in (_validate_tag(k, v) for k, v in ts.items())]
        if not param_rows and not tag_rows:
            return
        with self.store.ManagedSessionMaker(read_only=False) as session:
            self._check_active(session, {*params, *tags})
            if param_rows:
                logged = {
                    (row.run_uuid, row.key): row.value
                    for chunk in _chunks(list(params))
                    for row in session.execute(select(SqlParam.run_uuid, SqlParam.key, SqlParam.value).where(SqlParam.run_uuid.in_(chunk)))
                }
                changed = [r for r in param_rows if logged.get((r["run_uuid"], r["key"]), r["value"]) != r["value"]]
                if changed:
                    raise MlflowException(
                        f"Changing param values is not allowed. Params were already logged={changed[:5]} for run ID='{changed[0]['run_uuid']}'.",
                        INVALID_PARAMETER_VALUE,
                    )
                new = [r for r in param_rows if (r["run_uuid"], r["key"]) not in logged]
                if new:
                    session.execute(insert(SqlParam), new)
            if tag_rows:
                for chunk in _chunks(tag_rows):  # overwritten: the old rows go, the new ones come
                    session.execute(delete(SqlTag).where(tuple_(SqlTag.run_uuid, SqlTag.key).in_([(r["run_uuid"], r["key"]) for r in chunk])))
                session.execute(insert(SqlTag), tag_rows)
                for row in tag_rows:  # the run's name is a column too (the store's set_tag)
                    if row["key"] == MLFLOW_RUN_NAME:
                        session.execute(update(SqlRun).where(SqlRun.run_uuid == row["run_uuid"]).values(name=row["value"]))

    def log_inputs(self, inputs: dict[str, list[Any]]) -> None:
        from mlflow.store.tracking.dbmodels.models import SqlDataset, SqlInput, SqlInputTag
        from mlflow.utils.validation import _validate_dataset_inputs
        from sqlalchemy import insert, select

        for datasets in inputs.values():
            _validate_dataset_inputs(datasets)
        if not any(inputs.values()):
            return
        with self.store.ManagedSessionMaker(read_only=False) as session:
            experiment_of = self._check_active(session, inputs)
            wanted = {(experiment_of[r], d.dataset.name, d.dataset.digest): d.dataset for r, ds in inputs.items() for d in ds}
            dataset_uuid = {
                (row.experiment_id, row.name, row.digest): row.dataset_uuid
                for experiment_id in {key[0] for key in wanted}
                for row in session.execute(select(SqlDataset).where(SqlDataset.experiment_id == experiment_id)).scalars()
            }
            new_datasets = []
            for key, dataset in wanted.items():
                if key not in dataset_uuid:
                    dataset_uuid[key] = uuid.uuid4().hex
                    new_datasets.append(
                        {
                            "dataset_uuid": dataset_uuid[key],
                            "experiment_id": key[0],
                            "name": dataset.name,
                            "digest": dataset.digest,
                            "dataset_source_type": dataset.source_type,
                            "dataset_source": dataset.source,
                            "dataset_schema": dataset.schema,
                            "dataset_profile": dataset.profile,
                        }
                    )
            held = {
                (row.source_id, row.destination_id)
                for chunk in _chunks(list(inputs))
                for row in session.execute(
                    select(SqlInput.source_id, SqlInput.destination_id).where(
                        SqlInput.source_type == "DATASET", SqlInput.destination_type == "RUN", SqlInput.destination_id.in_(chunk)
                    )
                )
            }
            input_rows, tag_rows = [], []
            for run_id, datasets in inputs.items():
                for item in datasets:
                    source = dataset_uuid[(experiment_of[run_id], item.dataset.name, item.dataset.digest)]
                    if (source, run_id) in held:  # the run has it (or it came twice in this request): MLflow keeps the first
                        continue
                    held.add((source, run_id))
                    input_uuid = uuid.uuid4().hex
                    edge = {"source_type": "DATASET", "source_id": source, "destination_type": "RUN", "destination_id": run_id}
                    input_rows.append({"input_uuid": input_uuid, **edge})
                    tag_rows += [{"input_uuid": input_uuid, "name": tag.key, "value": tag.value} for tag in item.tags]
            for model, rows in ((SqlDataset, new_datasets), (SqlInput, input_rows), (SqlInputTag, tag_rows)):
                if rows:
                    session.execute(insert(model), rows)

    def log_metrics(self, pending: dict[str, list[Item]]) -> None:
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
        from mlflow.utils.validation import _validate_metric
        from sqlalchemy import and_, bindparam, insert, select, update

        rows: list[dict[str, Any]] = []
        newest: dict[tuple[str, str], dict[str, Any]] = {}  # (run, key) -> the row MLflow keeps as latest
        validated: set[str] = set()  # MLflow's check of a metric, once per key: the values are floats and steps ints here
        for run_id, items in pending.items():
            for key, value, step, timestamp in items:
                if key not in validated:
                    _validate_metric(key, value, timestamp, step)
                    validated.add(key)
                is_nan, sanitized = self.store.sanitize_metric_value(float(value))
                row = {"run_uuid": run_id, "key": key, "value": sanitized, "timestamp": int(timestamp), "step": int(step), "is_nan": is_nan}
                rows.append(row)
                held = newest.get((run_id, key))
                if held is None or _later(row, held):
                    newest[(run_id, key)] = row
        if not rows:
            return
        with self.store.ManagedSessionMaker(read_only=False) as session:
            self._check_active(session, pending)
            # A point MLflow holds already (same key, step, timestamp and value) is not added twice, as its own log_batch.
            session.execute(insert(SqlMetric).prefix_with("OR IGNORE"), rows)
            latest = {
                (row.run_uuid, row.key): {"step": row.step, "timestamp": row.timestamp, "value": row.value}
                for chunk in _chunks(list(pending))
                for row in session.execute(
                    select(SqlLatestMetric.run_uuid, SqlLatestMetric.key, SqlLatestMetric.step, SqlLatestMetric.timestamp, SqlLatestMetric.value).where(
                        SqlLatestMetric.run_uuid.in_(chunk)
                    )
                )
            }
            added = [row for where, row in newest.items() if where not in latest]
            replaced = [row for where, row in newest.items() if where in latest and _later(row, latest[where])]
            if added:
                session.execute(insert(SqlLatestMetric), added)
            if replaced:
                table = SqlLatestMetric.__table__
                session.connection().execute(
                    update(table)
                    .where(and_(table.c.run_uuid == bindparam("b_run"), table.c.key == bindparam("b_key")))
                    .values(value=bindparam("b_value"), timestamp=bindparam("b_timestamp"), step=bindparam("b_step"), is_nan=bindparam("b_is_nan")),
                    [{f"b_{k}": v for k, v in {**row, "run": row["run_uuid"]}.items() if k != "run_uuid"} for row in replaced],
                )
        for items in pending.values():
            items.clear()

    def end_runs(self, run_ids: list[str], status: str) -> None:
        from mlflow.entities import RunStatus
        from mlflow.store.tracking.dbmodels.models import SqlRun
        from sqlalchemy import update

        status = RunStatus.to_string(RunStatus.from_string(status))  # MLflow's error for a status it does not know
        now = int(time.time() * 1000)
        with self.store.ManagedSessionMaker(read_only=False) as session:
            self._check_active(session, run_ids)
            for chunk in _chunks(run_ids):
                session.execute(update(SqlRun).where(SqlRun.run_uuid.in_(chunk)).values(status=status, end_time=now))

    def _check_active(self, session, run_ids: Iterable[str]) -> dict[str, str]:
        """MLflow's error where a run is not active (deleted) or does not exist: nothing is written
        then. Else each run's experiment id, read with its state."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST
        from mlflow.store.tracking.dbmodels.models import SqlRun
        from sqlalchemy import select

        wanted = list(dict.fromkeys(run_ids))
        found = {
            row.run_uuid: row
            for chunk in _chunks(wanted)
            for row in session.execute(select(SqlRun.run_uuid, SqlRun.lifecycle_stage, SqlRun.experiment_id).where(SqlRun.run_uuid.in_(chunk)))
        }
        for run_id in wanted:
            if run_id not in found:
                raise MlflowException(f"Run with id={run_id} not found", RESOURCE_DOES_NOT_EXIST)
            if found[run_id].lifecycle_stage != "active":
                stage = found[run_id].lifecycle_stage
                raise MlflowException(f"The run {run_id} must be in the 'active' state. Current state is {stage}.", INVALID_PARAMETER_VALUE)
        return {run_id: row.experiment_id for run_id, row in found.items()}


def _later(row: dict[str, Any], than: dict[str, Any]) -> bool:
    """MLflow's rule for a run's latest value of a metric: the highest (step, timestamp, value)."""
    return (row["step"], row["timestamp"], row["value"]) > (than["step"], than["timestamp"], than["value"])


def _chunks(items: list, size: int = IN_CLAUSE) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
