"""The coordinator's logic in plain Python (poptrain.coordinator.coordinator), driven without Ray, in
milliseconds: the barrier, stand-ins for members that died, replay for restarted members, the
async board, what a member keeps of its own, and the parts on their own: stand-ins, the replay
history and population-based training's rounds."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch

from poptrain.config import load_config
from poptrain.coordinator.barrier import AsyncBoard, ReplayHistory, Round, StandIns
from poptrain.coordinator.coordinator import Coordinator
from poptrain.couplings import Quantity
from poptrain.driver.checks import inspect_population
from poptrain.exchange.wire import ExchangePlan, ExchangeTimeout
from poptrain.pbt.rounds import PBTRounds
from tests.conftest import digits_member, pbt_population
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
        if thread.is_alive():
            raise TimeoutError(f"{fn.__name__} did not return within 5 s")
        if "error" in out:
            raise out["error"]
        return out["value"]

    join.done = lambda: not thread.is_alive()  # type: ignore[attr-defined]
    return join


def test_a_round_is_released_to_everyone_once_the_last_participant_arrives(coordinator):
    logic = coordinator()
    first = in_thread(logic.exchange, "param", 0, ("m1",), slope("m1", 0.25))
    second = logic.exchange("param", 0, ("m2",), slope("m2", 0.75))
    assert first() is second, "every member gets the same reply"
    assert set(second.values) == {Quantity("m1", "param", SLOPE), Quantity("m2", "param", SLOPE)}
    metrics = {key: value for key, value, *_ in logic.take_metrics(written=True)}
    assert metrics["coupling/separation"] == pytest.approx(1.5)


def hold_back_metrics(logic: Coordinator, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the separation coupling's parent-run metrics wait: (set once they are being computed,
    to set to let them finish)."""
    separation = type(logic.evaluator.couplings[0])
    computing, release = threading.Event(), threading.Event()
    metrics_of = separation.metrics

    def held_back(self, step, q):
        computing.set()
        assert release.wait(10)
        return metrics_of(self, step, q)

    monkeypatch.setattr(separation, "metrics", held_back)
    return computing, release


def test_the_member_completing_a_round_gets_its_reply_before_the_rounds_metrics_are_computed(coordinator, monkeypatch):
    """The parent run's coupling metrics of a round are computed after every member has its reply,
    the one that completed the round too; the driver's next take has them; a coupling whose
    metrics fail fails every member's next exchange."""
    logic = coordinator()
    computing, release = hold_back_metrics(logic, monkeypatch)
    first = in_thread(logic.exchange, "param", 0, ("m1",), slope("m1", 0.25))
    completing = in_thread(logic.exchange, "param", 0, ("m2",), slope("m2", 0.75))
    assert completing() is first(), "both replies came while the metrics were still being computed"
    assert computing.wait(5) and not release.is_set()
    taken = in_thread(logic.take_metrics, True)
    release.set()
    assert {key for key, *_ in taken()} >= {"coupling/separation", "coupling/separation/distance/m1-m2"}

    def failing_metrics(self, step, q):
        raise RuntimeError("metrics failed")

    monkeypatch.setattr(type(logic.evaluator.couplings[0]), "metrics", failing_metrics)
    in_thread(logic.exchange, "param", 1, ("m1",), slope("m1", 0.25))
    logic.exchange("param", 1, ("m2",), slope("m2", 0.75))  # its metrics fail on the recording thread
    for member, value in (("m1", 0.25), ("m2", 0.75)):
        with pytest.raises(RuntimeError, match="metrics failed"):
            logic.exchange("param", 2, (member,), slope(member, value))


def test_a_rounds_metrics_are_of_its_own_values_however_soon_the_next_round_comes(coordinator):
    """The next round completes only once the last round's metrics are recorded: they are computed
    from that round's values, never the next one's, however late their thread gets to them."""
    logic = coordinator()
    release = threading.Event()
    logic.recording.submit(release.wait, 10)  # the recording thread busy: round 0's metrics wait behind this
    first = in_thread(logic.exchange, "param", 0, ("m1",), slope("m1", 0.25))
    logic.exchange("param", 0, ("m2",), slope("m2", 0.75))  # separation 1.5
    first()
    early = in_thread(logic.exchange, "param", 1, ("m1",), slope("m1", 0.0))
    late = in_thread(logic.exchange, "param", 1, ("m2",), slope("m2", 1.75))  # separation 0.25
    time.sleep(0.2)
    assert not early.done() and not late.done(), "round 1 waits for round 0's metrics"
    release.set()
    early(), late()
    logged = {(key, step): value for key, value, step, _ in logic.take_metrics(True)}
    assert logged[("coupling/separation", 0)] == pytest.approx(1.5) and logged[("coupling/separation", 1)] == pytest.approx(0.25)


