"""Everything MLflow: one parent run per population, one nested run per member, batched writes.

All MLflow writes of a run go through one place, :class:`Tracking`, in the driver process (as
NVIDIA FLARE's server writes for all clients). Members and the coordinator keep their metrics
in a :class:`MetricsOutbox`; the driver takes them every poll and writes every run's at once
(:mod:`poptrain.tracking.writers`: one transaction on an sqlite store, ``MlflowClient.log_batch``
per run elsewhere). One writer means no ``database is locked`` with sqlite, no run per
worker with nothing tying them together, and no extra process (or MLflow import) per run.

Nothing is lost: an outbox drops metrics only once the driver has written everything it took,
and a member's checkpoint holds what its outbox still has, so a restart (or a resume after the
driver died) sends them again. Nothing is logged twice: :class:`Tracking` keeps a high-water
mark per run and metric key and drops what it has seen. Writes happen on a thread of their own;
a failed write is retried with back-off there, its metrics buffered meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poptrain.config.records import flatten
from poptrain.config.schema import RunConfig
from poptrain.tracking.outbox import Item
from poptrain.tracking.writers import writer_for

DEFAULT_TRACKING_DB = "mlflow.db"
# Metric writes: at least this long apart, to batch more per pass; longer where a write pass cost
# more CPU than WRITER_CPU_SHARE of it. Through MLflow's client (a server), a log_batch call costs
# several ms of CPU whatever it holds: one call per run every second would take a core from the
# members at about 75 of them, and a thousand members' pass some 10 s. At most 30 s apart.
WRITE_EVERY_S = 1.0
WRITER_CPU_SHARE = 0.05
MAX_WRITE_EVERY_S = 30.0
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 5000
# The MLflow UI (3.x) opens an experiment on its GenAI overview unless this experiment tag names
# another kind; `custom_model_development` is the training view (runs, charts, models).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
PLACEMENT_TAG = "poptrain.placement."  # + pid, node_id, hostname, device, gpu_ids, torch_threads, ...
DATASET_CONTEXT_TAG = "mlflow.data.context"  # the Dataset column's "train" / "eval" label
MAX_DIGEST_LENGTH = 36  # MLflow's datasets table
EVAL_PREFIX = "eval/"


def write_interval(pass_cpu_s: float) -> float:
    """Seconds from one metric write pass to the next, given the CPU seconds the last one took:
    ``WRITE_EVERY_S``, stretched so that writing takes at most ``WRITER_CPU_SHARE`` of one core
    (it shares the driver's node with members), and at most ``MAX_WRITE_EVERY_S``. A flush or the
    end of the run does not wait for it."""
    return min(MAX_WRITE_EVERY_S, max(WRITE_EVERY_S, pass_cpu_s / WRITER_CPU_SHARE))


# Ray starts its workers (the members' hosts, the coordinator) at this niceness (its default
# `worker_niceness`). The driver's bulk MLflow writing runs at it too: at the driver's own
# niceness (0) it would preempt the hosts outright, where Ray's workers get a 36th of its share.
WORKER_NICENESS = 15


def as_background_work() -> None:
    """Give the calling thread the niceness of Ray's workers, unless it runs nicer already: its
    writes then share the CPU with the members' hosts instead of preempting them. On Linux, where
    a thread's niceness is its own; elsewhere nothing changes."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, thread) < WORKER_NICENESS:
            os.setpriority(os.PRIO_PROCESS, thread, WORKER_NICENESS)
    except OSError:  # not permitted here: it runs as it did
        pass


def use_write_ahead_log(uri: str) -> None:
    """Put an sqlite store (``sqlite:////path``) in SQLite's write-ahead-log mode, once (the mode is
    kept in the file): a commit then syncs one file instead of a journal and the database (MLflow's
    ``log_batch`` commits up to three times, and a thousand members' runs take thousands), and
    readers (``mlflow ui``, ``poptrain compare``) no longer block the writer or wait for it. Left as
    it is when another process holds the file, or it cannot be opened: the store works either way."""
    if not uri.startswith("sqlite:////"):
        return
    import sqlite3

    path = uri[len("sqlite:///") :]
    try:
        connection = sqlite3.connect(path, timeout=1.0)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
        finally:
            connection.close()
    except sqlite3.Error:
        pass


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written."""


def resolve_tracking_uri(cfg: RunConfig, cwd: str | None = None) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Relative sqlite paths are made absolute against the driver's working directory, so that the
    record of a run (``run.json``) names the same store from anywhere.
    """
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_TRACKING_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///") :]
        uri = "sqlite:///" + str(Path(cwd or os.getcwd(), path).resolve())
    elif "://" not in uri:  # a plain folder: MLflow's file store
        uri = str(Path(cwd or os.getcwd(), uri).resolve())
    return uri


def check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before anything starts, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status >= 400:
                raise TrackingUnavailable(f"MLflow server {uri} answered HTTP {response.status} on /health")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TrackingUnavailable(
            f"cannot reach the MLflow tracking server at {uri} ({getattr(exc, 'reason', exc)}). Start it, fix "
            "`tracking.uri` / $MLFLOW_TRACKING_URI, or unset them to use the embedded sqlite store."
        ) from None


@dataclass
class RunIds:
    """The MLflow runs of one population: the parent and one child per member."""

    experiment_id: str
    parent: str
    members: dict[str, str] = field(default_factory=dict)


def member_params(cfg: RunConfig, name: str) -> dict[str, str]:
    """A member's flattened config, plus the settings of the couplings it takes part in, as MLflow params."""
    member = cfg.member(name)
    params = {"member": name, **flatten(member.model_dump(mode="json", exclude={"name"}))}
    for coupling in cfg.couplings:
        members = coupling.members or cfg.member_names
        if name in members:
            trains = coupling.trains if coupling.trains is not None else members
            data = coupling.model_dump(mode="json", exclude={"name", "members", "trains"})
            params.update(flatten(data, f"coupling.{coupling.label}"))
            params[f"coupling.{coupling.label}.trains_me"] = str(name in trains)
    return params


def run_params(cfg: RunConfig) -> dict[str, str]:
    data = cfg.model_dump(mode="json", exclude={"members"})
    params = flatten(data)
    params["members"] = ",".join(cfg.member_names)
    return params


def _as_params(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow keeps them: keys of at most 250 characters, values as strings of at most ``MAX_PARAM_LENGTH``."""
    return {k[:250]: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}


def dataset_input(dataset: dict[str, Any]):
    """One of a member's datasets as an MLflow ``DatasetInput``: what the runs table's Dataset column
    shows (``name (digest)`` and its context, ``train`` or ``eval``).

    ``dataset``: ``name``, ``digest`` (at most 36 characters are kept: MLflow's limit), ``context``,
    ``source`` (where it comes from, e.g. ``poptrain.builtins:digits``), ``profile`` (a dict: rows,
    split, view, ...) and optionally ``schema`` (a dict or a JSON string). The source is recorded
    as MLflow's ``code`` source type, ``{"tags": {"poptrain.source": ...}}``, so that
    ``mlflow.data.get_source`` reads it back."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    schema = dataset.get("schema")
    entity = Dataset(
        name=str(dataset["name"]),
        digest=str(dataset["digest"])[:MAX_DIGEST_LENGTH],
        source_type="code",
        source=json.dumps({"tags": {"poptrain.source": str(dataset.get("source", ""))}}),
        schema=schema if schema is None or isinstance(schema, str) else json.dumps(schema, default=str),
        profile=json.dumps(dataset.get("profile") or {}, default=str),
    )
    return DatasetInput(entity, tags=[InputTag(DATASET_CONTEXT_TAG, str(dataset.get("context", "train")))])


class Tracking:
    """MLflow writes of one population run, from the driver process."""

    def __init__(self, uri: str, ids: RunIds | None = None, artifact_root: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.artifact_root = artifact_root  # where a new experiment's artifacts go; None: the store's default
        use_write_ahead_log(uri)
        self.client = MlflowClient(tracking_uri=uri)
        self.writer = writer_for(self.client)  # runs, params, tags, metrics and ends: many runs a request
        self.ids = ids
        # Metrics are written by a thread of their own, so that a slow or unreachable server (MLflow's
        # HTTP client retries for minutes) never stalls the driver's loop; the buffer, guarded by
        # `_lock`, holds them meanwhile.
        self.buffer: dict[str, list[Item]] = defaultdict(list)
        self._lock = threading.Condition()
        self._writing = False
        self._closed = False
        self._flush_requested = False
        self.last_error: str | None = None
        self._writer = threading.Thread(target=self._write_loop, name="poptrain-mlflow-writer", daemon=True)
        self._writer.start()
        self.progress_state: dict[str, dict[str, Any]] = {}
        # Per run and key: the highest step logged. A member restarted from a checkpoint, or a
        # resumed run, replays steps; their metrics are dropped here, so MLflow never holds a step
        # twice. Per key, not per run: the parent's coupling metrics come from rounds of different
        # groups of members, which need not arrive in step order across keys.
        self.high_water: dict[str, dict[str, int]] = {}
        self.datasets: dict[str, list[dict[str, Any]]] = {}  # member -> what log_datasets logged
        self.logged_inputs: dict[str, set[tuple[str, str]]] = {}  # run -> (name, digest) of the datasets MLflow holds for it (a resume)
        # Population summaries (population/<key>/min|median|max on the parent): members' values of
        # each step's metrics, until every member has logged that step.
        self.step_values: dict[int, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))  # step -> key -> member -> value
        self.newest_step: dict[str, int] = {}  # member -> the newest training step it logged
        # member -> its params, logged with its first placement tags in one request (a thousand
        # members' runs: one write each fewer, while they train)
        self.unlogged_params: dict[str, dict[str, str]] = {}

    # -- creating the runs ------------------------------------------------------------------

    def create_runs(self, cfg: RunConfig) -> RunIds:
        """The population's parent run (its params logged) and a nested run per member (their params
        go with their first tags: :meth:`set_tags_of`)."""
        experiment_id = self._experiment(cfg.tracking.experiment)
        # In the population's order; cut at MLflow's tag length (a very large population's order
        # then falls back to the members' names, see poptrain.tracking.compare.population_runs).
        parent_tags = {"poptrain.role": "population", "poptrain.members": ",".join(cfg.member_names)[:MAX_TAG_LENGTH]}
        (parent,) = self._retry(lambda: self.writer.create_runs(experiment_id, [(cfg.name, parent_tags)]))
        ids = RunIds(experiment_id, parent)
        self._log_params(ids.parent, run_params(cfg))
        tags = {"mlflow.parentRunId": ids.parent, "poptrain.role": "member", "poptrain.population": cfg.name}
        runs = [(name, {**tags, "poptrain.member": name}) for name in cfg.member_names]
        ids.members = dict(zip(cfg.member_names, self._retry(lambda: self.writer.create_runs(experiment_id, runs)), strict=True))
        self.unlogged_params.update((name, member_params(cfg, name)) for name in cfg.member_names)
        self.ids = ids
        return ids

    def _experiment(self, name: str) -> str:
        """The id of experiment ``name``, created when missing, and marked as a training experiment
        (tag ``mlflow.experimentKind=custom_model_development``) so that the MLflow UI opens it on
        its runs rather than on the GenAI overview. A kind already set (by a user, or the UI) is
        left as it is: setting it only when absent never overrides a deliberate choice."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = None if self.artifact_root is None else str(Path(self.artifact_root) / re.sub(r"[^\w.-]", "_", name))
            return self.client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            self._retry(lambda: self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND))
        return experiment.experiment_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        """``params`` on run ``run_id`` (write-once)."""
        self._retry(lambda: self.writer.log({run_id: _as_params(params)}, {}))

    def set_tags(self, member: str | None, tags: dict[str, Any]) -> None:
        """:meth:`set_tags_of` one run: a member's (the parent's for None)."""
        self.set_tags_of({member: tags})

    def set_tags_of(self, tags_by_member: dict[str | None, dict[str, Any]]) -> None:
        """Set (or overwrite) tags on members' runs (the parent's for None), all in one request where
        the store takes one (:mod:`poptrain.tracking.writers`); a member's params not logged yet
        (:meth:`create_runs`) go with them."""
        params = {self._run_id(m): _as_params(self.unlogged_params.pop(m)) for m in tags_by_member if m is not None and m in self.unlogged_params}
        tags = {self._run_id(m): {k: str(v)[:MAX_TAG_LENGTH] for k, v in t.items()} for m, t in tags_by_member.items()}
        self._retry(lambda: self.writer.log(params, tags))

    def log_placement(self, member: str, info: dict[str, Any]) -> None:
        """Where a member's process runs (pid, node_id, hostname, device, gpu_ids, torch_threads,
        shared_params, ...) as tags ``poptrain.placement.<key>``, at every start, restart and resume.

        Tags, not params: these are facts about a process, not settings. Params are write-once
        (a restarted member's new pid could not be recorded), and the Compare page's parallel
        coordinates plot picks params that differ between runs, where pids would crowd out the
        hyperparameters."""
        self.log_placements({member: info})

    def log_placements(self, infos: dict[str, dict[str, Any]]) -> None:
        """:meth:`log_placement` of many members, in one request where the store takes one."""
        self.set_tags_of({member: {f"{PLACEMENT_TAG}{k}": v for k, v in info.items()} for member, info in infos.items()})

    def log_datasets(self, member: str, datasets: list[dict[str, Any]]) -> None:
        """Record a member's training and held-out datasets as its run's inputs (see
        :func:`dataset_input`): the runs table's Dataset column, and the dataset that the metrics
        :meth:`log_model` puts on the member's model were measured on (its ``eval`` one). MLflow
        keeps one input per name and digest: logging them again (a resume) adds nothing."""
        self.log_datasets_of({member: datasets})

    def log_datasets_of(self, datasets_by_member: dict[str, list[dict[str, Any]]]) -> None:
        """:meth:`log_datasets` of many members, in one request where the store takes one."""
        inputs = {}
        for member, datasets in datasets_by_member.items():
            entries = [dataset_input(d) for d in datasets]
            held = self.logged_inputs.get(self._run_id(member), set())
            if entries and not {(i.dataset.name, i.dataset.digest) for i in entries} <= held:  # a resumed run's are there already
                inputs[self._run_id(member)] = entries
            self.datasets[member] = [dict(d) for d in datasets]
        self._retry(lambda: self.writer.log_inputs(inputs))

    # -- metrics (from members and the coordinator) ---------------------------------------------

    def _run_id(self, member: str | None) -> str:
        assert self.ids is not None, "runs not created"
        return self.ids.parent if member is None else self.ids.members[member]

    def _fresh(self, run_id: str, items: list[Item]) -> list[Item]:
        """The items not logged yet (a step above its key's high-water mark), updating the marks."""
        marks = self.high_water.setdefault(run_id, {})
        fresh = []
        for item in items:
            key, step = item[0], item[2]
            if step > marks.get(key, -1):
                marks[key] = step
                fresh.append(item)
        return fresh

    def resume(self, cfg: RunConfig) -> None:
        """Reopen the population's runs and read how far each metric was logged; a member's params
        that its first driver did not log before it ended go with its placement tags.

        A run's latest value of a metric is MLflow's value at its highest step (its store keeps the
        one with the highest (step, timestamp)), so one search of the members' runs, in pages, gives
        every high-water mark: a thousand members' resume reads a few pages instead of a metric
        history per member and key, and reopens (writes) only the runs that are not running."""
        assert self.ids is not None
        runs = {self.ids.parent: self._retry(lambda: self.client.get_run(self.ids.parent))}
        token = None
        while True:
            page = self._retry(
                lambda token=token: self.client.search_runs(
                    [self.ids.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.ids.parent}'", max_results=1000, page_token=token
                )
            )
            runs.update((run.info.run_id, run) for run in page)
            token = page.token
            if not token:
                break
        for run_id in [self.ids.parent, *self.ids.members.values()]:
            run = runs.get(run_id) or self._retry(lambda run_id=run_id: self.client.get_run(run_id))
            if run.info.status != "RUNNING":
                self._retry(lambda run_id=run_id: self.client.update_run(run_id, status="RUNNING"))
            self.high_water[run_id] = {m.key: m.step for m in run.data.to_proto().metrics}
            self.logged_inputs[run_id] = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
        for name, run_id in self.ids.members.items():
            if not (runs.get(run_id) and runs[run_id].data.params):
                self.unlogged_params[name] = member_params(cfg, name)

    def log_member(self, member: str, items: list[Item]) -> None:
        """:meth:`log_members` of one member."""
        self.log_members({member: items})

    def log_members(self, items_by_member: dict[str, list[Item]]) -> None:
        """Buffer members' metrics (written by a later flush); steps already seen are dropped. Each
        step every member has logged is summarised on the parent run (:meth:`_summarise`), once for
        all of them: what a host hands over at once is summarised at once."""
        for member, items in items_by_member.items():
            self._take_member(member, items)
        self._summarise()

    def _take_member(self, member: str, items: list[Item]) -> None:
        items = self._fresh(self._run_id(member), items)
        self._buffer(self._run_id(member), items)
        for key, value, step, _ in items:
            state = self.progress_state.setdefault(member, {})
            if key.startswith(EVAL_PREFIX):  # evaluated after step `step - 1` trained: not progress; summarised by the coordinator
                state[key] = value
                continue
            state["step"] = max(step + 1, state.get("step", 0))
            if key == "loss":
                state["loss"] = value
            self.step_values[step][key][member] = value
            self.newest_step[member] = max(step, self.newest_step.get(member, -1))
        progress = self.progress_state.get(member)
        if progress is not None:
            progress["time"] = time.time()

    def _summarise(self) -> None:
        """``population/<key>/min``, ``/median`` and ``/max`` on the parent run for every step that every
        member has logged past: the population at a glance, without opening a member run. A step some
        member's ``loss`` is missing from (its items were written before a resume) is not summarised."""
        members = self.ids.members if self.ids is not None else {}
        if not members or len(self.newest_step) < len(members):
            return
        done = min(self.newest_step.values())
        now = int(time.time() * 1000)
        for step in sorted(s for s in self.step_values if s <= done):  # a member logs all of a step at once, in step order
            values = self.step_values.pop(step)
            if len(values.get("loss", {})) < len(members):
                continue
            summary = []
            for key, by_member in sorted(values.items()):
                ordered = sorted(by_member.values())
                median = ordered[len(ordered) // 2] if len(ordered) % 2 else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
                summary += [
                    (f"population/{key}/min", ordered[0], step, now),
                    (f"population/{key}/median", median, step, now),
                    (f"population/{key}/max", ordered[-1], step, now),
                ]
            self.log_population(summary)

    def log_population(self, items: list[Item]) -> None:
        items = self._fresh(self._run_id(None), items)
        self._buffer(self._run_id(None), items)
        couplings = self.progress_state.setdefault("__couplings__", {})
        for key, value, _, _ in items:
            if key.startswith("coupling/") and key.count("/") == 1:  # coupling/<name>, not its extras nor ensemble/<label>
                couplings[key.split("/", 1)[1]] = value

    def progress(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.progress_state.items()}

    def _buffer(self, run_id: str, items: list[Item]) -> None:
        if items:
            with self._lock:
                self.buffer[run_id].extend(items)
                self._lock.notify_all()

    def written(self) -> bool:
        """Whether every metric handed to this object is in MLflow."""
        with self._lock:
            return not self._writing and not any(self.buffer.values())

    def _write_loop(self) -> None:
        """The writer thread: every run's buffered metrics in one pass (:meth:`RunWriter.log_metrics`)
        each :func:`write_interval` (about every second, less often where writing costs much CPU: a
        large population through a server); after a failed write, what was not written goes back
        to the buffer and the next try waits longer (0.5 s doubling to 30 s)."""
        as_background_work()
        delay = 0.0
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._closed or any(self.buffer.values()))
                if not any(self.buffer.values()):
                    return  # closed, and everything written
                pending, self.buffer = self.buffer, defaultdict(list)
                self._writing, self._flush_requested = True, False
            failed, pass_started = False, time.thread_time()
            try:
                self.writer.log_metrics(pending)
            except Exception as exc:  # MLflow raises several types for transport and store errors
                failed, self.last_error = True, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            with self._lock:
                for run_id, items in pending.items():  # back in front of anything buffered since
                    if items:
                        self.buffer[run_id][:0] = items
                self._writing = False
                self._lock.notify_all()
            delay = min(max(2 * delay, 0.5), 30.0) if failed else 0.0
            interval = write_interval(time.thread_time() - pass_started)
            with self._lock:  # wait before the next write: the back-off, else the interval, to batch more
                if failed:
                    if self._lock.wait_for(lambda: self._closed, timeout=delay):
                        return  # the run ended without the store coming back: finish() has said so
                else:
                    self._lock.wait_for(lambda: self._closed or self._flush_requested, timeout=interval)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every buffered metric is written; :class:`TrackingUnavailable` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._flush_requested = True
            self._lock.notify_all()
            while self._writing or any(self.buffer.values()):
                left = deadline - time.monotonic()
                if left <= 0 or not self._writer.is_alive():
                    count = sum(len(v) for v in self.buffer.values())
                    raise TrackingUnavailable(f"{count} metrics could not be written to {self.uri} within {timeout_s:g} s (last error: {self.last_error})")
                self._lock.wait(timeout=min(1.0, left))

    def _retry(self, call, attempts: int = 5):
        delay = 0.2
        for attempt in range(attempts):
            try:
                return call()
            except Exception as exc:  # MLflow raises several types for transport and store errors
                if attempt == attempts - 1:
                    raise TrackingUnavailable(f"MLflow write to {self.uri} failed after {attempts} attempts: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- artifacts and the end ------------------------------------------------------------------

    def log_artifact(self, member: str | None, local_path: str, artifact_path: str | None = None) -> None:
        self._retry(lambda: self.client.log_artifact(self._run_id(member), local_path, artifact_path))

    def log_plots(self, out_dir: str) -> list[str]:
        """Write the population's PNG figures under ``out_dir`` and log them to the parent run (``plots/``)."""
        from poptrain.tracking.plots import write_plots

        self.flush()  # the figures read the metric histories back from MLflow
        assert self.ids is not None
        paths = write_plots(self.client, self.ids.parent, Path(out_dir), list(self.ids.members))
        for path in paths:
            self.log_artifact(None, str(path), "plots")
        return [str(p) for p in paths]

    def log_model(self, member: str, state_dict_path: str, model_spec, example, step: int, metrics: dict[str, float] | None = None) -> str:
        """Log a member's final model (``mlflow.pytorch``) into its run, with its held-out metrics
        on the LoggedModel, so that the experiment's models rank by them (the UI's Models tab,
        ``mlflow.search_logged_models(order_by=[{"field_name": "metrics.eval/accuracy", ...}])``).

        ``metrics``: ``{key: value}`` to put on the model; None: the run's latest ``eval/*``
        values; ``{}``: none. Returns the model URI (``models:/<id>``)."""
        from poptrain.tracking.models import log_member_model

        assert self.ids is not None
        info = log_member_model(self.client, self.ids.members[member], state_dict_path, model_spec, example, step=step)
        self.link_model_metrics(member, info.model_id, metrics, step)
        return info.model_uri

    def log_pbt(self, events: list[dict], out_dir: Path, steps: int, plot: bool = True) -> None:
        """Population-based training's exploits: each on its receiver's run (tag
        ``poptrain.pbt.exploit.<step>``: donor, the scores that decided it, old and new
        hyperparameters; the ``pbt/*`` metrics come from the member itself), every member's lineage
        (tag ``poptrain.lineage``: its exploits, newest last; ``poptrain.weights_from``: the member its
        weights descend from), and all of them on the parent (``pbt_events.json``, tag
        ``poptrain.pbt.exploits``) with ``plots/lineage.png`` (``plot``)."""
        assert self.ids is not None
        origin = {m: m for m in self.ids.members}
        for event in sorted(events, key=lambda e: e["step"]):
            origin[event["receiver"]] = origin[event["donor"]]
        lineage: dict[str | None, dict[str, Any]] = {}
        for member in self.ids.members:
            own = [e for e in events if e["receiver"] == member]
            tags = {f"poptrain.pbt.exploit.{e['step']}": json.dumps({k: v for k, v in e.items() if k not in ("step", "receiver")}, default=str) for e in own}
            tags["poptrain.lineage"] = " ".join(f"{e['step']}:{e['donor']}" for e in own) or "-"
            tags["poptrain.weights_from"] = origin[member]
            lineage[member] = tags
        self.set_tags_of(lineage)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "pbt_events.json"
        path.write_text(json.dumps(events, indent=1, default=str))
        self.set_tags(None, {"poptrain.pbt.exploits": len(events)})
        self.log_artifact(None, str(path))
        if plot:
            from poptrain.tracking.plots import write_lineage_plot

            self.log_artifact(None, str(write_lineage_plot(events, list(self.ids.members), steps, out_dir / "plots")), "plots")

    def link_model_metrics(self, member: str, model_id: str, metrics: dict[str, float] | None, step: int) -> None:
        """Put ``metrics`` (None: the run's latest ``eval/*``) on LoggedModel ``model_id``, measured on
        the member's ``eval`` dataset when :meth:`log_datasets` named one.

        A value the run already holds as its latest point is logged again with that point's own
        step and timestamp: MLflow then keeps the run's history as it was (one point per step) and
        only adds the model's link, as its own ``log_model(run_id=...)`` does."""
        from mlflow.entities import Metric

        assert self.ids is not None
        if metrics == {}:
            return
        run_id = self.ids.members[member]
        self.flush()  # the run's eval points, so that they are found below and not logged twice
        if metrics is None:
            metrics = {k: v for k, v in self._retry(lambda: self.client.get_run(run_id)).data.metrics.items() if k.startswith(EVAL_PREFIX)}
        if not metrics:
            return
        dataset = next((d for d in self.datasets.get(member, []) if d.get("context") == "eval"), None)
        on = {} if dataset is None else {"dataset_name": str(dataset["name"]), "dataset_digest": str(dataset["digest"])[:MAX_DIGEST_LENGTH]}
        batch = []
        for key, value in sorted(metrics.items()):
            last = self._last_point(run_id, key)
            timestamp, at = (last.timestamp, last.step) if last is not None and last.value == float(value) else (int(time.time() * 1000), step)
            batch.append(Metric(key, float(value), timestamp, at, model_id=model_id, **on))
        self._retry(lambda: self.client.log_batch(run_id, metrics=batch))

    def _last_point(self, run_id: str, key: str):
        """The run's latest point of metric ``key`` (highest step, last written), or None."""
        history = self._retry(lambda: self.client.get_metric_history(run_id, key))
        return max(history, key=lambda m: (m.step, m.timestamp), default=None)

    def close(self) -> None:
        """Stop the writer thread once the buffer is written (at once if a write fails)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def finish(self, status: str = "FINISHED") -> None:
        """Flush, then end every run of the population with ``status`` (FINISHED, FAILED, KILLED)."""
        try:
            self.flush(timeout_s=120.0)  # a server restarting is waited for
        finally:
            self.close()
            assert self.ids is not None
            unlogged, self.unlogged_params = self.unlogged_params, {}  # members that never started (a failed run): their params all the same
            self._retry(lambda: self.writer.log({self._run_id(m): _as_params(p) for m, p in unlogged.items()}, {}))
            self._retry(lambda: self.writer.end_runs([*self.ids.members.values(), self.ids.parent], status))
