"""Population-based training in memory: exploit copies the donor exactly, explore perturbs as asked,
nothing is exploited before the ranking metric exists, the schedule and every decision are in
MLflow, perturbed hyperparameters survive a restart, and couplings keep their guarantee."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import poptrain
from poptrain.config import Perturbation
from poptrain.pbt.policy import exploit_plan, explore, transferable
from tests.conftest import (
    PBT_LR,
    InBackground,
    assert_bitwise_equal,
    make_config,
    pbt_population,
    prelu_member,
    resume_in_a_process,
    run_killing_m2_once,
    run_killing_the_driver,
    started,
)
from tests.in_process import InProcessPopulation


def test_an_exploit_copies_the_donor_bitwise_and_gives_the_receiver_its_new_hyperparameters(base_config):
    pop = InProcessPopulation(base_config(**pbt_population(steps=4, every=2)))
    pop.train(3)
    donor, receiver = pop.trainers["m3"], pop.trainers["m1"]
    receiver.exploit("m3", transferable(donor.state_dict()), {"optimizer.lr": 0.02, "optimizer.kwargs.weight_decay": 0.0})
    assert all(torch.equal(a, b) for a, b in zip(receiver.weights().values(), donor.weights().values(), strict=True))
    theirs, mine = donor.optimizer.state_dict()["state"], receiver.optimizer.state_dict()["state"]
    assert all(torch.equal(theirs[i][k], mine[i][k]) for i in theirs for k in theirs[i]), "moments and step counts copied"
    assert receiver.batches.state_dict() == donor.batches.state_dict(), "and its data position"
    assert [g["lr"] for g in receiver.optimizer.param_groups] == [0.02] and receiver.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert donor.optimizer.param_groups[0]["lr"] == 0.01, "the donor keeps its own"
    assert receiver.lineage == [[3, "m3"]] and receiver.hyperparameters.get() == {"optimizer.lr": 0.02, "optimizer.kwargs.weight_decay": 0.0}


def test_a_rollback_after_an_exploit_restores_the_donors_copy_not_the_receivers_old_state(base_config):
    """`failure.nonfinite: rollback`: a bad step after an exploit goes back to what the receiver
    became there (its donor's weights, optimizer state and its new hyperparameters), not to its
    own state from before it (the initial one here: no checkpoint yet)."""
    pop = InProcessPopulation(base_config(**pbt_population(steps=8, every=2), failure={"nonfinite": "rollback"}))
    pop.train(3)
    donor, receiver = pop.trainers["m3"], pop.trainers["m1"]
    copied = copy.deepcopy(transferable(donor.state_dict()))  # as it travels in a run (the donor trains on)
    receiver.exploit("m3", copied, {"optimizer.lr": 0.02, "optimizer.kwargs.weight_decay": 0.0})
    with torch.no_grad():
        next(receiver.model.parameters()).fill_(float("nan"))  # its next step diverges
    pop.train(1)
    assert pop.metrics["m1"][-1]["skipped"] == 1.0 and pop.metrics["m1"][-1]["rollback"] == 3.0, "back to the exploit at step 3"
    assert all(torch.equal(copied["model"][k], v) for k, v in receiver.model.state_dict().items()), "the donor's weights"
    theirs, mine = copied["optimizer"]["state"], receiver.optimizer.state_dict()["state"]
    assert all(torch.equal(theirs[i][k], mine[i][k]) for i in theirs for k in theirs[i]), "and its optimizer state"
    assert receiver.hyperparameters.get() == {"optimizer.lr": 0.02, "optimizer.kwargs.weight_decay": 0.0}, "with the new hyperparameters"


def test_nobody_is_exploited_before_every_member_has_a_score_and_the_bottom_copies_the_top():
    order = ["a", "b", "c", "d"]
    assert exploit_plan({"a": 0.9, "b": None, "c": 0.1, "d": 0.5}, order, 0.25, True, random.Random(0)) == {}
    assert exploit_plan({"a": 0.9, "b": 0.2, "c": 0.1, "d": 0.5}, order, 0.25, True, random.Random(0)) == {"c": "a"}
    assert exploit_plan({"a": 0.9, "b": 0.2, "c": 0.1, "d": 0.5}, order, 0.5, False, random.Random(0)) in (
        {"a": "b", "d": "c"},
        {"a": "c", "d": "b"},
        {"a": "b", "d": "b"},
        {"a": "c", "d": "c"},
    )
    new, _ = explore({"optimizer.lr": 0.01, "loss_weight": 1.0}, {"optimizer.lr": Perturbation(factors=[0.8, 1.2])}, random.Random(1))
    assert new["optimizer.lr"] in (pytest.approx(0.008), pytest.approx(0.012)) and new["loss_weight"] == 1.0
    ranged, _ = explore({"optimizer.lr": 0.01}, {"optimizer.lr": Perturbation(range=(1e-4, 1e-2), log=True)}, random.Random(2))
    assert 1e-4 <= ranged["optimizer.lr"] <= 1e-2


def test_explore_draws_the_same_whatever_the_order_the_config_lists_the_hyperparameters_in():
    """A YAML mapping has no order: `pbt.hyperparameters` written in another order (as
    `yaml.safe_dump` sorts keys) is the same config, and must decide the same."""
    space = {"optimizer.lr": Perturbation(factors=[0.5, 2.0]), "optimizer.kwargs.weight_decay": Perturbation(values=[0.0, 0.001])}
    values = {"optimizer.lr": 0.03, "optimizer.kwargs.weight_decay": 0.0001}
    reordered = dict(reversed(space.items()))
    assert all(explore(values, space, random.Random(seed)) == explore(values, reordered, random.Random(seed)) for seed in range(20))


def test_members_that_cannot_copy_each_other_are_refused_before_anything_starts(base_config):
    from poptrain.config import ConfigError
    from poptrain.driver.checks import prepare

    settings = pbt_population(steps=4, every=2)
    settings["members"][1]["model"]["kwargs"]["num_nodes"] = 8
    with pytest.raises(ConfigError, match=r"pbt.members: members 'm1' and 'm2' have different parameters"):
        prepare(base_config(**settings))


# The hostile inputs of issue 25, each as one override of configs/pbt.yaml: refused by `poptrain
# check` (exit 2, one message naming the key), before anything starts.
@pytest.mark.parametrize(
    "override, key, reason",
    [
        ("{optimizer.lr: {factors: [-1.0]}}", "pbt.hyperparameters.optimizer.lr", "every factor must be positive"),
        ("{optimizer.lr: {factors: [0.0, 1.2]}}", "pbt.hyperparameters.optimizer.lr", "every factor must be positive"),
        ("{optimizer.lr: {values: [-0.01, 0.01]}}", "pbt.hyperparameters.optimizer.lr.values", "not a positive learning rate"),
        ("{optimizer.kwargs.weight_decay: {values: [-0.1]}}", "pbt.hyperparameters.optimizer.kwargs.weight_decay.values", "Invalid weight_decay value"),
        ("{optimizer.kwargs.eps: {range: [-1.0, 1.0]}}", "pbt.hyperparameters.optimizer.kwargs.eps.range", "Invalid epsilon value"),
        ("{optimizer.kwargs.nosuch: {factors: [0.8, 1.2]}}", "pbt.hyperparameters.optimizer.kwargs.nosuch", "'adam' has no option 'nosuch'; its options are ["),
        ("{optimizer.kwargs.betas: {factors: [0.8, 1.2]}}", "pbt.hyperparameters.optimizer.kwargs.betas", "not a number"),
        ("{loss_weight: {values: [1.0, -1.0]}}", "pbt.hyperparameters.loss_weight.values", "would maximize"),
        ("{optimizer.lr: {factors: [0.8], min: 0.1, max: 0.01}}", "pbt.hyperparameters.optimizer.lr", "`min` (0.1) is above `max` (0.01)"),
        ("{optimizer.lr: {factors: [0.8], min: -1.0}}", "pbt.hyperparameters.optimizer.lr.min", "not a positive learning rate"),
    ],
)
def test_explore_cannot_leave_a_hyperparameters_valid_domain_refused_before_anything_starts(capsys, override, key, reason):
    from poptrain.cli import main

    assert main(["check", str(Path(__file__).parent.parent / "configs" / "pbt.yaml"), f"pbt.hyperparameters={override}"]) == 2
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith(f"  - {key}: ") and reason in problems[0], err
    assert "Traceback" not in err


def test_a_draw_outside_min_max_is_bounded_and_one_the_optimizer_refuses_keeps_the_donors_value():
    space = {"optimizer.lr": Perturbation(factors=[2.0], max=0.05), "optimizer.kwargs.weight_decay": Perturbation(factors=[2.0])}
    new, adjusted = explore(
        {"optimizer.lr": 0.04, "optimizer.kwargs.weight_decay": 0.01},
        space,
        random.Random(0),
        lambda key, value: "too big" if value > 0.015 and "decay" in key else None,
    )
    assert new == {"optimizer.lr": 0.05, "optimizer.kwargs.weight_decay": 0.01}
    assert adjusted == {
        "optimizer.lr": {"drawn": 0.08, "set": 0.05, "reason": "outside [None, 0.05]"},
        "optimizer.kwargs.weight_decay": {"drawn": 0.02, "set": 0.01, "reason": "refused: too big; the donor's value is kept"},
    }


def test_a_round_records_what_explore_adjusted_in_the_exploit(base_config):
    """The coordinator's round (plain Python): the receiver gets the donor's lr doubled and bounded,
    and the exploit event (the tag on the receiver's run) says so."""
    from poptrain.config import load_config
    from poptrain.pbt.rounds import PBTRounds

    settings = pbt_population(
        steps=8, every=4, pbt={"every": 4, "quantile": 0.25, "metric": "loss", "hyperparameters": {"optimizer.lr": {"factors": [2.0], "max": 0.04}}}
    )
    rounds = PBTRounds(load_config(base_config(**settings)))
    for name, loss, lr in (("m1", 3.0, 0.0001), ("m2", 2.0, 0.003), ("m3", 1.0, 0.03), ("m4", 1.5, 0.01)):
        rounds.arrive(4, name, loss, {"optimizer.lr": lr}, state=[name])
    decision = rounds.decision(4, "m1")
    assert decision["donor"] == "m3" and decision["new_hyperparameters"] == {"optimizer.lr": 0.04}
    assert decision["adjusted"] == {"optimizer.lr": {"drawn": 0.06, "set": 0.04, "reason": "outside [None, 0.04]"}}
    assert rounds.decision(4, "m3") is None and rounds.events[0]["adjusted"] == decision["adjusted"]


@pytest.fixture(scope="module")
def pbt_run(ray_session, tmp_path_factory, tracking_uri):
    config = make_config(tmp_path_factory.mktemp("pbt"), tracking_uri, "pbt", name="pbt", **pbt_population(steps=16, every=5))
    config["tracking"]["plots"] = True  # the lineage plot
    return poptrain.run(config)


def test_every_exploit_and_the_whole_schedule_are_in_mlflow(pbt_run, tracking_uri):
    client = MlflowClient(tracking_uri)
    parent = client.get_run(pbt_run.run_id)
    assert "plots/lineage.png" in [a.path for a in client.list_artifacts(pbt_run.run_id, "plots")]
    events = json.loads((pbt_run.output_dir / "pbt_events.json").read_text())
    assert events and int(parent.data.tags["poptrain.pbt.exploits"]) == len(events)
    assert {e["step"] for e in events} <= {5, 10, 15}, "ranked every 5 steps, never at step 0"
    schedules = {}
    for name, run_id in pbt_run.member_run_ids.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "hp/optimizer.lr"))
        assert [s for s, _ in history] == list(range(16)), f"{name}: its learning rate at every logged step"
        schedules[name] = dict(history)
    for event in events:
        receiver, donor, step = event["receiver"], event["donor"], event["step"]
        assert schedules[receiver][step] in (pytest.approx(0.5 * schedules[donor][step - 1]), pytest.approx(2.0 * schedules[donor][step - 1])), event
        tags = client.get_run(pbt_run.member_run_ids[receiver]).data.tags
        logged = json.loads(tags[f"poptrain.pbt.exploit.{step}"])
        assert logged["donor"] == donor and logged["donor_score"] >= logged["receiver_score"]
        assert f"{step}:{donor}" in tags["poptrain.lineage"]
        exploited = {m.step for m in client.get_metric_history(pbt_run.member_run_ids[receiver], "pbt/exploited")}
        assert step in exploited


