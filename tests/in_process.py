"""A population stepped in this process, one thread per member, through the real coordinator
(:class:`poptrain.coordinator.Coordinator`: its barrier, its rewrites) and the real links and
wire (:mod:`poptrain.exchange`), without Ray's start-up: for behaviour that does not depend on
processes (guards, policies). Members step at the same time on threads, so what a member draws at
random during a step is not its own here (poptrain.randomness): keep such tests to members that
draw nothing in their steps, or step a single member. Everything exchanged is recorded, so a test
can check what a peer could ever have seen."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from poptrain.checks import inspect_population
from poptrain.config import load_config
from poptrain.coordinator import InProcessClient, calls_in_flight, in_process_coordinator
from poptrain.exchange import open_link
from poptrain.member import MemberTrainer


class RecordingClient(InProcessClient):
    """An in-process client that keeps a copy of every value a member sends."""

    def __init__(self, population: InProcessPopulation, *args):
        super().__init__(*args)
        self.population = population

    def call(self, method, kind, step, members, packed, *rest):
        values = self.wire.unpack(packed)
        with self.population.lock:
            for member in members:
                self.population.sent.append((member, kind, step, {q: np.array(a, copy=True) for q, a in values.items() if q.member == member}))
        return super().call(method, kind, step, members, packed, *rest)


class InProcessPopulation:
    def __init__(self, config: dict, timeout_s: float = 30.0):
        config = {**config, "exchange": {"timeout_s": timeout_s, **config.get("exchange", {})}}
        self.cfg = load_config(config)
        population = inspect_population(self.cfg)
        self.coordinator, wire = in_process_coordinator(self.cfg, population)
        self.client = RecordingClient(self, self.coordinator, wire, calls_in_flight(len(self.cfg.members)))
        self.trainers = {name: MemberTrainer(self.cfg, name, population) for name in self.cfg.member_names}
        for trainer in self.trainers.values():
            trainer.connect(open_link(self.cfg, trainer.plan, self.client))
        self.metrics: dict[str, list[dict[str, float]]] = {name: [] for name in self.trainers}
        self.sent: list[tuple[str, str, int, dict]] = []  # (member, kind, step, values) of every exchange call
        self.lock = threading.Lock()

    def train(self, steps: int) -> None:
        """Step every member ``steps`` times; the first member error is raised here (its peers then
        are released from the barrier at once, as in a run)."""

        def loop(trainer: MemberTrainer) -> None:
            try:
                for _ in range(steps):
                    self.metrics[trainer.name].append(trainer.train_step())
            except Exception as exc:  # as the driver stops a run whose member failed
                self.coordinator.abort(f"member {trainer.name!r} failed: {exc}")
                raise

        with ThreadPoolExecutor(len(self.trainers)) as pool:
            futures = [pool.submit(loop, t) for t in self.trainers.values()]
        errors = [f.exception() for f in futures if f.exception() is not None]
        first = next((e for e in errors if type(e).__name__ != "ExchangeTimeout"), errors[0] if errors else None)
        if first is not None:
            raise first
