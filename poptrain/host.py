"""The Ray actor that carries a member in a run: :class:`MemberHost`.

It builds the member's :class:`poptrain.member.MemberTrainer` on the device Ray assigned, links it
to the coordinator (:func:`poptrain.exchange.open_link` over a direct connection or Ray calls),
maps its coordinator-only parameters into memory the coordinator maps when both are on one CPU
node, restores its newest checkpoint when there is one, and then trains: checkpoints at their
steps, metrics into an outbox the driver empties (``take_metrics``, called while ``train`` runs:
the actor has two threads).
"""

from __future__ import annotations

import gc
import os
import socket
import time
import warnings
from typing import Any

import numpy as np
import ray
import torch
from torch.utils.data import default_collate

from poptrain import mapped_memory
from poptrain.build import describe_dataset
from poptrain.channel import CoordinatorClient
from poptrain.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, steps_of
from poptrain.config import RunConfig
from poptrain.couplings import PopulationInfo, Quantity
from poptrain.exchange import numpy_copy, open_link
from poptrain.member import MemberTrainer
from poptrain.outbox import Item, MetricsOutbox

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


class MemberHost:
    """Ray actor carrying one member: see the module's docstring."""

    def __init__(self, run: RunConfig, name: str, population: PopulationInfo, coordinator_name: str, num_cpus: float, run_dir: str, system_metrics: bool = False):
        self._start(run, name, population, coordinator_name, num_cpus, run_dir, system_metrics)

    def rebind(self, run: RunConfig, name: str, population: PopulationInfo, coordinator_name: str, num_cpus: float, run_dir: str, system_metrics: bool = False) -> dict[str, Any]:
        """Become member ``name`` of another run in this process (a warm process, see
        :mod:`poptrain.pool`): everything the last run's member held is let go and built anew from
        the arguments, exactly as a new process would build it. Returns :meth:`info`."""
        self.park()
        self._start(run, name, population, coordinator_name, num_cpus, run_dir, system_metrics)
        return self.info()

    def park(self) -> None:
        """Let go of the finished run (model, optimizer, data, mapped memory, the GPU's cached
        blocks, the connection to its coordinator) while this warm process waits for the next."""
        if self.trainer is not None and self.trainer.link is not None:
            self.trainer.link.close()
        self.trainer = self.outbox = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _start(self, run: RunConfig, name: str, population: PopulationInfo, coordinator_name: str, num_cpus: float, run_dir: str, system_metrics: bool) -> None:
        device, gpu_ids = placement_device()
        torch.set_num_threads(max(1, int(num_cpus)))
        self.trainer = MemberTrainer(run, name, population, device)
        self.run_dir = run_dir
        self.coordinator = coordinator = ray.get_actor(coordinator_name)
        self.reporting = None  # the evaluation report on its way to the coordinator
        client = CoordinatorClient(coordinator, ray.get(coordinator.channel.remote()), run.exchange.timeout_s)
        self.trainer.connect(open_link(run, self.trainer.plan, name, client))
        mappable = self.trainer.plan.coordinator_only[name]
        if mappable and device == "cpu":
            self._map_parameters(coordinator, mappable, coordinator_name.rsplit("-", 1)[-1])
        # A fresh run starts with no checkpoint of its own; a resumed run, or the new process the driver
        # starts for a member whose process died, continues from its newest one, metrics not yet
        # written included.
        self.restored_from = None
        self.outbox = MetricsOutbox()
        self.evaluated: dict[str, float] = {}  # the newest held-out metrics (what population-based training ranks by)
        self.last_step_metrics: dict[str, float] = {}
        saved = steps_of(run_dir, name)
        if saved:
            state = load_checkpoint(checkpoint_path(run_dir, name, saved[-1]))
            self.trainer.load_state_dict(state)
            self.outbox = MetricsOutbox(state.get("metrics", []))
            self.evaluated, self.last_step_metrics = dict(state.get("evaluated", {})), dict(state.get("last_step_metrics", {}))
            self.restored_from = saved[-1]
            if self.trainer.rollback_point is not None:
                self.trainer.set_rollback_point(saved[-1], state)
        self.system_metrics = system_metrics
        self.last_system_sample = float("-inf")
        self.logging_ms = 0.0  # the last step's logging time, reported with the next step's profile
        self.placement = {
            "node_id": _node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": device,
            "gpu_ids": ",".join(map(str, gpu_ids)),
            "torch_threads": torch.get_num_threads(),
            "shared_params": len(self.trainer.mapped),  # parameters in memory mapped by the coordinator
        }

    def _map_parameters(self, coordinator, names: list[str], run_tag: str) -> None:
        """Keep ``names`` in memory the coordinator maps when it is on this node (see
        :mod:`poptrain.mapped_memory`); else, or without room in ``/dev/shm``, send copies."""
        name = self.trainer.name
        layout = mapped_memory.map_parameters(self.trainer.params, names, f"{run_tag}-{name}", _node_id())
        if layout is None:
            return
        if ray.get(coordinator.attach.remote(name, layout)):
            self.trainer.mapped = {Quantity(name, "param", n) for n in names}
        else:
            mapped_memory.release(layout)

    def restored_step(self) -> int | None:
        return self.restored_from

    def info(self) -> dict[str, Any]:
        return dict(self.placement)

    def train(self, until_step: int) -> dict[str, float]:
        """Train up to ``until_step``; metrics go to the outbox. Returns the last step's metrics."""
        trainer, run = self.trainer, self.trainer.run
        metrics: dict[str, float] = self.last_step_metrics  # the last step's (what a training metric ranks by)
        checkpoint_ms = 0.0
        while trainer.step < until_step:
            step = trainer.step
            checkpoint_ms = self._checkpoint_if_due(step, metrics) or checkpoint_ms
            if step and run.evaluation.every and step % run.evaluation.every == 0:
                self.evaluated = self._evaluate(step)
            if step and trainer.hyperparameters is not None and step % run.pbt.every == 0:
                self._pbt_round(step, metrics)
            trainer.timings = dict.fromkeys(trainer.timings, 0.0)
            started = time.perf_counter()
            metrics = trainer.train_step()
            if run.tracking.profile:
                step_ms = 1000 * (time.perf_counter() - started)
                metrics.update({f"profile/{k}": v for k, v in trainer.timings.items()})
                metrics["profile/compute_ms"] = step_ms - sum(trainer.timings.values())
                metrics["profile/logging_ms"], metrics["profile/checkpoint_ms"] = self.logging_ms, checkpoint_ms
                checkpoint_ms = 0.0
            self._log(step, metrics, last=trainer.step == until_step)
        if trainer.step == run.steps:
            trainer.finish()
            metrics.update(self._evaluate(run.steps))  # after the last exchange: an average's target has its final weights
        # The last pipelined publishes: done before train() returns, so their coupling metrics are
        # in the coordinator's outbox when the driver takes it for the last time.
        trainer.link.drain()
        if self.reporting is not None:
            ray.get(self.reporting)
            self.reporting = None
        return metrics

    def _pbt_round(self, step: int, last: dict[str, float]) -> None:
        """Population-based training at ``step``: hand the coordinator this member's score (its newest
        held-out metric, or its last step's training metric) and a reference to its state; copy the
        donor the round decides, if any, in memory, and log the exploit."""
        from poptrain.pbt import ranking, transferable

        trainer = self.trainer
        metric, _ = ranking(trainer.run)
        score = (self.evaluated if metric.startswith("eval/") else last).get(metric)
        state = [ray.put(transferable(trainer.state_dict()))]  # in a list: Ray hands the reference on, unresolved
        decision = ray.get(self.coordinator.pbt_round.remote(step, trainer.name, score, trainer.hyperparameters.get(), state))
        if decision is None:
            return
        trainer.exploit(decision["donor"], ray.get(decision["state"][0]), decision["new_hyperparameters"])
        names = trainer.run.member_names
        now = int(time.time() * 1000)
        self.outbox.add([("pbt/exploited", 1.0, step, now), ("pbt/donor_index", float(names.index(decision["donor"])), step, now),
                         ("pbt/score", float(decision["receiver_score"]), step, now), ("pbt/donor_score", float(decision["donor_score"]), step, now)])

    def _evaluate(self, step: int) -> dict[str, float]:
        """Evaluate the member on its held-out data after ``step`` steps (before step ``step``'s own
        exchanges: an averaging target holds the previous exchange's average; at the end, after the
        last one): its metrics into the outbox, its outputs to the coordinator (population
        summaries, the ensemble). The metrics, or {}."""
        if self.trainer.eval_dataset is None:
            return {}
        metrics, outputs, targets = self.trainer.evaluate()
        self.outbox.add([(key, value, step, int(time.time() * 1000)) for key, value in metrics.items()])
        if self.reporting is not None:  # at most one report in flight
            ray.get(self.reporting)
        ensemble = self.trainer.run.evaluation.ensemble  # outputs cross only for the ensemble
        self.reporting = self.coordinator.report_eval.remote(
            step, self.trainer.name, metrics, outputs.numpy() if ensemble else None, targets.numpy() if ensemble else None
        )
        return metrics

    def _checkpoint_if_due(self, step: int, last: dict[str, float]) -> float | None:
        """Write a checkpoint at ``step`` when one is due (not at 0, not the one just restored);
        the milliseconds it took, or None."""
        every, keep = self.trainer.run.checkpoint.every, self.trainer.run.checkpoint.keep
        if not every or step % every or step == self.restored_from or step == 0:
            return None
        started = time.perf_counter()
        # The metrics not yet in MLflow go into the checkpoint: a restart from it sends them again.
        state = self.trainer.state_dict()
        # With the last step's and the newest held-out metrics, which a restarted member ranks by.
        extra = {"metrics": self.outbox.unwritten(), "last_step_metrics": dict(last), "evaluated": dict(self.evaluated)}
        save_checkpoint({**state, **extra}, self.run_dir, self.trainer.name, step, keep)
        if self.trainer.rollback_point is not None:
            self.trainer.set_rollback_point(step, state)
        return 1000 * (time.perf_counter() - started)

    def _log(self, step: int, metrics: dict[str, float], last: bool) -> None:
        started = time.perf_counter()
        if self.system_metrics and time.monotonic() - self.last_system_sample >= SYSTEM_METRICS_EVERY_S:
            metrics.update(self._system_metrics())
        if step % self.trainer.run.tracking.log_every == 0 or last:
            now_ms = int(time.time() * 1000)
            self.outbox.add([(key, value, step, now_ms) for key, value in metrics.items()])
        self.logging_ms = 1000 * (time.perf_counter() - started)

    def _system_metrics(self) -> dict[str, float]:
        """CPU, memory (and GPU memory) of this member's process, under MLflow's `system/` prefix."""
        import psutil

        self.last_system_sample = time.monotonic()
        process = psutil.Process()
        out = {
            "system/cpu_utilization_percentage": process.cpu_percent(interval=None),
            "system/process_memory_rss_megabytes": process.memory_info().rss / 2**20,
            "system/system_memory_usage_percentage": psutil.virtual_memory().percent,
        }
        if self.trainer.device.type == "cuda":
            out["system/gpu_memory_allocated_megabytes"] = torch.cuda.memory_allocated(self.trainer.device) / 2**20
            out["system/gpu_memory_reserved_megabytes"] = torch.cuda.memory_reserved(self.trainer.device) / 2**20
        return out

    def take_metrics(self, written: bool, resend: bool = False) -> list[Item]:
        """The metrics since the last call; ``written``: everything taken before is in MLflow;
        ``resend``: the last reply was lost, send its items again."""
        return self.outbox.take(written, resend)

    def datasets(self) -> list[dict[str, Any]]:
        """The member's training and held-out data, as :func:`poptrain.build.describe_dataset` describes them."""
        trainer = self.trainer
        out = [describe_dataset(trainer.config.data, trainer.batches.dataset, "train")]
        if trainer.eval_dataset is not None:
            out.append(describe_dataset(trainer.held_out, trainer.eval_dataset, "eval"))
        return out

    def final_weights(self) -> dict[str, np.ndarray]:
        """The model's state_dict as NumPy arrays, to save as ``model.pt`` (bfloat16 as float32)."""
        return {k: numpy_copy(v) for k, v in self.trainer.model.state_dict().items()}

    def example_inputs(self, n: int = 4) -> np.ndarray | None:
        """A few inputs from the member's data (the logged model's input example); None for multi-input models."""
        dataset = self.trainer.batches.dataset
        batch = default_collate([dataset[i] for i in range(min(n, len(dataset)))])
        return numpy_copy(batch[0]) if len(batch) == 2 else None


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()
