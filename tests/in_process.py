"""Populations stepped in this process through the real coordinator
(:class:`poptrain.coordinator.coordinator.Coordinator`: its barrier, its rewrites) and the real links and
wire (:mod:`poptrain.exchange.wire`), without Ray's start-up: for behaviour that does not depend on
processes (guards, policies, stacking). Two shapes:

- :class:`InProcessPopulation`: one thread and one link per member, as one member per host.
  Members step at the same time on threads, so what a member draws at random during a step is
  not its own here (poptrain.training.randomness): keep such tests to members that draw nothing in their
  steps, or step a single member. Everything exchanged is recorded, so a test can check what a
  peer could ever have seen.
- :func:`one_host`: every member on one link, stepped together on this thread as a host steps
  its members (:func:`train_host`, poptrain.training.lockstep), stacked where the test forms groups."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from poptrain.config import RunConfig, load_config
from poptrain.coordinator.actor import InProcessClient, calls_in_flight, in_process_coordinator
from poptrain.coordinator.coordinator import Coordinator
from poptrain.driver.checks import inspect_population
from poptrain.exchange.links import Link, open_link
from poptrain.training.host import shared_by_members
from poptrain.training.lockstep import step_together
from poptrain.training.member import MemberTrainer


def _set_up(config: dict, one_host: bool = False) -> tuple[RunConfig, Coordinator, object, dict[str, MemberTrainer]]:
    """``config`` validated, its in-process coordinator and wire, and a trainer per member (not
    connected). ``one_host``: the members share one plan and one set of couplings, as a host's
    members do (they step one after another there; members stepped on threads build their own)."""
    cfg = load_config(config)
    population = inspect_population(cfg)
    coordinator, wire = in_process_coordinator(cfg, population)
    couplings, plan = shared_by_members(cfg, population) if one_host else (None, None)
    return cfg, coordinator, wire, {name: MemberTrainer(cfg, name, population, couplings=couplings, plan=plan) for name in cfg.member_names}


def one_host(config: dict, client: type[InProcessClient] = InProcessClient) -> tuple[list[MemberTrainer], Link]:
    """Every member of ``config`` as one host's: their trainers, in member order, connected on one
    link (through ``client``) to an in-process coordinator."""
    cfg, coordinator, wire, trainers = _set_up(config, one_host=True)
    link = open_link(cfg, coordinator.plan, client(coordinator, wire, 4))
    for trainer in trainers.values():
        trainer.connect(link)
    return list(trainers.values()), link


def train_host(units, link: Link, steps: int) -> list:
    """Step one host's ``units`` (trainers, or stacked groups of them) together ``steps`` times,
    then hand every stack's state back to its members; each step's metrics by unit."""
    from poptrain.training.stacked import StackedGroup

    out = []
    for _ in range(steps):
        out.append(step_together(units, [u.step_program() for u in units], link))
    for unit in units:
        if isinstance(unit, StackedGroup):
            unit.to_members()
    return out


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
        self.cfg, self.coordinator, wire, self.trainers = _set_up(config)
        self.client = RecordingClient(self, self.coordinator, wire, calls_in_flight(len(self.cfg.members)))
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
