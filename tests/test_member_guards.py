"""A member's guards, checked on the real member and coordinator code stepped in this process
(tests/in_process.py): terms that train nothing, and non-finite values under each policy.
The same guards inside Ray actors are covered by test_failures.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poptrain.member import TrainingError
from tests.conftest import prelu_member
from tests.in_process import InProcessPopulation


def poisoned(**changes):
    """Seed 000's member whose second batch (step 1) holds a NaN sample."""
    data = {"name": "tests.helpers:poisoned_data", "kwargs": {"bad_index": 40}, "batch_size": 32, "shuffle": False}
    return prelu_member("m1", data=data, **changes)


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
    assert all(np.isfinite(a).all() for *_, values in population.sent for a in values.values())


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
    assert all(np.isfinite(a).all() for *_, values in population.sent for a in values.values())
    assert all(torch.isfinite(t).all() for t in population.trainers["m1"].model.state_dict().values())
