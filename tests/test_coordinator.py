"""The coordinator's logic in plain Python (poptrain.coordinator), driven without Ray, in
milliseconds: the barrier, stand-ins for members that died, replay for restarted members, the
async board, and what a member keeps of its own."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from poptrain.checks import inspect_population
from poptrain.config import load_config
from poptrain.coordinator import AsyncBoard, Coordinator
from poptrain.couplings import Quantity
from poptrain.exchange import ExchangePlan, ExchangeTimeout
from tests.conftest import digits_member
from tests.in_process import InProcessPopulation

SLOPE = "activation.weight"


def slope(member: str, value: float) -> dict:
    return {Quantity(member, "param", SLOPE): np.array([value], dtype=np.float32)}


@pytest.fixture
def coordinator(base_config):
    """Seed 000's two members and their separation, checkpointed every 2 steps, 0.5 s barrier timeout."""

    def make(**changes) -> Coordinator:
        cfg = load_config(base_config(checkpoint={"every": 2}, exchange={"timeout_s": 0.5, **changes.pop("exchange", {})}, **changes))
        return Coordinator(cfg, inspect_population(cfg))

    return make


def in_thread(fn, *args):
    """Run ``fn(*args)`` on a thread; a function that joins it and returns its result (or raises)."""
    out = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the joining test
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()

    def join():
        thread.join(5)
        if "error" in out:
            raise out["error"]
        return out["value"]

    return join


def test_a_round_is_released_to_everyone_once_the_last_participant_arrives(coordinator):
    logic = coordinator()
    first = in_thread(logic.exchange, "param", 0, ("m1",), slope("m1", 0.25))
    second = logic.exchange("param", 0, ("m2",), slope("m2", 0.75))
    assert first() is second, "every member gets the same reply"
    assert set(second.values) == {Quantity("m1", "param", SLOPE), Quantity("m2", "param", SLOPE)}
    metrics = {key: value for key, value, *_ in logic.take_metrics(written=True)}
    assert metrics["coupling/separation"] == pytest.approx(1.5)


def test_a_member_waiting_for_a_peer_that_never_comes_times_out_naming_it(coordinator):
    logic = coordinator()
    with pytest.raises(ExchangeTimeout, match=r"member 'm1' waited 0.5 s for \['m2'\]"):
        logic.exchange("param", 0, ("m1",), slope("m1", 0.25))


def test_a_stopped_exchange_releases_waiting_members_at_once(coordinator):
    logic = coordinator(exchange={"timeout_s": 60})
    waiting = in_thread(logic.exchange, "param", 0, ("m1",), slope("m1", 0.25))
    logic.abort("member 'm2' failed")
    with pytest.raises(ExchangeTimeout, match="member 'm2' failed"):
        waiting()


def test_a_restarted_member_replays_a_finished_round_and_gets_what_it_got_the_first_time(coordinator):
    logic = coordinator()
    first = in_thread(logic.exchange, "param", 0, ("m1",), slope("m1", 0.25))
    reply = logic.exchange("param", 0, ("m2",), slope("m2", 0.75))
    first()
    # m2 restarted from its checkpoint sends step 0 again, with whatever values: its peer is gone.
    assert logic.exchange("param", 0, ("m2",), slope("m2", 123.0)) is reply


def test_with_continue_a_dead_member_s_last_values_stand_in_for_it(coordinator):
    logic = coordinator(failure={"while_restarting": "continue"})
    first = in_thread(logic.exchange, "param", 0, ("m1",), slope("m1", 0.25))
    logic.exchange("param", 0, ("m2",), slope("m2", 0.75))
    first()
    waiting = in_thread(logic.exchange, "param", 1, ("m1",), slope("m1", 0.5))
    logic.member_down("m2")  # the driver saw m2's process die
    reply = waiting()
    assert float(reply.values[Quantity("m2", "param", SLOPE)][0]) == 0.75, "m2's most recent values stand in"
    # m2 comes back from its checkpoint and replays behind m1 without making it wait.
    replay = logic.exchange("param", 0, ("m2",), slope("m2", 0.75))
    assert float(replay.values[Quantity("m1", "param", SLOPE)][0]) == 0.25, "the step-0 round's reply, m1's value of that step"


def test_an_older_async_publish_never_replaces_a_newer_one():
    board = AsyncBoard({"param": ["m1", "m2"], "loss": [], "grad": []}, max_staleness=1, every=1)
    assert board.post("param", 3, "m1", slope("m1", 3.0))
    # Two publishes of one member handled on different threads, the older one last.
    assert not board.post("param", 2, "m1", slope("m1", 2.0))
    board.post("param", 3, "m2", slope("m2", 1.0))
    reply = board.peers("param", ("m2",))
    assert reply.steps == {"m1": 3} and float(reply.values[Quantity("m1", "param", SLOPE)][0]) == 3.0
    assert board.behind("param", "m2", used_at=5) == {"m1": 3}, "more than max_staleness exchanges old"


def test_in_async_mode_parameters_only_the_coordinator_reads_still_travel(base_config):
    # Seed 000 routed one way: m1's slope is read only by the coordinator; mapped memory, which
    # the async path never reads, would leave the separation unevaluated on the parent run.
    routed = [{"type": "separation", "param": SLOPE, "margin": 2.0, "trains": ["m1"]}]
    for mode, mapped in (("sync", ["activation.weight"]), ("async", [])):
        cfg = load_config(base_config(couplings=routed, exchange={"mode": mode}))
        assert ExchangePlan.for_run(cfg, inspect_population(cfg)).coordinator_only["m1"] == mapped


def test_a_member_keeps_what_it_sent_only_where_a_non_finite_step_can_go_on(base_config):
    """Under `skip` a member keeps the values it sent last (its peers get them again after a
    non-finite step), in its checkpoint too; under `fail` the run stops instead: nothing kept."""
    from poptrain.member import quantity_key

    for policy, kept in (("fail", False), ("skip", True)):
        population = InProcessPopulation(base_config(failure={"nonfinite": policy}))
        population.train(2)
        last_sent = population.trainers["m1"].state_dict()["last_sent"]
        (sent,) = [values for member, _, step, values in population.sent if member == "m1" and step == 1]
        expected = {quantity_key(q): a for q, a in sent.items()} if kept else {}
        assert last_sent.keys() == expected.keys(), policy
        for key, array in expected.items():
            assert np.array_equal(last_sent[key].numpy(), array), f"{policy}: {key} is what m1 sent at step 1"


def test_a_member_s_results_do_not_depend_on_other_randomness_in_its_process(base_config):
    """Initialisation, dropout and data draw from the member's own streams: a process that draws
    random numbers between the member's steps (as a packed peer would) changes nothing."""
    member = digits_member("m1", model_kwargs={"dropout": 0.3}, data_kwargs={"limit": 128}, batch_size=16)
    config = base_config(members=[member], couplings=[])

    def trained(disturb: bool) -> dict[str, torch.Tensor]:
        if disturb:
            torch.rand(7), np.random.rand(3), random.random()
        population = InProcessPopulation(config)
        trainer = population.trainers["m1"]
        for _ in range(4):
            trainer.train_step()
            if disturb:
                torch.rand(5), np.random.rand(2), random.random()
        return trainer.weights()

    quiet, disturbed = trained(False), trained(True)
    assert quiet.keys() == disturbed.keys() and "head.weight" in quiet
    for key in quiet:
        assert torch.equal(quiet[key], disturbed[key]), key
    before = torch.get_rng_state()
    InProcessPopulation(config).trainers["m1"].train_step()
    assert torch.equal(torch.get_rng_state(), before), "a member's step leaves the process's own stream alone"

