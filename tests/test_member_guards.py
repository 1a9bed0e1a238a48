"""A member's guards, checked on the real member and coordinator code stepped in this process
(tests/in_process.py): terms that train nothing, and non-finite values under each policy.
The same guards inside Ray actors are covered by test_failures.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poptrain.training.member import TrainingError
from tests.conftest import prelu_member
from tests.in_process import InProcessPopulation


def poisoned(**changes):
    """Seed 000's member whose second batch (step 1) holds a NaN sample."""
    data = {"name": "tests.helpers:poisoned_data", "kwargs": {"bad_index": 40}, "batch_size": 32, "shuffle": False}
    return prelu_member("m1", data=data, **changes)


def sent_by(population: InProcessPopulation, member: str) -> list[tuple[str, int]]:
    """(kind, step) of every exchange ``member`` sent values at, in order; every value it sent is
    asserted finite (what a peer could ever have seen of it)."""
    calls = []
    for name, kind, step, values in population.sent:
        if name == member:
            assert values and all(np.isfinite(a).all() for a in values.values()), f"{member} sent a non-finite value at {kind} {step}"
            calls.append((kind, step))
    return calls


def params_at(*steps: int) -> list[tuple[str, int]]:
    return [("param", step) for step in steps]


def test_a_member_alone_reads_its_device_once_a_step(base_config, device_reads):
    """On a GPU every read of a tensor's value waits for the work queued there: a step that neither
    exchanges nor logs reads whether its terms, couplings and gradients are finite, and its
    metrics' values, at once (one by one, these two members read 14 values), counted on the CPU,
    where the same code runs. (With SGD: torch's Adam reads its step counter, which it keeps on
    the CPU for a GPU member too.)"""
    sgd = {"name": "sgd", "lr": 0.01}
    m1 = prelu_member("m1", optimizer=sgd, terms=[{"name": "l2", "fn": "param_l2", "weight": 0.01}])
    tracking = {"log_every": 10, "plots": False, "log_models": False}
    population = InProcessPopulation(base_config(members=[m1, prelu_member("m2", optimizer=sgd)], exchange={"every": 10}, tracking=tracking))
    population.train(1)  # step 0 exchanges and is logged
    reads = device_reads()
    population.train(1)
    assert reads == ["tolist", "tolist"], "one read a member"
    assert {"loss", "objective", "term/l2", "coupling/separation"} <= set(population.metrics["m1"][1])


def test_a_term_that_trains_nothing_is_stopped_at_the_first_step(base_config):
    # Seed 001's loss2, rebuilt with torch.tensor(...): added to the loss, it trains nothing.
    member = prelu_member("m1", terms=[{"name": "weights", "fn": "detached_param_sum", "weight": -1.0}])
    population = InProcessPopulation(base_config(members=[member, prelu_member("m2")], couplings=[]))
    with pytest.raises(TrainingError, match=r"member 'm1', step 0: term 'weights' has no gradient path"):
        population.train(1)


def test_a_nan_loss_fails_naming_member_step_and_term_before_anything_is_sent(base_config):
    population = InProcessPopulation(base_config(members=[poisoned(), prelu_member("m2")]))
    with pytest.raises(TrainingError, match=r"member 'm1', step 1: non-finite term 'loss'"):
        population.train(3)
    # Its slope is sent at the start of each step, before the forward pass: step 1's is still finite.
    assert sent_by(population, "m1") == params_at(0, 1), "its slopes at steps 0 and 1, nothing after the failure"


def test_a_finite_loss_with_a_non_finite_gradient_is_caught_before_the_optimizer_step(base_config):
    term = {"name": "sqrt0", "fn": "tests.helpers:finite_term_with_nan_gradient"}
    member = prelu_member("m1", terms=[term])
    population = InProcessPopulation(base_config(members=[member, prelu_member("m2")], failure={"nonfinite": "skip"}))
    before = {k: v.clone() for k, v in population.trainers["m1"].model.state_dict().items()}
    population.train(2)
    assert [m.get("skipped") for m in population.metrics["m1"]] == [1.0, 1.0]
    assert all(torch.equal(before[k], v) for k, v in population.trainers["m1"].model.state_dict().items())
    assert sent_by(population, "m1") == params_at(0, 1), "its slope at both steps, finite"