def test_at_the_exchange_before_a_checkpoint_the_rounds_metrics_are_saved_before_the_reply(base_config, tmp_path, monkeypatch):
    """A complete checkpoint at step c holds the parent run's metrics of the steps before it: at the
    last exchange before c the completing member's reply waits for them, and they are on disk."""
    from poptrain.storage.checkpoint import load_coordinator_metrics

    cfg = load_config(base_config(checkpoint={"every": 2}, exchange={"timeout_s": 5}))
    logic = Coordinator(cfg, inspect_population(cfg), run_dir=str(tmp_path))
    computing, release = hold_back_metrics(logic, monkeypatch)
    first = in_thread(logic.exchange, "param", 1, ("m1",), slope("m1", 0.25))  # step 1: the last exchange before checkpoint step 2
    completing = in_thread(logic.exchange, "param", 1, ("m2",), slope("m2", 0.75))
    assert computing.wait(5)
    first()
    assert not completing.done(), "the completing member waits for the metrics to be saved"
    release.set()
    completing()
    assert {(key, step) for key, _, step, _ in load_coordinator_metrics(tmp_path)} >= {("coupling/separation", 1)}


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
    from poptrain.training.member import quantity_key

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


def test_a_member_s_random_streams_come_back_exactly_from_its_checkpoint_in_either_form():
    """Python's Mersenne Twister state goes into a checkpoint as one tensor of its 625 words (a
    checkpoint loads with ``weights_only=True``); a checkpoint written before, with the words as a
    tuple, loads as well. Either way the member draws on exactly where it was."""
    import io

    from poptrain.training.randomness import MemberRandomness

    streams = MemberRandomness(1234, torch.device("cpu"))
    with streams.active():
        random.random(), np.random.rand(), torch.rand(3)
    saved = streams.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    as_tensor = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    as_tuple = {**saved, "python": (saved["python"][0], tuple(saved["python"][1].tolist()), saved["python"][2])}
    with streams.borrowed():
        expected = (random.random(), np.random.rand(), torch.rand(3))
    for state in (as_tensor, as_tuple):
        restored = MemberRandomness(99, torch.device("cpu"))
        restored.load_state_dict(state)
        with restored.active():
            drawn = (random.random(), np.random.rand(), torch.rand(3))
        assert drawn[:2] == expected[:2] and torch.equal(drawn[2], expected[2])


# -- the coordinator's parts on their own: stand-ins, the replay history, PBT's rounds -----------


def test_stand_ins_fill_a_round_only_for_lagging_members_with_their_most_recent_values():
    stand_ins = StandIns(enabled=True, checkpoint_every=10)
    for step, value in ((3, 0.25), (4, 0.75)):
        stand_ins.note("param", step, "m2", slope("m2", value))
    rnd = Round(expected=["m1", "m2"], values={"m1": slope("m1", 1.0)})
    assert stand_ins.fill("param", rnd) is None, "m2 is missing but not known to be down: the round waits for it"
    stand_ins.down("m2")
    filled = stand_ins.fill("param", rnd)
    assert filled.keys() == {"m1", "m2"} and filled["m1"] is rnd.values["m1"]
    assert float(filled["m2"][Quantity("m2", "param", SLOPE)][0]) == 0.75, "its most recent values, not older ones"
    assert stand_ins.fill("loss", Round(expected=["m1", "m2"], values={"m1": {}})) is None, "nothing of this kind to stand in with"
    stand_ins.caught_up("m2")
    assert stand_ins.fill("param", rnd) is None, "back at its peers' step: they wait for it again"


def test_stand_ins_are_off_unless_members_may_continue_while_a_peer_restarts():
    stand_ins = StandIns(enabled=False, checkpoint_every=10)
    stand_ins.note("param", 4, "m2", slope("m2", 0.4))
    stand_ins.down("m2")
    assert stand_ins.fill("param", Round(expected=["m1", "m2"], values={"m1": slope("m1", 1.0)})) is None
    complete = Round(expected=["m1", "m2"], values={"m1": slope("m1", 1.0), "m2": slope("m2", 2.0)})
    assert stand_ins.fill("param", complete) == complete.values