# The interrupted PBT runs below and their uninterrupted twin: rounds (and evaluations) every 20
# steps, a checkpoint every 10, so that a checkpoint follows each round's exploit.
RESTARTABLE_STEPS = 200
# The member restart's kill window, steps 60 to 160: several progress polls (0.1 s) even when the
# host is fast, and 40 steps before the end, so that m2 is still training when it is killed.
KILL_UNTIL = RESTARTABLE_STEPS - 40
MEMBERS = ("m1", "m2", "m3", "m4")


def restartable(output_dir, tracking_uri, name):
    return make_config(output_dir, tracking_uri, f"pbt-{name}", name=name, checkpoint={"every": 10}, **pbt_population(steps=RESTARTABLE_STEPS, every=20))


@pytest.fixture(scope="session")  # also read by this module's EARLY test, run last: built once
def pbt_uninterrupted(ray_session, tmp_path_factory, tracking_uri):
    """The PBT run never interrupted (its RunResult), with the settings of the interrupted ones."""
    return poptrain.run(restartable(tmp_path_factory.mktemp("pbt-clean"), tracking_uri, "clean"))


def test_perturbed_hyperparameters_survive_a_member_restart_bitwise(ray_session, tmp_path, tracking_uri, pbt_uninterrupted):
    """A member killed after the first exploits is restarted from its checkpoint and replays the
    rounds it missed: the run ends bitwise as the uninterrupted one, schedule included (#62173)."""

    clean = pbt_uninterrupted
    events = json.loads((clean.output_dir / "pbt_events.json").read_text())
    # Killed at step 60 or later, m2 restarts from a checkpoint (its newest, 50 or later) written
    # after an exploit of its own: it holds perturbed hyperparameters, which must come back.
    assert any(e["receiver"] == "m2" and e["step"] <= 40 for e in events), events
    restarted, _ = run_killing_m2_once(
        restartable(tmp_path, tracking_uri, "killed"), RESTARTABLE_STEPS, restarted=("m1", "m2"), from_step=60, until_step=KILL_UNTIL
    )  # four members on two cores: two hosts
    assert_bitwise_equal(restarted.output_dir, clean.output_dir, members=MEMBERS)
    client = MlflowClient(tracking_uri)
    for name in MEMBERS:
        a = [(m.step, m.value) for m in client.get_metric_history(clean.member_run_ids[name], "hp/optimizer.lr")]
        b = [(m.step, m.value) for m in client.get_metric_history(restarted.member_run_ids[name], "hp/optimizer.lr")]
        assert sorted(a) == sorted(b), name
    assert json.loads((restarted.output_dir / "pbt_events.json").read_text()) == events