def test_with_nonfinite_skip_the_poisoned_step_changes_nothing_and_no_peer_sees_a_nan(base_config):
    population = InProcessPopulation(base_config(members=[poisoned(), prelu_member("m2")], failure={"nonfinite": "skip"}))
    population.train(1)
    before = {k: v.clone() for k, v in population.trainers["m1"].model.state_dict().items()}
    population.train(1)  # step 1: the poisoned batch
    assert population.metrics["m1"][1].get("skipped") == 1.0
    after = population.trainers["m1"].model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step updates nothing"
    population.train(3)
    assert [i for i, m in enumerate(population.metrics["m1"]) if m.get("skipped")] == [1]
    assert sent_by(population, "m1") == params_at(*range(5)), "every step's slope, the skipped step's included, finite"
    assert all(torch.isfinite(t).all() for t in population.trainers["m1"].model.state_dict().values())


def test_with_nonfinite_rollback_a_poisoned_step_restores_the_last_good_state(base_config):
    # 8 batches an epoch, unshuffled: the poisoned batch comes at steps 1, 9, 17, ...
    population = InProcessPopulation(base_config(members=[poisoned(), prelu_member("m2")], failure={"nonfinite": "rollback"}))
    m1 = population.trainers["m1"]
    initial = {k: v.clone() for k, v in m1.model.state_dict().items()}
    population.train(2)
    assert population.metrics["m1"][1]["rollback"] == 0.0, "before any checkpoint: the initial state"
    assert all(torch.equal(initial[k], v) for k, v in m1.model.state_dict().items())
    assert m1.optimizer.state_dict()["state"] == {}, "the optimizer's state is the initial one too"

    population.train(6)  # steps 2..7
    m1.set_rollback_point(8, m1.state_dict())  # what the member actor does after a checkpoint at step 8
    good = {k: v.clone() for k, v in m1.model.state_dict().items()}
    population.train(2)  # step 8 trains, step 9 is poisoned
    assert population.metrics["m1"][9]["rollback"] == 8.0
    assert all(torch.equal(good[k], v) for k, v in m1.model.state_dict().items())
    population.train(3)
    assert not any(torch.equal(good[k], v) for k, v in m1.model.state_dict().items() if k != "activation.weight"), "training went on"
    assert sent_by(population, "m1") == params_at(*range(13)), "every step's slope, the rolled-back steps' included, finite"


def test_rollback_is_refused_with_a_coupling_that_keeps_copies_identical(base_config):
    from poptrain.config import ConfigError, load_config

    config = base_config(failure={"nonfinite": "rollback"}, couplings=[{"type": "share", "params": ["input.*"]}])
    with pytest.raises(ConfigError, match=r"couplings.0.type: 'share' keeps members' parameters identical.*nonfinite: skip"):
        load_config(config)


def test_with_nonfinite_fail_a_non_finite_value_is_never_sent_to_a_peer(base_config, tmp_path):
    """A finite loss but a NaN slope (from a corrupt `init`): the parameter exchange refuses to send it."""
    from poptrain.builtins.models import MLP

    model = MLP(20, 1, 40, "prelu")
    with torch.no_grad():
        model.activation.weight.fill_(float("nan"))
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    population = InProcessPopulation(base_config(members=[prelu_member("m1", init=str(tmp_path / "nan.pt")), prelu_member("m2")]))
    with pytest.raises(TrainingError, match=r"member 'm1', step 0: its param 'activation.weight' is non-finite"):
        population.train(1)
    assert sent_by(population, "m1") == [], "m1 sent nothing"
    assert sent_by(population, "m2") in ([], params_at(0)), "m2 its own finite slope at most"