@pytest.mark.parametrize(
    "checkpoint_every, last_step, pinned",
    [
        (10, 25, 10),  # checkpoints at 10 and 20: the one before the newest, in case it died writing 20
        (10, 30, 20),
        (10, 5, 0),  # no checkpoint before the newest: from the start
        (0, 7, 6),  # checkpoints off: every step counts as one
    ],
)
def test_a_member_down_pins_the_round_of_the_checkpoint_it_will_replay_from(checkpoint_every, last_step, pinned):
    stand_ins = StandIns(enabled=True, checkpoint_every=checkpoint_every)
    stand_ins.note("param", last_step, "m2", slope("m2", 0.0))
    stand_ins.down("m2")
    assert stand_ins.pinned == {"m2": pinned} and stand_ins.lagging == {"m2"}


def test_a_replaying_member_moves_its_pin_on_and_unpins_once_caught_up():
    stand_ins = StandIns(enabled=True, checkpoint_every=10)
    stand_ins.note("param", 25, "m2", slope("m2", 0.0))
    stand_ins.down("m2")
    stand_ins.replayed("m2", 14)
    stand_ins.replayed("m1", 14)  # m1 never went down: nothing of it is pinned
    assert stand_ins.pinned == {"m2": 14}
    stand_ins.caught_up("m2")
    assert stand_ins.pinned == {} and stand_ins.lagging == set()


def test_the_replay_history_keeps_the_replies_of_its_last_steps_by_kind():
    history = ReplayHistory(steps=4)
    replies = {(kind, step): object() for step in range(10) for kind in ("param", "loss")}
    for (kind, step), reply in replies.items():
        history.remember(kind, step, reply, pinned=[])
    for (kind, step), reply in replies.items():
        if step >= 9 - 4:
            assert history.get(kind, step) is reply, "exactly the reply the members got the first time"
        else:
            assert history.get(kind, step) is None, (kind, step)


def test_the_replay_history_keeps_every_round_from_a_pinned_step_until_the_pin_is_released():
    history = ReplayHistory(steps=2)
    for step in range(8):
        history.remember("param", step, f"reply {step}", pinned=[1])
    assert [history.get("param", step) for step in range(8)] == [None] + [f"reply {step}" for step in range(1, 8)]
    history.remember("param", 8, "reply 8", pinned=[])
    assert [step for step in range(9) if history.get("param", step) is not None] == [6, 7, 8]


def test_without_checkpoints_the_replay_history_keeps_nothing():
    history = ReplayHistory(steps=0)
    history.remember("param", 0, "reply", pinned=[0])
    assert history.get("param", 0) is None and history.completed == {}


def pbt_rounds(base_config, run_dir=None, **changes) -> PBTRounds:
    """PBT's rounds of tests.conftest's four-member population (exploit the bottom quarter, every 2 steps)."""
    return PBTRounds(load_config(base_config(**pbt_population(steps=20, every=2, **changes))), run_dir)


def hyperparameters(lr: float) -> dict[str, float]:
    return {"optimizer.lr": lr, "optimizer.kwargs.weight_decay": 0.0001}


def arrive_all(rounds: PBTRounds, step: int, scores: dict[str, float | None], order=("m1", "m2", "m3", "m4")) -> list[bool]:
    """Every member arrives at round ``step`` with its score, lr 0.01 * its number and a state of its own; what each arrive returned."""
    return [rounds.arrive(step, m, scores[m], hyperparameters(0.01 * int(m[1:])), f"state of {m} at {step}") for m in order]


SCORES = {"m1": 0.1, "m2": 0.5, "m3": 0.9, "m4": 0.3}  # held-out accuracy: m3 best, m1 worst


def test_a_pbt_round_is_decided_once_every_member_has_arrived_the_worst_copying_a_better_one(base_config):
    rounds = pbt_rounds(base_config)
    assert arrive_all(rounds, 2, SCORES) == [False, False, False, True]
    exploit = rounds.decision(2, "m1")
    assert (exploit["receiver"], exploit["donor"], exploit["state"]) == ("m1", "m3", "state of m3 at 2"), "the bottom quarter copies the top quarter"
    assert (exploit["metric"], exploit["receiver_score"], exploit["donor_score"]) == ("eval/accuracy", 0.1, 0.9)
    assert exploit["old_hyperparameters"] == hyperparameters(0.01)
    new = exploit["new_hyperparameters"]
    assert new["optimizer.lr"] in (pytest.approx(0.03 * 0.5), pytest.approx(0.03 * 2.0)), "the donor's lr, halved or doubled"
    assert new["optimizer.kwargs.weight_decay"] in (0.0, 0.001)
    assert [rounds.decision(2, m) for m in ("m2", "m3", "m4")] == [None, None, None]
    assert rounds.events == [{k: v for k, v in exploit.items() if k != "state"}], "every exploit is an event"