def killed_driver(folder, uri):
    """The uninterrupted PBT run's config as a real `poptrain run` SIGKILLed with its Ray after step
    50's checkpoint, its folder then taken back to checkpoint 40, then `poptrain resume`, each a
    process of its own: (its run folder, each member's lineage in checkpoint 40)."""
    from poptrain.storage.checkpoint import checkpoint_path, discard_after, latest_complete_step, load_checkpoint

    config = restartable(folder / "runs", uri, "resumed")
    config["checkpoint"]["keep"] = 10  # checkpoint 40 is still there below (it changes nothing else)
    run_dir, _ = run_killing_the_driver(config, folder, 50)
    # As if the driver died right after round 40 was decided, before any later checkpoint was
    # complete: the run resumes from checkpoint 40 (written before round 40, after round 20), so it
    # must bring back round 20's exploit and decide round 40 again, exactly once.
    discard_after(run_dir, list(MEMBERS), 40)
    assert latest_complete_step(run_dir, list(MEMBERS)) == 40
    lineage = {m: load_checkpoint(checkpoint_path(run_dir, m, 40))["lineage"] for m in MEMBERS}
    resume_in_a_process(run_dir, folder)
    return run_dir, lineage


def start_killed_driver():
    return InBackground(killed_driver, "poptrain-pbt-killed-driver-")


