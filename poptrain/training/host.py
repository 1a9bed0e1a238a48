"""The Ray actor that carries members in a run: :class:`MemberHost`, a *host*.

A host carries one member or several (``placement.members_per_host``; see
:func:`poptrain.driver.placement.plan_hosts`). It builds each member's
:class:`poptrain.training.member.MemberTrainer` on the device Ray assigned the host, links the host to
the coordinator once (:func:`poptrain.exchange.links.open_link` over a direct connection or Ray calls),
maps members' coordinator-only parameters into memory the coordinator maps when both are on one
CPU node, restores the newest checkpoint all its members have when there is one, and then trains
its members in lockstep (:mod:`poptrain.training.lockstep`: one message per exchange for all of them):
checkpoints at their steps, each member's metrics into its own outbox, which the driver empties
(``take_metrics``, called while ``train`` runs: the actor has two threads). A member stays a
member in all a user sees: its own checkpoint files, random streams, MLflow run and ``model.pt``.
"""

from __future__ import annotations

import gc
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch.utils.data import default_collate

from poptrain.components.build import describe_dataset
from poptrain.config.schema import RunConfig
from poptrain.couplings import PopulationInfo, Quantity, build_couplings
from poptrain.exchange import mapped_memory
from poptrain.exchange.channel import CoordinatorClient
from poptrain.exchange.links import Link, open_link
from poptrain.exchange.wire import ExchangePlan, numpy_copy
from poptrain.storage.checkpoint import checkpoint_path, load_checkpoint, save_checkpoints, steps_of
from poptrain.tracking.outbox import Item, MetricsOutbox
from poptrain.training.allocator import keep_freed_memory
from poptrain.training.lockstep import drive
from poptrain.training.member import MemberTrainer, logs_step
from poptrain.training.stacked import StackedGroup, form_groups

SYSTEM_METRICS_EVERY_S = 10.0


def placement_device() -> tuple[str, list[str]]:
    """The device Ray assigned this process and Ray's ids of its GPUs: ``cuda`` (Ray sets
    CUDA_VISIBLE_DEVICES, so index 0 is the member's own GPU) when it was given GPUs, else
    ``cpu``. Given GPUs that torch cannot use (a CPU-only torch build on a GPU node, a broken
    driver), it warns and trains on the CPU; its placement still names the GPUs it holds."""
    # Strings: with CUDA_VISIBLE_DEVICES set before Ray started, Ray hands back its entries, which
    # may be GPU or MIG UUIDs.
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if gpu_ids and torch.cuda.is_available():
        return "cuda", gpu_ids
    if gpu_ids:
        warnings.warn(
            f"poptrain: this member holds GPU(s) {', '.join(gpu_ids)} but torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda = {torch.version.cuda}); it trains on the CPU. Install a CUDA build of torch "
            "on this node, or set `resources.num_gpus: 0`.",
            RuntimeWarning,
            stacklevel=2,
        )
    return "cpu", gpu_ids


def member_devices(members: int, device: str, gpus: int) -> list[str]:
    """The device each of a host's ``members`` trains on, given :func:`placement_device`'s
    ``device`` and the number of GPUs the host holds: on a host of several GPUs, cuda:0, cuda:1,
    ... in turn (Ray's CUDA_VISIBLE_DEVICES numbers the host's own GPUs from 0), so each GPU it
    holds trains its share of the members instead of all of them crowding onto cuda:0 (the
    config check, :func:`poptrain.config.host_gpu_problem`, keeps each GPU's share within it);
    else ``device`` for all of them."""
    if device != "cuda":
        return [device] * members
    return [f"cuda:{i % max(1, gpus)}" for i in range(members)]


@dataclass
class Hosted:
    """One member a host carries, and what the host keeps for it."""

    trainer: MemberTrainer
    outbox: MetricsOutbox
    restored_from: int | None = None  # the checkpoint's step it was restored from
    evaluated: dict[str, float] = field(default_factory=dict)  # the newest held-out metrics (what population-based training ranks by)
    last_step_metrics: dict[str, float] = field(default_factory=dict)  # the last step's (what a training metric ranks by)
    checkpoint_ms: float = 0.0  # the last checkpoint's time, reported with the next step's profile

    @property
    def name(self) -> str:
        return self.trainer.name