def test_a_pbt_round_on_a_loss_copies_the_member_with_the_lowest(base_config):
    rounds = pbt_rounds(base_config, pbt={"every": 2, "quantile": 0.25, "metric": "loss", "hyperparameters": {"optimizer.lr": {"factors": [2.0]}}})
    arrive_all(rounds, 2, SCORES)
    assert rounds.decision(2, "m3")["donor"] == "m1" and rounds.decision(2, "m3")["metric"] == "loss"
    assert rounds.decision(2, "m3")["new_hyperparameters"]["optimizer.lr"] == pytest.approx(0.02), "m1's lr, doubled"


def test_a_pbt_round_decides_the_same_whatever_order_the_members_arrive_in(base_config):
    """A round's generator is the run's seed and the round's step: a resumed run decides again as the first did."""
    first, second = pbt_rounds(base_config), pbt_rounds(base_config)
    arrive_all(first, 2, SCORES)
    arrive_all(second, 2, SCORES, order=("m4", "m3", "m1", "m2"))
    assert first.events == second.events and len(first.events) == 1


def test_no_member_is_exploited_while_a_score_is_missing(base_config):
    rounds = pbt_rounds(base_config)
    assert arrive_all(rounds, 2, {**SCORES, "m2": None}) == [False, False, False, True], "decided, with no exploit"
    assert [rounds.decision(2, m) for m in SCORES] == [None] * 4 and rounds.events == []


def test_a_member_replaying_a_decided_round_gets_the_decision_it_got_the_first_time(base_config):
    rounds = pbt_rounds(base_config)
    arrive_all(rounds, 2, SCORES)
    first = rounds.decision(2, "m1")
    # Restarted from its checkpoint, m1 replays round 2 with what it had then (or anything else): nothing is decided again.
    assert rounds.arrive(2, "m1", 0.99, hyperparameters(0.5), "m1's replayed state") is True
    assert rounds.decision(2, "m1") == first and len(rounds.events) == 1


def test_donor_states_stay_referenced_for_the_rounds_a_restarted_member_may_replay(base_config):
    """A member restarts from the checkpoint before its newest: it may replay 2 * checkpoint.every
    steps of rounds, whose donors' states must still be here; older ones are let go."""
    rounds = pbt_rounds(base_config, checkpoint={"every": 4})  # rounds every 2 steps: 2 * 4 / 2 + 1 = 5 rounds kept
    for step in range(2, 11, 2):
        arrive_all(rounds, step, SCORES)
    assert rounds.decision(2, "m1")["state"] == "state of m3 at 2", "five rounds: the first is still kept"
    arrive_all(rounds, 12, SCORES)
    with pytest.raises(RuntimeError, match="replays the population-based-training round at step 2, whose donor state is no longer kept"):
        rounds.decision(2, "m1")
    assert rounds.decision(2, "m2") is None, "a member that copied nobody needs no state"
    assert rounds.decision(4, "m1")["state"] == "state of m3 at 4"


def test_pbt_decisions_are_written_beside_the_checkpoints_and_a_resumed_run_keeps_those_before_its_own(base_config, tmp_path):
    import json

    from poptrain.storage.checkpoint import pbt_events_path, save_checkpoints

    rounds = pbt_rounds(base_config, run_dir=str(tmp_path), checkpoint={"every": 4})
    for step in (2, 4, 6):
        arrive_all(rounds, step, SCORES)
    assert json.loads(pbt_events_path(tmp_path).read_text()) == rounds.events and len(rounds.events) == 3
    save_checkpoints([(m, {"step": 4}) for m in SCORES], tmp_path, 4, keep=2)  # every member's checkpoint at step 4
    resumed = pbt_rounds(base_config, run_dir=str(tmp_path), checkpoint={"every": 4})
    assert resumed.events == rounds.events[:1], "round 2's exploit is before the checkpoint; rounds 4 and 6 are decided again"
