"""A population stepped in this process, one thread per member, through the coordinator's own
logic (:class:`poptrain.coordinator.Coordinator`): the real member code and the real exchange
rounds without Ray's start-up, for behaviour that does not depend on processes (guards, policies).
Everything exchanged is recorded, so a test can check what a peer could ever have seen."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from poptrain.config import load_config
from poptrain.coordinator import Coordinator
from poptrain.member import MemberTrainer
from poptrain.population import inspect_population


class InProcessPopulation:
    def __init__(self, config: dict):
        self.cfg = load_config(config)
        population = inspect_population(self.cfg)
        self.coordinator = Coordinator(self.cfg, population)
        self.trainers = {name: MemberTrainer(self.cfg, name, population) for name in self.cfg.member_names}
        self.metrics: dict[str, list[dict[str, float]]] = {name: [] for name in self.trainers}
        self.sent: list[tuple[str, str, int, dict]] = []  # (member, kind, step, values) of every exchange call
        self._rounds: dict[tuple[str, int], dict] = {}
        self._results: dict[tuple[str, int], dict] = {}
        self._lock = threading.Condition()
        self._failed = False

    def exchange(self, kind: str, step: int, member: str, values: dict) -> dict:
        with self._lock:
            self.sent.append((member, kind, step, {q: np.array(a, copy=True) for q, a in values.items()}))
            arrived = self._rounds.setdefault((kind, step), {})
            arrived[member] = values
            if len(arrived) == len(self.coordinator.plan.participants[kind]):
                self._results[(kind, step)], _ = self.coordinator.complete(kind, step, arrived)
                self._lock.notify_all()
            elif not self._lock.wait_for(lambda: (kind, step) in self._results or self._failed, timeout=30):
                raise TimeoutError(f"{member} waited for its peers at {kind} step {step}")
            if self._failed:
                raise RuntimeError("a peer failed")
            return self._results[(kind, step)]

    def train(self, steps: int) -> None:
        """Step every member ``steps`` times; the first member error is raised here."""

        def loop(trainer: MemberTrainer) -> None:
            try:
                for _ in range(steps):
                    self.metrics[trainer.name].append(trainer.train_step(self.exchange))
            except BaseException:
                with self._lock:
                    self._failed = True
                    self._lock.notify_all()
                raise

        with ThreadPoolExecutor(len(self.trainers)) as pool:
            futures = [pool.submit(loop, t) for t in self.trainers.values()]
        errors = [f.exception() for f in futures if f.exception() is not None]
        first = next((e for e in errors if not str(e) == "a peer failed"), errors[0] if errors else None)
        if first is not None:
            raise first