def test_perturbed_hyperparameters_and_the_lineage_survive_a_driver_resume_bitwise(request, tmp_path, tracking_uri, pbt_uninterrupted):
    """Issue 17, item 5, the driver's half (#62173): a real `poptrain run` SIGKILLed with its Ray
    after an exploit and a checkpoint that follows it (its folder then taken back to checkpoint
    40, as if it had died right after round 40), then `poptrain resume`, ends as the uninterrupted
    run: the same weights bitwise, every member's schedule (hp/*) and metrics at every step
    exactly once, and every exploit of the run on the parent and the members' runs, those decided
    before the resumed checkpoint included, none twice."""
    from poptrain.storage.checkpoint import checkpoint_path, load_checkpoint

    work = started(request, start_killed_driver)  # its processes started with the session, beside the suite
    (run_dir, lineage), clean = work.result(), pbt_uninterrupted
    clean_events = json.loads((clean.output_dir / "pbt_events.json").read_text())
    assert [e["step"] for e in clean_events[:2]] == [20, 40], "rounds 20 and 40 exploit"
    assert lineage[clean_events[0]["receiver"]] == [[20, clean_events[0]["donor"]]], f"checkpoint 40 holds a post-exploit state: {lineage}"

    record = json.loads((run_dir / "run.json").read_text())
    client, clean_client = MlflowClient(work.uri), MlflowClient(tracking_uri)
    assert client.get_run(record["parent"]).info.status == "FINISHED"
    assert_bitwise_equal(run_dir, clean.output_dir, members=MEMBERS)
    tags = lambda client, run_id: {  # noqa: E731
        k: v for k, v in client.get_run(run_id).data.tags.items() if k.startswith(("poptrain.pbt.", "poptrain.lineage", "poptrain.weights_from"))
    }
    for name in MEMBERS:
        ours, theirs = record["members"][name], clean.member_run_ids[name]
        keys = set(clean_client.get_run(theirs).data.metrics)
        assert {"loss", "eval/accuracy", "hp/optimizer.lr", "hp/optimizer.kwargs.weight_decay"} <= keys
        assert set(client.get_run(ours).data.metrics) == keys, name
        for key in sorted(keys):
            history = sorted((m.step, m.value) for m in client.get_metric_history(ours, key))
            assert len({s for s, _ in history}) == len(history), f"{name}: {key} has a step twice"
            assert history == sorted((m.step, m.value) for m in clean_client.get_metric_history(theirs, key)), (
                f"{name}: {key} differs from the uninterrupted run's"
            )
            if key.startswith("hp/"):
                assert [s for s, _ in history] == list(range(RESTARTABLE_STEPS)), f"{name}: its schedule at every step exactly once"
        newest = RESTARTABLE_STEPS - 10  # the newest checkpoint, after the last round (190)
        assert (
            load_checkpoint(checkpoint_path(run_dir, name, newest))["hyperparameters"]
            == load_checkpoint(checkpoint_path(clean.output_dir, name, newest))["hyperparameters"]
        ), name
    events = json.loads((run_dir / "pbt_events.json").read_text())
    assert [(e["step"], e["receiver"]) for e in events] == sorted({(e["step"], e["receiver"]) for e in events}), "no exploit twice"
    assert events == clean_events, "every exploit, those before the resumed checkpoint included"
    parent = client.get_run(record["parent"]).data
    assert parent.tags["poptrain.pbt.exploits"] == str(len(clean_events))
    logged = json.loads(Path(client.download_artifacts(record["parent"], "pbt_events.json", str(tmp_path))).read_text())
    assert logged == clean_events, "the parent run's artifact too"
    for name in MEMBERS:
        assert tags(client, record["members"][name]) == tags(clean_client, clean.member_run_ids[name]), f"{name}: its exploits and lineage"
    for key in parent.metrics:
        steps = [m.step for m in client.get_metric_history(record["parent"], key)]
        assert len(steps) == len(set(steps)), f"parent: {key} has a step twice"


def test_couplings_see_a_receivers_new_weights_from_the_next_exchange_on(ray_session, tmp_path, tracking_uri):
    """Separation over three members: at the exploit step the coordinator measures the receiver's
    slope as its donor's (distance 0), one step earlier as its own; exactness between exploits is
    the coupling's own (tests/test_exactness.py)."""
    config = make_config(
        tmp_path,
        tracking_uri,
        "pbt-separation",
        name="pbt-separation",
        steps=30,
        members=[prelu_member(f"m{i + 1}", optimizer={"name": "adam", "lr": 0.01 * (i + 1)}) for i in range(3)],
        pbt={"every": 20, "metric": "loss", "quantile": 0.34, "hyperparameters": PBT_LR},
    )
    result = poptrain.run(config)
    (event,) = json.loads((result.output_dir / "pbt_events.json").read_text())
    pair = "-".join(sorted((event["receiver"], event["donor"])))
    distance = {m.step: m.value for m in MlflowClient(tracking_uri).get_metric_history(result.run_id, f"coupling/separation/distance/{pair}")}
    assert event["step"] == 20 and distance[20] == 0.0 and distance[19] > 0.0, (event, distance.get(19), distance.get(20))