class MemberHost:
    """Ray actor carrying one or more members: see the module's docstring."""

    # The run's, set by _start and let go by park (a warm process between runs holds none of them).
    run: RunConfig
    run_dir: Path
    coordinator: Any  # the coordinator actor's handle
    link: Link
    members: list[Hosted]
    by_name: dict[str, Hosted]
    units: list
    groups: list[StackedGroup]

    def __init__(
        self, run: RunConfig, names: list[str], population: PopulationInfo, coordinator_name: str, num_cpus: float, run_dir: str, system_metrics: bool = False
    ):
        self._start(run, names, population, coordinator_name, num_cpus, run_dir, system_metrics)

    def rebind(
        self, run: RunConfig, names: list[str], population: PopulationInfo, coordinator_name: str, num_cpus: float, run_dir: str, system_metrics: bool = False
    ) -> dict[str, Any]:
        """Carry members ``names`` of another run in this process (a warm process, see
        :mod:`poptrain.driver.pool`): everything the last run's members held is let go and built anew
        from the arguments, exactly as a new process would build it. Returns :meth:`info`."""
        self.park()
        self._start(run, names, population, coordinator_name, num_cpus, run_dir, system_metrics)
        return self.info()

    def park(self) -> None:
        """Let go of the finished run (models, optimizers, data, mapped memory, the GPU's cached
        blocks, the connection to its coordinator) while this warm process waits for the next."""
        link = self.__dict__.pop("link", None)
        if link is not None:
            link.close()
        # Every attribute that holds a trainer, a stack or its optimizer state, not only the member
        # list: a stacked group holds its members' trainers and the stacked parameters and moments,
        # and one reference left keeps the whole run (on a GPU, its memory) alive beside the next.
        self.members, self.by_name, self.units, self.groups = [], {}, [], []
        for run_state in ("coordinator", "run"):  # a call before the next run's _start fails loudly
            self.__dict__.pop(run_state, None)
        gc.unfreeze()  # what _start froze
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _start(
        self, run: RunConfig, names: list[str], population: PopulationInfo, coordinator_name: str, num_cpus: float, run_dir: str, system_metrics: bool
    ) -> None:
        device, gpu_ids = placement_device()
        torch.set_num_threads(max(1, int(num_cpus)))
        self.run, self.run_dir = run, Path(run_dir)
        couplings, plan = shared_by_members(run, population)
        devices = member_devices(len(names), device, min(len(gpu_ids), torch.cuda.device_count()) if device == "cuda" else 0)
        trainers = [MemberTrainer(run, name, population, on, couplings=couplings, plan=plan) for name, on in zip(names, devices, strict=True)]
        self.coordinator = coordinator = ray.get_actor(coordinator_name)
        client = CoordinatorClient(coordinator, ray.get(coordinator.channel.remote()), run.exchange.timeout_s)
        self.link = link = open_link(run, trainers[0].plan, client)  # one for every member it carries
        for trainer in trainers:
            trainer.connect(link)
        # What a step drives: members alone, or stacked in groups of one architecture (poptrain.training.stacked).
        # Under `exchange.shared_memory: auto` the groups are formed first, and their members
        # exchange copies (the stack holds their parameters); under `true` mapped members train alone.
        stacking = run.placement.stacked and len(trainers) > 1
        units = form_groups(trainers) if stacking and run.exchange.shared_memory == "auto" else None
        stacked = {id(m) for unit in units or [] if isinstance(unit, StackedGroup) for m in unit.members}
        for trainer in trainers:
            mappable = trainer.plan.coordinator_only[trainer.name]
            if mappable and device == "cpu" and id(trainer) not in stacked:
                self._map_parameters(trainer, coordinator, mappable, coordinator_name.rsplit("-", 1)[-1])
        # A fresh run starts with no checkpoint; a resumed run, or the new process the driver starts
        # for a host whose process died, continues from the newest checkpoint all its members have,
        # metrics not yet written included.
        restored = common_checkpoint(run_dir, names)
        self.members = []
        unpacked: dict = {}  # peers' values unpacked once for all the members whose checkpoints hold the same
        for trainer in trainers:
            hosted = Hosted(trainer, MetricsOutbox())
            if restored is not None:
                state = load_checkpoint(checkpoint_path(self.run_dir, trainer.name, restored))
                trainer.load_state_dict(state, unpacked)
                hosted.outbox = MetricsOutbox(state.get("metrics", []))
                hosted.evaluated, hosted.last_step_metrics = dict(state.get("evaluated", {})), dict(state.get("last_step_metrics", {}))
                hosted.restored_from = restored
                if trainer.rollback_point is not None:
                    trainer.set_rollback_point(restored, state)
            self.members.append(hosted)
        self.by_name = {m.name: m for m in self.members}
        self.units = units if units is not None else form_groups(trainers) if stacking else list(trainers)
        self.groups = [u for u in self.units if isinstance(u, StackedGroup)]
        if self.groups:  # a stack's step temporaries reuse the last step's pages (poptrain.training.allocator)
            keep_freed_memory()
        if units is not None and restored is not None:  # formed before the restore: its members' loaded states into the stacks
            self._sync_stacks(into_members=False)
        # When profiling on GPUs, the step's clock waits for the work queued there when it starts and
        # stops: a GPU runs ahead of the Python that queues its work, and the update queued after a
        # step's last read would be counted in the next step.
        self.timed_gpus = [torch.device(d) for d in dict.fromkeys(devices) if d.startswith("cuda")] if run.tracking.profile else []
        self.system_metrics = system_metrics
        self.last_system_sample = float("-inf")
        self.logging_ms = 0.0  # the last step's logging time, reported with the next step's profile
        self.reporting = None  # the last evaluation's report on its way to the coordinator
        self.placement = {
            "node_id": _node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": ",".join(dict.fromkeys(devices)),  # the host's; member_placement gives each member's own
            "gpu_ids": ",".join(map(str, gpu_ids)),
            "torch_threads": torch.get_num_threads(),
            "members_on_host": len(self.members),
        }
        # The run's objects live as long as the run (500 stacked members are about 400,000 objects
        # the cyclic collector tracks): frozen, its full passes skip them, where each pass took
        # about 0.2 s of a host's training. park() unfreezes them, so that they can be collected.
        gc.freeze()

    def _map_parameters(self, trainer: MemberTrainer, coordinator, names: list[str], run_tag: str) -> None:
        """Keep ``names`` in memory the coordinator maps when it is on this node (see
        :mod:`poptrain.exchange.mapped_memory`); else, or without room in ``/dev/shm``, send copies."""
        name = trainer.name
        layout = mapped_memory.map_parameters(trainer.params, names, f"{run_tag}-{name}", _node_id())
        if layout is None:
            return
        if ray.get(coordinator.attach.remote(name, layout)):
            trainer.mapped = {Quantity(name, "param", n) for n in names}
        else:
            mapped_memory.release(layout)

    def info(self) -> dict[str, Any]:
        """Where this host runs (node, pid, device, threads), the same for every member it carries."""
        return dict(self.placement)

    def member_placement(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """For each of members ``names``: :meth:`info`, with how many of its parameters are in memory
        the coordinator maps and how many members (itself included) it trains stacked with (1: alone).
        One request for many members, as the other per-member questions below."""
        stacked = {name: len(g.names) for g in self.groups for name in g.names}
        out = {}
        for name in names:
            trainer = self.by_name[name].trainer
            out[name] = {**self.placement, "device": str(trainer.device), "shared_params": len(trainer.mapped), "stacked_with": stacked.get(name, 1)}
        return out

    def train(self, until_step: int) -> dict[str, dict[str, float]]:
        """Train every member up to ``until_step``, in lockstep; metrics go to the outboxes. Returns
        each member's last step's metrics."""
        run, members = self.run, self.members
        while members[0].trainer.step < until_step:
            step = members[0].trainer.step
            synced = bool(run.checkpoint.every and step % run.checkpoint.every == 0)
            if synced:
                self._sync_stacks(into_members=True)
            self._checkpoint_if_due(step)
            if synced:  # written: the stacks hold the state; copies in the members' optimizers would double its memory
                for group in self.groups:
                    group.release_member_copies()
            if step and run.evaluation.every and step % run.evaluation.every == 0:
                for m, metrics in zip(members, self._evaluate(step), strict=True):
                    m.evaluated = metrics
            if step and run.pbt is not None and step % run.pbt.every == 0:
                self._pbt_round(step)
            for unit in self.units:
                unit.timings = dict.fromkeys(unit.timings, 0.0)
            self._wait_for_gpus()
            started = time.perf_counter()
            stepped = self._step_units()
            self._wait_for_gpus()
            step_ms = 1000 * (time.perf_counter() - started) / len(members)  # a member's share of the host's step
            shares = timing_shares(self.units) if run.tracking.profile else {}
            for m, metrics in zip(members, stepped, strict=True):
                if run.tracking.profile:
                    metrics.update({f"profile/{k}": v for k, v in shares[m.name].items()})
                    metrics["profile/compute_ms"] = step_ms - sum(shares[m.name].values())
                    metrics["profile/logging_ms"], metrics["profile/checkpoint_ms"] = self.logging_ms, m.checkpoint_ms
                    m.checkpoint_ms = 0.0
                m.last_step_metrics = metrics
            self._log(step, members)
        self._sync_stacks(into_members=True)  # the members' own optimizers hold their state between calls
        if members[0].trainer.step == run.steps:
            drive([m.trainer for m in members], [m.trainer.finish_program() for m in members])
            for m, metrics in zip(members, self._evaluate(run.steps), strict=True):  # after the last exchange: an average's target has its final weights
                m.last_step_metrics = {**m.last_step_metrics, **metrics}
        # The last pipelined publishes: done before train() returns, so their coupling metrics are
        # in the coordinator's outbox when the driver takes it for the last time.
        self.link.drain()
        if self.reporting is not None:
            ray.get(self.reporting)
            self.reporting = None
        return {m.name: dict(m.last_step_metrics) for m in members}

    def _step_units(self) -> list[dict[str, float]]:
        """One step of every unit (member or stacked group), in lockstep when there are several;
        each member's metrics, in order."""
        results = drive(self.units, [u.step_program() for u in self.units])
        by_name: dict[str, dict[str, float]] = {}
        for unit, result in zip(self.units, results, strict=True):
            by_name.update(zip(unit.names, result if isinstance(unit, StackedGroup) else [result], strict=True))
        return [by_name[m.name] for m in self.members]

    def _wait_for_gpus(self) -> None:
        """When profiling on GPUs: wait for the work queued on them (see ``timed_gpus``)."""
        for device in self.timed_gpus:
            torch.cuda.synchronize(device)

    def _sync_stacks(self, into_members: bool) -> None:
        """Stacked groups' optimizer state into their members' own optimizers (before anything reads
        a member's state), or back into the stacks (after a member's state was loaded)."""
        for group in self.groups:
            group.to_members() if into_members else group.from_members()

    def _pbt_round(self, step: int) -> None:
        """Population-based training at ``step``: hand the coordinator each scheduled member's score
        (its newest held-out metric, or its last step's training metric) and a reference to its
        state, in one call for all of them (the round needs everyone); copy the donors the round
        decides in memory, and log the exploits."""
        from poptrain.pbt.policy import ranking, transferable

        metric, _ = ranking(self.run)
        scheduled = [(m, m.trainer.hyperparameters) for m in self.members if m.trainer.hyperparameters is not None]
        if not scheduled:
            return
        self._sync_stacks(into_members=True)
        arrivals = []
        for m, hyperparameters in scheduled:
            score = (m.evaluated if metric.startswith("eval/") else m.last_step_metrics).get(metric)
            state = [ray.put(transferable(m.trainer.state_dict()))]  # in a list: Ray hands the reference on, unresolved
            arrivals.append((m.name, score, hyperparameters.get(), state))
        names = self.run.member_names
        for (m, _), decision in zip(scheduled, ray.get(self.coordinator.pbt_round.remote(step, arrivals)), strict=True):
            if decision is None:
                continue
            m.trainer.exploit(decision["donor"], ray.get(decision["state"][0]), decision["new_hyperparameters"])
            now = int(time.time() * 1000)
            m.outbox.add(
                [
                    ("pbt/exploited", 1.0, step, now),
                    ("pbt/donor_index", float(names.index(decision["donor"])), step, now),
                    ("pbt/score", float(decision["receiver_score"]), step, now),
                    ("pbt/donor_score", float(decision["donor_score"]), step, now),
                ]
            )
            if decision.get("adjusted"):  # explore's draw was bounded or refused (what and why: the exploit's tag)
                m.outbox.add([("pbt/adjusted", float(len(decision["adjusted"])), step, now)])
        self._sync_stacks(into_members=False)

    def _evaluate(self, step: int) -> list[dict[str, float]]:
        """Evaluate every member on its held-out data after ``step`` steps (before step ``step``'s own
        exchanges: an averaging target holds the previous exchange's average; at the end, after the
        last one): a stacked group's members in one forward pass over the stack where they hold
        the same held-out data (:meth:`poptrain.training.stacked.StackedGroup.evaluate`), the others one by
        one. Each member's metrics go into its outbox, and all of them (outputs too, for the
        ensemble) to the coordinator in one call, at most one such call in flight. Each member's
        metrics, in order ({} without held-out data)."""
        evaluated: dict[str, tuple] = {}
        for unit in self.units:
            if isinstance(unit, StackedGroup):
                evaluated.update(unit.evaluate())
            elif unit.eval_dataset is not None:
                evaluated[unit.name] = unit.evaluate()
        if not evaluated:
            return [{} for _ in self.members]
        now, ensemble = int(time.time() * 1000), self.run.evaluation.ensemble  # outputs cross only for the ensemble
        reports = []
        for name, (metrics, outputs, targets) in evaluated.items():
            self.by_name[name].outbox.add([(key, value, step, now) for key, value in metrics.items()])
            reports.append((name, metrics, outputs.numpy() if ensemble else None, targets.numpy() if ensemble else None))
        if self.reporting is not None:
            ray.get(self.reporting)
        self.reporting = self.coordinator.report_evals.remote(step, reports)
        return [evaluated[m.name][0] if m.name in evaluated else {} for m in self.members]

    def _checkpoint_if_due(self, step: int) -> None:
        """Write the checkpoint at ``step`` of every member due one (not at 0, not the one it was
        just restored from), in one write of all their files (:func:`save_checkpoints`); each books
        its share of the time, reported with its next step's profile."""
        every, keep = self.run.checkpoint.every, self.run.checkpoint.keep
        due = [m for m in self.members if every and step and not step % every and step != m.restored_from]
        if not due:
            return
        started = time.perf_counter()

        def states():  # made one by one as they are written: a few members' copies in memory at a time
            for m in due:
                state = m.trainer.state_dict()
                if m.trainer.rollback_point is not None:
                    m.trainer.set_rollback_point(step, state)
                # The metrics not yet in MLflow go into the checkpoint (a restart from it sends them
                # again), with the last step's and the newest held-out metrics, which a restarted member ranks by.
                yield m.name, {**state, "metrics": m.outbox.unwritten(), "last_step_metrics": dict(m.last_step_metrics), "evaluated": dict(m.evaluated)}

        save_checkpoints(states(), self.run_dir, step, keep)
        share_ms = 1000 * (time.perf_counter() - started) / len(due)
        for m in due:
            m.checkpoint_ms = share_ms

    def _log(self, step: int, members: list[Hosted]) -> None:
        started = time.perf_counter()
        system = {}
        if self.system_metrics and time.monotonic() - self.last_system_sample >= SYSTEM_METRICS_EVERY_S:
            system = self._system_metrics()
        logged = logs_step(self.run, step)  # the rule by which members computed what only logged steps have
        if logged or system:
            now_ms = int(time.time() * 1000)
            for m in members:
                items = {**m.last_step_metrics, **system} if logged else system
                m.outbox.add([(key, value, step, now_ms) for key, value in items.items()])
        self.logging_ms = 1000 * (time.perf_counter() - started)

    def _system_metrics(self) -> dict[str, float]:
        """CPU, memory (and GPU memory) of this host's process, under MLflow's `system/` prefix."""
        import psutil

        self.last_system_sample = time.monotonic()
        process = psutil.Process()
        out = {
            "system/cpu_utilization_percentage": process.cpu_percent(interval=None),
            "system/process_memory_rss_megabytes": process.memory_info().rss / 2**20,
            "system/system_memory_usage_percentage": psutil.virtual_memory().percent,
        }
        device = self.members[0].trainer.device
        if device.type == "cuda":
            out["system/gpu_memory_allocated_megabytes"] = torch.cuda.memory_allocated(device) / 2**20
            out["system/gpu_memory_reserved_megabytes"] = torch.cuda.memory_reserved(device) / 2**20
        return out

    def take_metrics(self, written: bool, resend: bool = False) -> dict[str, list[Item]]:
        """Each member's metrics since the last call; ``written``: everything taken before is in
        MLflow; ``resend``: the last reply was lost, send its items again."""
        return {m.name: m.outbox.take(written, resend) for m in self.members}

    def datasets(self, names: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Each of members ``names``' training and held-out data, as :func:`poptrain.components.build.describe_dataset` describes them."""
        out = {}
        for name in names:
            trainer = self.by_name[name].trainer
            out[name] = [describe_dataset(trainer.config.data, trainer.batches.dataset, "train")]
            if trainer.held_out is not None and trainer.eval_dataset is not None:
                out[name].append(describe_dataset(trainer.held_out, trainer.eval_dataset, "eval"))
        return out

    def final_weights(self, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
        """Members' state_dicts as NumPy arrays, to save as ``model.pt`` (bfloat16 as float32): one
        request for all of a host's members, not one round trip each."""
        return {name: {k: numpy_copy(v) for k, v in self.by_name[name].trainer.model.state_dict().items()} for name in names}

    def example_inputs(self, names: list[str], n: int = 4) -> dict[str, np.ndarray | None]:
        """A few inputs from each of members ``names``' data (the logged model's input example); None for multi-input models."""
        out = {}
        for name in names:
            dataset = self.by_name[name].trainer.batches.dataset
            batch = default_collate([dataset[i] for i in range(min(n, len(dataset)))])
            out[name] = numpy_copy(batch[0]) if len(batch) == 2 else None
        return out


def shared_by_members(run: RunConfig, population: PopulationInfo) -> tuple[list | None, ExchangePlan]:
    """What every member a host carries shares, built once: the exchange plan and the couplings
    (None where population-based training changes coupling weights member by member: each member
    then builds its own). Both grow with the population (a plan is O(N²) in N members)."""
    couplings = build_couplings(run.couplings, population)
    own_couplings = run.pbt is not None and any(key.startswith("couplings.") for key in run.pbt.hyperparameters)
    return (None if own_couplings else couplings), ExchangePlan.for_run(run, population, couplings)


def timing_shares(units: list) -> dict[str, dict[str, float]]:
    """Each member's share of its unit's step timings (``serialize_ms``, ``exchange_wait_ms``): a
    member alone has its own; a stacked group's are the whole group's, shared evenly."""
    return {name: {k: v / len(unit.names) for k, v in unit.timings.items()} for unit in units for name in unit.names}


def common_checkpoint(run_dir: str | Path, names: list[str]) -> int | None:
    """The newest checkpoint step every one of ``names`` has (a host restarts all its members from
    the same step), or None."""
    common = None
    for name in names:
        saved = set(steps_of(Path(run_dir), name))
        common = saved if common is None else common & saved
    return max(common) if common else None


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()
