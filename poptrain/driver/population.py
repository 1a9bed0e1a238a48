"""The driver: :class:`PopulationRun` places and starts the actors, watches them, restarts dead ones, ends the run.

The driver is not on the per-step path: members exchange with the coordinator directly. The
driver polls progress, notices failures, and is the one writer to MLflow: it takes the metrics
the hosts and the coordinator hold in their outboxes and writes them in batches.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from poptrain.config.errors import ConfigError
from poptrain.config.outputs import HOME_ENV, job_artifact_root, job_home, ray_job
from poptrain.config.records import dump_config
from poptrain.config.schema import RunConfig
from poptrain.couplings import PopulationInfo, build_couplings
from poptrain.driver import pool
from poptrain.driver.checks import prepare
from poptrain.driver.placement import PopulationError, ensure_ray, host_resources, place_population, placement_strategy, plan_hosts
from poptrain.evaluation import population_average
from poptrain.exchange import mapped_memory
from poptrain.storage.checkpoint import (
    CheckpointError,
    discard_after,
    latest_complete_step,
    load_coupling_state,
    read_run_record,
    save_atomic,
    write_run_record,
)
from poptrain.tracking.runs import RunIds, Tracking, TrackingUnavailable, as_background_work

ProgressFn = Callable[[dict[str, Any]], None]
KEEP_WARM_S = 30.0  # how long a finished run's member processes wait for the next run (poptrain.driver.pool)


@dataclass
class RunResult:
    """What :func:`run` (and :func:`resume`) returns, once the run has ended well.

    * ``run_id``: the MLflow parent run (the population); ``member_run_ids``: member name -> its nested run.
    * ``output_dir``: ``<output_dir>/<name>/`` (config, members' ``model.pt``, checkpoints, plots);
      ``tracking_uri``: the MLflow store written to.
    * ``metrics``: member -> its last step's metrics (``loss``, ``objective``, ``coupling/...``, ...).
    * ``placement``: member -> where it ran (node, device, pid, ...); ``restarts``: member -> how many
      times its process was restarted.
    * ``seconds``: the run's wall time in seconds, from its set-up (after the config checks) to its end.
    * ``best_member``: the best member by ``evaluation.rank_by`` at the last evaluation (None without
      held-out data); ``population_average``: ``population_average/<metric>`` -> the held-out metrics
      of the mean of the members' final weights (empty when it was not evaluated).
    """

    run_id: str  # the MLflow parent run
    member_run_ids: dict[str, str]
    output_dir: Path
    tracking_uri: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # member -> its last step's metrics
    placement: dict[str, dict[str, Any]] = field(default_factory=dict)  # member -> node, device, pid
    seconds: float = 0.0
    restarts: dict[str, int] = field(default_factory=dict)  # member -> times its process was restarted
    best_member: str | None = None  # by `evaluation.rank_by` at the last evaluation; None without held-out data
    population_average: dict[str, float] = field(default_factory=dict)  # population_average/<label>: the mean model's held-out metrics


def run(config, overrides=(), progress: ProgressFn | None = None, poll_s: float = 0.5, keep_warm_s: float = KEEP_WARM_S) -> RunResult:
    """Train a population; returns its MLflow run ids, output folder and each member's final metrics.

    ``config`` is a YAML path, a dict or a :class:`RunConfig`; ``overrides`` are ``KEY=VALUE``
    strings. Raises :class:`ConfigError` (nothing started) or :class:`PopulationError`. In a dict,
    wherever a config takes an import path it also takes the object itself (a model class, a
    dataset or a function returning one, a loss, a coupling class, ...): see :mod:`poptrain.config.objects`.

    When Ray was already initialized (this call does not start it), the run's processes outlive a
    run that ends well by up to ``keep_warm_s`` seconds, with their Ray resources, and the next
    run of the same shape takes them over instead of starting new ones (:mod:`poptrain.driver.pool`).
    ``keep_warm_s=0``: new processes, ended with the run. :func:`poptrain.release_warm_members`
    ends warm processes at once.
    """
    cfg, population, uri = prepare(config, overrides)
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    discard_after(run_dir, cfg.member_names, None)  # a new run: no checkpoint of an earlier one may be picked up
    save_atomic(dump_config(cfg), run_dir / "config.yaml")
    return PopulationRun(cfg, population, uri, run_dir, None, keep_warm_s).execute(progress, poll_s)


def resume(run_dir, progress: ProgressFn | None = None, poll_s: float = 0.5, keep_warm_s: float = KEEP_WARM_S, objects=()) -> RunResult:
    """Continue an interrupted run from its latest complete checkpoint, into the same MLflow runs.

    Steps already logged are not logged again; on CPU the final weights are bitwise those of an
    uninterrupted run. Raises :class:`ConfigError` when ``run_dir`` is not a run that can resume.
    ``keep_warm_s`` as for :func:`run`. ``objects``: for a run started with Python objects in place
    of import paths, the same objects (matched by qualified name, refused unless their digest is the
    recorded one); objects importable by their recorded names need not be given.
    """
    run_dir = Path(run_dir).resolve()
    try:
        record = read_run_record(run_dir)
    except CheckpointError as exc:
        raise ConfigError([("", str(exc))]) from None
    cfg, population, _ = prepare(run_dir / "config.yaml", record=True, given=objects)
    uri = record["tracking_uri"]
    ids = RunIds(record["experiment_id"], record["parent"], dict(record["members"]))
    step = latest_complete_step(run_dir, cfg.member_names)
    keeping = [c.name for c in build_couplings(cfg.couplings, population) if c.state_dict() is not None]
    if step is not None and keeping:  # checked here, before anything starts; the coordinator loads it
        try:
            load_coupling_state(run_dir, step, keeping)
        except CheckpointError as exc:
            raise ConfigError([("", str(exc))]) from None
    discard_after(run_dir, cfg.member_names, step)  # newer, incomplete checkpoints would disagree with the peers
    return PopulationRun(cfg, population, uri, run_dir, ids, keep_warm_s).execute(progress, poll_s)


class PopulationRun:
    """One run of a population on Ray: :meth:`start` (placement, coordinator, members, MLflow runs),
    :meth:`watch` (until every member has trained, replacing dead ones), :meth:`restart`,
    :meth:`finish` (final weights, artifacts) and :meth:`teardown` (always). :meth:`execute`
    does them in that order."""

    def __init__(self, cfg: RunConfig, population: PopulationInfo, uri: str, run_dir: Path, resume_ids: RunIds | None, keep_warm_s: float):
        self.cfg, self.population, self.uri, self.run_dir, self.resume_ids = cfg, population, uri, run_dir, resume_ids
        self.keep_warm_s = keep_warm_s
        self.started = time.monotonic()
        self.cwd = os.getcwd()
        # MLflow's import and the opening of its store (seconds on a small machine) overlap Ray's start.
        opener = ThreadPoolExecutor(1, thread_name_prefix="poptrain-tracking-open")
        self.opening = opener.submit(Tracking, uri, resume_ids, job_artifact_root(uri))
        opener.shutdown(wait=False)
        self.started_ray = False
        self.actors: list = []  # every actor this run started or took over, the coordinator first
        self.group = None
        self._tracking: Tracking | None = None  # the MLflow runs, once open (_open_runs): see tracking
        self._collector: _MetricsCollector | None = None  # set at the end of start(): see collector
        self.status = "FAILED"
        self.run_tag = uuid.uuid4().hex  # names this run's coordinator actor and mapped-memory files
        self.to_keep: pool.WarmMembers | None = None
        self.hosts: list[list[str]] = []  # the members each host carries (plan_hosts)
        self.host_actors: list = []
        self.members: dict[str, Any] = {}  # member -> the host actor carrying it
        self.placement: dict[str, dict[str, Any]] = {}
        self.restarts = {name: 0 for name in cfg.member_names}
        self.final: dict[str, dict[str, float]] = {}
        self.describing: Future[None] = Future()  # the members' placement and datasets being written (watch)
        self.describing.set_result(None)
        # Set by start(), in this order: whether processes are kept warm after the run (Ray outlives
        # it), the hosts' placement (_place), the coordinator (_start_coordinator), the MLflow runs
        # (_open_runs) and whether hosts sample system metrics.
        self.keep_warm = False
        self.host_of: dict[str, int] = {}  # member -> the index of the host carrying it
        self.bundles: list[dict[str, float]] = []  # each host's placement bundle
        self.shape: tuple | None = None  # the placement's key in the pool of warm processes
        self.coordinator: Any = None  # its Ray actor handle
        self.ids: RunIds | None = None
        self.system_metrics = False

    @property
    def tracking(self) -> Tracking:
        """The run's MLflow runs, which start() opens (_open_runs)."""
        return _set_by_start(self._tracking, "tracking")

    @property
    def collector(self) -> _MetricsCollector:
        """What empties the actors' outboxes into tracking, which start() sets up last."""
        return _set_by_start(self._collector, "collector")

    @property
    def coordinator_name(self) -> str:
        """The coordinator actor's name: this run's tag, or the warm run's it took over (:meth:`_place`)."""
        return f"poptrain-coordinator-{self.run_tag}"

    def execute(self, progress: ProgressFn | None, poll_s: float) -> RunResult:
        try:
            self.start()
            self.watch(progress, poll_s)
            result = self.finish()
            self.status = "FINISHED"
            return result
        except KeyboardInterrupt:
            self.status = "KILLED"
            raise
        finally:
            self.teardown()

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Place the population (or take over warm processes), start the coordinator and the members,
        and create (or reopen) the MLflow runs while the actors start."""
        import ray

        self.started_ray = ensure_ray()
        # A Ray that ends with the run takes its processes with it: nothing to keep warm then.
        self.keep_warm = self.keep_warm_s > 0 and not self.started_ray
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        warm = self._place(nodes, self.keep_warm)
        self._start_coordinator(warm)
        self.system_metrics = nodes > 1 if self.cfg.tracking.system_metrics == "auto" else self.cfg.tracking.system_metrics
        _warn_about_storage(self.cfg, self.run_dir, self.uri, nodes)
        starting = []
        for index in range(len(self.hosts)):
            if warm is not None:  # a finished run's process of the same bundle carries these members
                self.host_actors.append(warm.actors[index])
                self.actors.append(warm.actors[index])
                starting.append(warm.actors[index].rebind.remote(*self._host_args(index)))
            else:
                self.host_actors.append(self._start_host(index))
                starting.append(self.host_actors[index].info.remote())
        self.members = {name: self.host_actors[self.host_of[name]] for name in self.cfg.member_names}
        self._open_runs()
        _get_all(starting, self._host_names(), who="")
        self.placement = _ask_hosts(self.members, "member_placement")
        self._collector = _MetricsCollector(self.tracking, self.host_actors, self.coordinator)

    def _describe_members(self) -> None:
        """Each member's placement and datasets on its MLflow run, written while the members train
        (a thousand members' worth of requests need not hold their first step back), on a thread
        of its own at the hosts' niceness (:func:`poptrain.tracking.runs.as_background_work`): the
        driver's polling goes on meanwhile, and the hosts are not preempted by it."""
        as_background_work()
        # Tags, not params: process facts would crowd the hyperparameters out of MLflow's comparisons.
        self.tracking.log_placements(self.placement)
        # Again on a resume (MLflow keeps one input per name and digest): the logged models' metrics name the eval data.
        self.tracking.log_datasets_of(_ask_hosts(self.members, "datasets"))

    def _place(self, nodes: int, keep_warm: bool) -> pool.WarmMembers | None:
        """The hosts (:func:`plan_hosts`), one placement bundle each, in a placement group of its own
        or (``keep_warm``) a warm run's of the same shape; the warm processes taken over, if any."""
        import ray

        cluster = ray.cluster_resources()
        self.hosts = plan_hosts(self.cfg, cluster)
        self.host_of = {name: index for index, names in enumerate(self.hosts) for name in names}
        self.bundles = host_resources(self.cfg, self.hosts, cluster)
        strategy = placement_strategy(self.cfg, nodes)
        self.shape = pool.shape_key(self.bundles, strategy)
        if not keep_warm:
            pool.release_warm_members()  # new processes for this run, and no warm ones holding its resources
        warm = _healthy(pool.take(self.shape)) if keep_warm else None
        self.group = warm.group if warm is not None else place_population(self.cfg, self.bundles, strategy)
        if warm is not None:
            # Its placement group's bundles, which it keeps (pool.fits): what a host restarted in one
            # asks for, and the CPUs each host sets its torch threads from.
            self.shape = warm.key
            self.bundles = [dict(bundle) for bundle in warm.key[3]]
            self.run_tag = warm.run_tag  # the warm coordinator's name; this run's mapped-memory files are new ones under it
        return warm

    def _start_coordinator(self, warm: pool.WarmMembers | None) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from poptrain.coordinator.actor import start_coordinator

        # Members look the coordinator up by name (coordinator_name), which stays the same for a warm one (poptrain.driver.pool).
        if warm is not None:
            self.coordinator = warm.coordinator
            # Before the members look it up: a threaded actor would serve their calls beside this one.
            try:
                ray.get(self.coordinator.rebind.remote(self.cfg, self.population, str(self.run_dir)))
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                raise PopulationError(f"the coordinator {describe_failure(exc)}") from None
        else:
            # On the driver's node, next to the writer of its metrics.
            here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
            self.coordinator = start_coordinator(
                self.cfg, self.population, str(self.run_dir), hosts=len(self.hosts), scheduling_strategy=here, name=self.coordinator_name
            )
        self.actors.append(self.coordinator)

    def _open_runs(self) -> None:
        _return_to(self.cwd)
        self._tracking = tracking = self.opening.result()
        try:
            if self.resume_ids is None:
                self.ids = tracking.create_runs(self.cfg)
                record = {"tracking_uri": self.uri, "experiment_id": self.ids.experiment_id, "parent": self.ids.parent, "members": self.ids.members}
                write_run_record(self.run_dir, record)
            else:
                self.ids = self.resume_ids
                tracking.resume(self.cfg)
        except TrackingUnavailable as exc:
            raise PopulationError(f"MLflow tracking failed: {exc}") from None

    def _host_args(self, index: int) -> tuple:
        cpus = self.bundles[index]["CPU"]
        return (self.cfg, self.hosts[index], self.population, self.coordinator_name, cpus, str(self.run_dir), self.system_metrics)

    def _host_names(self) -> list[str]:
        """How each host is named in errors: by its member, or its members."""
        return [_host_label(names) for names in self.hosts]

    def _start_host(self, index: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from poptrain.training.host import MemberHost

        bundle = self.bundles[index]
        actor = (
            ray.remote(MemberHost)
            .options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
                # Never restarted by Ray, which would re-create it with the arguments it was first
                # created with: a warm process (poptrain.driver.pool) would come back as an earlier
                # run's member. The driver replaces a dead host itself (restart).
                max_restarts=0,
                max_task_retries=0,
                max_concurrency=2,  # train, and take_metrics beside it
            )
            .remote(*self._host_args(index))
        )
        self.actors.append(actor)
        return actor

    # -- watch ---------------------------------------------------------------------------------

    def watch(self, progress: ProgressFn | None, poll_s: float) -> None:
        """Until every member has trained to the end: poll metrics, show progress, replace members
        whose process died (:meth:`restart`); a member's own error fails the run."""
        import ray

        running = {host.train.remote(self.cfg.steps): index for index, host in enumerate(self.host_actors)}
        describer = ThreadPoolExecutor(1, thread_name_prefix="poptrain-describe")
        self.describing = describer.submit(self._describe_members)
        describer.shutdown(wait=False)
        rates = _Rates()
        while running:
            done, _ = ray.wait(list(running), timeout=poll_s)
            for ref in done:
                index = running.pop(ref)
                try:
                    self.final.update(ray.get(ref))
                except ray.exceptions.RayActorError as exc:
                    running[self.restart(index, exc).train.remote(self.cfg.steps)] = index
                except ray.exceptions.RayTaskError as exc:
                    # Its peers stop waiting for it at once (their errors say why), as the run ends.
                    self.coordinator.abort.remote(f"{self._host_names()[index]} failed")
                    raise PopulationError(f"{self._host_names()[index]} {describe_failure(exc)}") from None
            self.collector.poll()
            if progress is not None:
                snapshot = rates.annotate(self.tracking.progress(), self.cfg.steps, time.monotonic() - self.started)
                snapshot["placement"] = self.placement
                progress(snapshot)
        self.collector.drain()
        self.describing.result()  # done, and its failure the run's

    def restart(self, index: int, exc: Exception):
        """Host ``index``'s process died (killed, out of memory, node lost): a new process takes its
        place in its bundle and continues all its members from their latest common checkpoint,
        within ``failure.max_restarts``; their peers wait at the barrier meanwhile, or go on.
        Returns the new actor."""
        import ray

        names = self.hosts[index]
        label = self._host_names()[index]
        restartable = self.cfg.failure.max_restarts if self.cfg.checkpoint.every else 0
        restarts = self.restarts[names[0]] + 1  # every member of a host restarts with it
        if getattr(exc, "actor_init_failed", False) or restarts > restartable:
            raise PopulationError(_gave_up(self.cfg, self.run_dir, label, restarts - 1, exc)) from None
        if self.cfg.failure.while_restarting == "continue":
            for name in names:
                self.coordinator.member_down.remote(name)
        while True:
            # The old process may only be unreachable (ActorUnavailableError): end it, so that it
            # neither trains on as these members nor holds the bundle's resources.
            ray.kill(self.host_actors[index], no_restart=True)
            self.host_actors[index] = self.collector.actors[index] = self._start_host(index)
            try:
                _when_restarted(self.host_actors[index], label, self.cfg.placement.timeout_s)
                break
            except ray.exceptions.RayActorError as again:  # the new process died too
                restarts += 1
                if restarts > restartable:
                    raise PopulationError(_gave_up(self.cfg, self.run_dir, label, restarts - 1, again)) from None
        self.placement.update(ray.get(self.host_actors[index].member_placement.remote(names)))
        for name in names:
            self.members[name] = self.host_actors[index]
            self.restarts[name] = restarts
        self.tracking.set_tags_of({name: {"poptrain.restarts": restarts} for name in names})
        self.tracking.log_placements({name: self.placement[name] for name in names})
        return self.host_actors[index]

    # -- finish and teardown -------------------------------------------------------------------

    def finish(self) -> RunResult:
        """Save every member's final weights (``members/<name>/model.pt``), log the config, models
        and plots, and hand the processes to the pool when they are kept warm."""
        import ray

        cfg, run_dir = self.cfg, self.run_dir
        weights = _save_final_weights(self.members, run_dir)  # before anything that can fail
        averaged = self._evaluate_population_average(weights)
        if cfg.pbt is not None:
            self.tracking.log_pbt(ray.get(self.coordinator.pbt_events.remote()), run_dir, cfg.steps, plot=cfg.tracking.plots)
        best = ray.get(self.coordinator.best_member.remote())
        ranking = cfg.evaluation.ranking  # None without metrics, and then no member is best
        if best is not None and ranking is not None:
            self.tracking.set_tags(None, {"poptrain.best_member": best[0], "poptrain.best_by": f"eval/{ranking.key}"})
        _log_artifacts(cfg, self.tracking, self.members, run_dir, weights, self.final)
        if self.keep_warm:  # handed to the pool at the very end of teardown, once this run has let go of everything
            self.to_keep = pool.WarmMembers(_set_by_start(self.shape, "shape"), self.group, list(self.host_actors), self.coordinator, self.run_tag)
        ids = _set_by_start(self.ids, "ids")
        return RunResult(
            run_id=ids.parent,
            member_run_ids=dict(ids.members),
            output_dir=run_dir,
            tracking_uri=self.uri,
            metrics={name: self.final[name] for name in cfg.member_names if name in self.final},  # in config order
            placement=self.placement,
            seconds=time.monotonic() - self.started,
            restarts={k: v for k, v in self.restarts.items() if v},
            best_member=None if best is None else best[0],
            population_average=averaged,
        )

    def _evaluate_population_average(self, weights: dict[str, Path]) -> dict[str, float]:
        """The population's average model (:mod:`poptrain.evaluation.population_average`) saved and evaluated,
        its metrics logged on the parent run at the final evaluation's step, where
        ``evaluation.population_average`` asks for it; {} otherwise. The members' weights are saved
        already: a failure here is a warning (with its traceback), and the run still finishes."""
        import traceback

        members = population_average.averaged_members(self.cfg, build_couplings(self.cfg.couplings, self.population))
        if not members:
            return {}
        try:
            metrics = population_average.save_and_evaluate(self.cfg, members, weights, self.run_dir)
        except Exception as exc:  # noqa: BLE001 - the user's model or data in the driver: say so, finish the run
            print(
                f"poptrain: warning: the population's average model could not be saved or evaluated ({type(exc).__name__}: {exc}); "
                f"the members' final weights are saved under {self.run_dir / 'members'}",
                file=sys.stderr,
                flush=True,
            )
            traceback.print_exception(exc, file=sys.stderr)
            return {}
        now = int(time.time() * 1000)
        self.tracking.log_population([(key, value, self.cfg.steps, now) for key, value in metrics.items()])
        return metrics

    def teardown(self) -> None:
        """End the MLflow runs with the run's status (after one last take of what members logged,
        for a failure's post-mortem), end or park the processes, remove mapped-memory files and
        the placement group, and stop Ray if this run started it."""
        import ray

        tracking, collector = self._tracking, self._collector
        wait([self.describing])  # nothing is written to a run after it ended
        if collector is not None and self.status != "FINISHED":
            try:
                collector.poll(timeout_s=2.0)
            except Exception:
                pass
        if tracking is not None and tracking.ids is not None:
            try:
                tracking.finish(self.status)
            except TrackingUnavailable as exc:
                print(f"poptrain: warning: could not end the MLflow runs: {exc}", file=sys.stderr, flush=True)
        elif tracking is not None:
            tracking.close()
        else:
            _close_when_open(self.opening)
        to_keep = self.to_keep if self.status == "FINISHED" else None
        kept = to_keep.processes if to_keep is not None else []
        for actor in self.actors:
            if not any(actor is k for k in kept):
                ray.kill(actor, no_restart=True)
        mapped_memory.remove_leftovers(self.run_tag)
        if to_keep is not None and kept and not _park(to_keep, self.keep_warm_s):
            kept = []
        if self.group is not None and not kept:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
        if self.started_ray:
            ray.shutdown()


T = TypeVar("T")


def _set_by_start(value: T | None, name: str) -> T:
    """``value``, an attribute of a :class:`PopulationRun` that :meth:`PopulationRun.start` sets."""
    if value is None:
        raise RuntimeError(f"PopulationRun.{name} is set by start(), which has not (or not yet) set it")
    return value


def _park(warm: pool.WarmMembers, keep_warm_s: float) -> bool:
    """Have ``warm``'s processes let go of the finished run (model, optimizer, data, shared memory,
    GPU cache: nothing of it stays in memory while they wait) and hand them to the pool. Whether
    they were kept; if not, their actors are killed (the caller removes the placement group)."""
    import ray

    try:
        ray.get([actor.park.remote() for actor in warm.processes], timeout=60)
        pool.keep(warm, keep_warm_s)
        return True
    except Exception as exc:  # e.g. one died meanwhile: end them all, as a run that is not kept does
        _warn_not_warm("this run's processes are not kept warm for the next run", exc)
        for actor in warm.processes:
            ray.kill(actor, no_restart=True)
        return False


def _healthy(warm: pool.WarmMembers | None) -> pool.WarmMembers | None:
    """``warm`` if every one of its processes still answers (one may have been killed while it
    waited), else None, having ended the rest."""
    import ray

    if warm is None:
        return None
    try:
        ray.get([actor.info.remote() for actor in warm.actors] + [warm.coordinator.ping.remote()], timeout=30)
        return warm
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
        _warn_not_warm("the warm processes of an earlier run are not reused; new ones start", exc)
        pool.end(warm)
        return None


def _warn_not_warm(what: str, exc: Exception) -> None:
    """One warning line: why warm processes (poptrain.driver.pool) were dropped."""
    import ray

    if isinstance(exc, ray.exceptions.GetTimeoutError):
        why = "one of them did not answer within the timeout"
    elif isinstance(exc, (ray.exceptions.RayTaskError, ray.exceptions.RayActorError)):
        why = f"one of them {describe_failure(exc)}"
    else:
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    print(f"poptrain: warning: {what} ({why})", file=sys.stderr, flush=True)


def _close_when_open(opening) -> None:
    """Close the tracking a failed start opened (its writer thread), once it is open."""
    try:
        opening.result().close()
    except Exception:
        pass


def _return_to(cwd: str) -> None:
    """Make ``cwd`` the working directory again if the folder was replaced under us. Inside a Ray
    job the driver's working directory is the job's unpacked ``working_dir``; a second Ray node on
    the same machine unpacks it again at the same path for its workers, deleting the folder the
    driver is in, and MLflow's sqlite store resolves its default artifact root against it."""
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(cwd)


class _MetricsCollector:
    """Empties the members' and the coordinator's outboxes into tracking. At most one
    ``take_metrics`` call per actor is in flight, and its reply is always read (a later poll reads
    it if this one cannot wait): an outbox drops what it handed out only once tracking says all of
    it is written, so an unread reply would be a lost metric."""

    def __init__(self, tracking: Tracking, hosts: list, coordinator):
        self.tracking = tracking
        self.actors: dict[int | None, Any] = {**dict(enumerate(hosts)), None: coordinator}  # None: the coordinator's (the parent run's) metrics
        self.in_flight: dict[Any, int | None] = {}  # reference -> whose: a host's index, or None
        self.lost: set[int | None] = set()  # whose last reply never arrived: resend it

    def poll(self, timeout_s: float = 0.2) -> None:
        """Take what is new, waiting at most ``timeout_s`` (a member being restarted answers later)."""
        import ray

        written = self.tracking.written()
        waiting = set(self.in_flight.values())
        for name, actor in self.actors.items():
            if name not in waiting:
                self.in_flight[actor.take_metrics.remote(written, name in self.lost)] = name
                self.lost.discard(name)
        ready, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=timeout_s)
        for ref in ready:
            name = self.in_flight.pop(ref)
            try:
                items = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:
                self.lost.add(name)  # it may have answered, and may be reachable again: ask for it all again
                continue
            except ray.exceptions.RayActorError:
                continue  # its process died: its checkpoint holds what it had not handed out
            if name is None:
                self.tracking.log_population(items)
            else:
                self.tracking.log_members(items)

    def drain(self) -> None:
        """After training: one last take from everyone, and every reply read."""
        self.poll(timeout_s=60.0)
        while self.in_flight:
            self.poll(timeout_s=5.0)


def _save_final_weights(members: dict[str, Any], run_dir: Path) -> dict[str, Path]:
    """Each member's final ``state_dict`` as ``<run_dir>/members/<name>/model.pt``; where that
    cannot be written, in a temporary folder of its own, with a warning naming it. Member -> path."""
    import ray

    # One request per host; read one host's reply at a time, so that the driver holds one host's weights at most.
    saved = {}
    for reply in [host.final_weights.remote(names) for host, names in _by_host(members).items()]:
        for name, arrays in ray.get(reply).items():
            saved[name] = _save_weights(name, {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, run_dir)
    return {name: saved[name] for name in members}  # in the population's order


def _save_weights(name: str, state: dict[str, torch.Tensor], run_dir: Path) -> Path:
    """Member ``name``'s final weights saved as ``<run_dir>/members/<name>/model.pt``, else in a
    temporary folder of its own (a warning names it): where they are."""
    import tempfile

    path = run_dir / "members" / name / "model.pt"
    try:
        save_atomic(state, path)
    except OSError as exc:
        try:
            rescue = Path(tempfile.mkdtemp(prefix=f"poptrain-{name}-")) / "model.pt"
            save_atomic(state, rescue)
        except OSError:
            raise PopulationError(f"member {name}'s final weights could not be saved to {path} ({type(exc).__name__}: {exc})") from None
        print(
            f"poptrain: warning: member {name}'s final weights could not be saved to {path} ({type(exc).__name__}: {exc}); they are in {rescue}",
            file=sys.stderr,
            flush=True,
        )
        return rescue
    return path


def _log_artifacts(
    cfg: RunConfig, tracking: Tracking, members: dict[str, Any], run_dir: Path, weights: dict[str, Path], final: dict[str, dict[str, float]]
) -> None:
    """The run's artifacts in MLflow: its config, the models (``tracking.log_models``), the plots
    (``tracking.plots``). The weights are saved already: what fails to log is named in a warning,
    with where the weights are, and the run still finishes (an unexpected error shows its traceback)."""
    import traceback

    from mlflow.exceptions import MlflowException

    def attempt(what: str, log) -> None:
        try:
            log()
        except Exception as exc:
            where = ", ".join(f"{name}: {path}" for name, path in weights.items())
            print(
                f"poptrain: warning: could not log {what} to MLflow ({type(exc).__name__}: {str(exc).strip()[:500]}); the final weights are saved ({where})",
                file=sys.stderr,
                flush=True,
            )
            if not isinstance(exc, (TrackingUnavailable, MlflowException, OSError, PopulationError)):
                traceback.print_exception(exc, file=sys.stderr)

    attempt(f"the config ({run_dir / 'config.yaml'})", lambda: tracking.log_artifact(None, str(run_dir / "config.yaml")))
    if cfg.tracking.log_models:
        examples: list = []
        attempt(
            "the models (their example inputs could not be read)",
            lambda: examples.extend(_ask_hosts(members, "example_inputs").values()),  # in the population's order
        )
        for name, example in zip(members, examples, strict=False):  # none when they could not be read
            spec = cfg.member(name).model  # the object itself when one was given from Python
            evaluated = {k: v for k, v in final.get(name, {}).items() if k.startswith("eval/")}  # linked to the logged model
            attempt(
                f"member {name}'s model",
                lambda name=name, spec=spec, example=example, evaluated=evaluated: tracking.log_model(
                    name, str(weights[name]), spec, example, cfg.steps - 1, metrics=evaluated
                ),
            )
    if cfg.tracking.plots:
        attempt(f"the plots (under {run_dir / 'plots'})", lambda: tracking.log_plots(str(run_dir / "plots")))


def _warn_about_storage(cfg: RunConfig, run_dir: Path, uri: str, nodes: int) -> None:
    job = ray_job()
    if job is not None:  # say where everything goes: not the job's working dir (poptrain.config.anchor_outputs)
        print(
            f"poptrain: inside Ray job {job['submission_id'] or '(no submission id)'}: outputs go to {run_dir}, MLflow tracking to {uri} "
            f"(relative paths resolve against ${HOME_ENV}, here {job_home()}, not the job's temporary working directory)",
            file=sys.stderr,
            flush=True,
        )
    if nodes > 1 and not uri.startswith(("http://", "https://")):
        print(
            f"poptrain: warning: tracking URI {uri} is a local store on the driver's node, but the cluster has {nodes} nodes; "
            "point tracking.uri / MLFLOW_TRACKING_URI at an MLflow server every node can reach to open the runs from anywhere",
            file=sys.stderr,
            flush=True,
        )


def _when_restarted(actor, who: str, timeout_s: float) -> dict[str, Any]:
    """Wait until a dead member's new process is up (it has reloaded its checkpoint); its placement."""
    import ray

    limit = max(timeout_s, 60.0)
    deadline = time.monotonic() + limit
    while True:
        try:
            return ray.get(actor.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise PopulationError(f"{who} was not restarted within {limit:g} s") from None
            time.sleep(0.2)
        except ray.exceptions.RayTaskError as exc:
            raise PopulationError(f"{who} could not be restarted: {describe_failure(exc)}") from None
        except ray.exceptions.RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):
                raise PopulationError(f"{who} could not be restarted: {describe_failure(exc)}") from None
            raise  # it died: the caller starts another, within failure.max_restarts


def _gave_up(cfg: RunConfig, run_dir: Path, who: str, restarted: int, exc: Exception) -> str:
    step = latest_complete_step(run_dir, cfg.member_names)
    how = (
        "checkpoints are off (checkpoint.every: 0), so it cannot be restarted"
        if not cfg.checkpoint.every
        else f"after {restarted} restart(s) (failure.max_restarts: {cfg.failure.max_restarts})"
    )
    resume = (
        f"the latest complete checkpoint is step {step}: continue with `poptrain resume {run_dir}`" if step is not None else "no complete checkpoint exists yet"
    )
    return f"{who} {describe_failure(exc)}; {how}; {resume}"


def _by_host(members: dict[str, Any]) -> dict[Any, list[str]]:
    """Host actor -> the members it carries (``members``: member -> its host actor), in the population's order."""
    hosts: dict[Any, list[str]] = {}
    for name, host in members.items():
        hosts.setdefault(host, []).append(name)
    return hosts


def _host_label(names: list[str]) -> str:
    """How a host is named in errors: by its member, or its members."""
    return f"member {names[0]}" if len(names) == 1 else f"members {', '.join(names)} (one host)"


def _ask_hosts(members: dict[str, Any], method: str) -> dict[str, Any]:
    """Member -> the answer of its host's ``method(names)`` (one request per host, not per member),
    in the population's order; a failure is a :class:`PopulationError` naming the host's members."""
    hosts = _by_host(members)
    answers: dict[str, Any] = {}
    for by_name in _get_all([getattr(host, method).remote(names) for host, names in hosts.items()], [_host_label(names) for names in hosts.values()], who=""):
        answers.update(by_name)
    return {name: answers[name] for name in members}


def _get_all(refs: list, names, who: str = "member") -> list:
    """``ray.get`` of one call per member (in ``names`` order) that turns a failure into a
    :class:`PopulationError` naming the member and its own error (``who=""``: ``names`` name
    themselves)."""
    import ray

    out = []
    for ref, name in zip(refs, names, strict=True):
        try:
            out.append(ray.get(ref))
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
            raise PopulationError(f"{who} {name} {describe_failure(exc)}".strip()) from None
    return out


def describe_failure(exc: Exception) -> str:
    """One line for a Ray failure: the user's exception where there is one, not Ray's wrapping."""
    import re

    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return f"failed: {type(cause).__name__}: {cause}"
    text = str(getattr(exc, "error_msg", "") or exc)
    if getattr(exc, "actor_init_failed", False):
        raised = [line.strip() for line in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception|Exit|Interrupt)\b", line)]
        return f"failed to start: {raised[-1] if raised else text.splitlines()[-1]}"
    return f"died: its process exited or was killed ({text.splitlines()[0] if text else type(exc).__name__})"


class _Rates:
    """Steps per second per member, from successive progress snapshots."""

    def __init__(self):
        self.first: dict[str, tuple[float, int]] = {}

    def annotate(self, snapshot: dict[str, dict[str, Any]], steps: int, elapsed: float) -> dict[str, Any]:
        now = time.monotonic()
        members = {}
        for name, state in snapshot.items():
            if name.startswith("__"):
                continue
            step = int(state.get("step", 0))
            t0, s0 = self.first.setdefault(name, (now, step))
            rate = (step - s0) / (now - t0) if now > t0 and step > s0 else None
            members[name] = {
                "step": step,
                "loss": state.get("loss"),
                "steps_per_s": rate,
                "eta_s": (steps - step) / rate if rate else None,
            }
        return {"members": members, "couplings": snapshot.get("__couplings__", {}), "steps": steps, "elapsed_s": elapsed}
