"""Members of one architecture on a host train as one stacked model (torch.func), each with its own
optimizer state and hyperparameters, and end as they would trained one by one, to float rounding."""

from __future__ import annotations

import time

import pytest
import torch
import yaml

from poptrain.coordinator.actor import InProcessClient
from poptrain.training.host import timing_shares
from poptrain.training.lockstep import step_together
from poptrain.training.stacked import StackedGroup, form_groups, stackable
from tests.conftest import SEED_MODULE, digits_member, make_config, prelu_member
from tests.in_process import train_host

CLOSE = dict(rtol=1e-5, atol=1e-6)  # float rounding: the same operations, vectorised


class ReplyTimingClient(InProcessClient):
    """An in-process client that adds up how long its host blocked waiting for replies."""

    waited_ms = 0.0

    def call(self, *args):
        answer = super().call(*args)

        def wait():
            started = time.perf_counter()
            try:
                return answer()
            finally:
                self.waited_ms += 1000 * (time.perf_counter() - started)

        return wait


def after_pbt_round(units) -> None:
    """What a host does once population-based training (or a restore) changed its members: hand the
    stacks their members' state again (MemberHost._sync_stacks), hyperparameters included."""
    for unit in units:
        if isinstance(unit, StackedGroup):
            unit.from_members()


def prelu_members(optimizers: list[dict]) -> list[dict]:
    return [prelu_member(f"m{i}", optimizer=opt) for i, opt in enumerate(optimizers)]


OPTIMIZERS = {
    "adam, own lr and weight decay": [{"name": "adam", "lr": 0.01 * (i + 1), "kwargs": {"weight_decay": 0.001 * i}} for i in range(4)],
    "adamw": [{"name": "adamw", "lr": 0.005 * (i + 1), "kwargs": {"weight_decay": 0.01, "betas": [0.8, 0.99]}} for i in range(3)],
    "sgd with momentum": [{"name": "sgd", "lr": 0.02, "kwargs": {"momentum": m}} for m in (0.0, 0.5, 0.9)],
}


@pytest.mark.parametrize("optimizers", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_a_stacked_group_ends_as_its_members_trained_one_by_one(optimizers, in_process_host):
    coupled = dict(steps=30, exchange={"every": 1}, couplings=[{"type": "separation", "param": "activation.weight", "margin": 2.0}])
    alone, link_a = in_process_host(prelu_members(optimizers), **coupled)
    metrics_a = train_host(alone, link_a, 30)
    stacked, link_b = in_process_host(prelu_members(optimizers), **coupled)
    units = form_groups(stacked)
    assert len(units) == 1 and isinstance(units[0], StackedGroup), "one stack for members of one architecture"
    metrics_b = train_host(units, link_b, 30)
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")
        state_a, state_b = a.optimizer.state_dict(), b.optimizer.state_dict()
        assert state_a["param_groups"] == state_b["param_groups"]
        for index, own in state_a["state"].items():
            for name, value in own.items():
                if value is not None:
                    torch.testing.assert_close(state_b["state"][index][name], value, **CLOSE, msg=f"{a.name} state {index}.{name}")
    assert [m["loss"] for m in metrics_b[-1][0]] == pytest.approx([m["loss"] for m in metrics_a[-1]], rel=1e-5)
    assert metrics_b[-1][0][0]["coupling/separation"] == pytest.approx(metrics_a[-1][0]["coupling/separation"], rel=1e-5)


@pytest.mark.parametrize("members", [2, 4], ids=["two members", "four: each member's pairs in tensor ops"])
def test_between_exchanges_stacked_members_see_each_other_as_of_the_last_exchange_as_apart(members, in_process_host):
    """exchange.every 3: on the steps between exchanges a member's separation is its own live slope
    against its peers' slopes of the last exchange, its group-mates' included. Seeing a group-mate's
    live slope instead (one backward of the joint term over the stack) ends 0.17 away."""
    optimizers = OPTIMIZERS["adam, own lr and weight decay"][:members]
    coupled = dict(steps=30, exchange={"every": 3}, couplings=[{"type": "separation", "param": "activation.weight", "margin": 2.0}])
    alone, link_a = in_process_host(prelu_members(optimizers), **coupled)
    metrics_a = train_host(alone, link_a, 30)
    stacked, link_b = in_process_host(prelu_members(optimizers), **coupled)
    units = form_groups(stacked)
    assert isinstance(units[0], StackedGroup)
    metrics_b = train_host(units, link_b, 30)
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")
    assert [m["coupling/separation"] for m in metrics_b[-1][0]] == pytest.approx([m["coupling/separation"] for m in metrics_a[-1]], rel=1e-5)


def test_stacked_members_send_the_losses_another_members_coupling_reads_as_one_column(in_process_host):
    """m0 learns from the other three's losses (seed 003's relative losses, routed into m0); m1 to
    m3, trained by nothing coupled, stack and send their losses in the loss round as one column,
    each row its member's loss (each with a coefficient of its own, so rows sent to the wrong member
    show in m0's term): m0 ends as it does with them trained one by one, every step exact in sync mode."""
    terms = [{"member": "m0", "coef": 1.0}, *({"member": f"m{i}", "coef": coef} for i, coef in ((1, -0.1), (2, -0.3), (3, -0.6)))]
    coupled = dict(steps=10, exchange={"every": 1}, couplings=[{"type": "relative", "terms": terms, "trains": ["m0"]}])
    alone, link_a = in_process_host(prelu_members(OPTIMIZERS["adam, own lr and weight decay"]), **coupled)
    metrics_a = train_host(alone, link_a, 10)
    stacked, link_b = in_process_host(prelu_members(OPTIMIZERS["adam, own lr and weight decay"]), **coupled)
    units = form_groups(stacked)
    groups = [u for u in units if isinstance(u, StackedGroup)]
    assert [g.names for g in groups] == [("m1", "m2", "m3")], [t.stacking_problem for t in stacked]
    metrics_b = train_host(units, link_b, 10)
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")
    assert metrics_b[-1][0]["coupling/relative"] == pytest.approx(metrics_a[-1][0]["coupling/relative"], rel=1e-5)


ADAM = OPTIMIZERS["adam, own lr and weight decay"]
# WASH with SGD: its shuffle leaves some of m2's weights with gradients of about 1e-7, where Adam's
# first step (about lr * g / |g|) turns float rounding of g into a 1.5e-5 difference, alone or stacked.
SGD = [{"name": "sgd", "lr": 0.02 * (i + 1), "kwargs": {"momentum": 0.5}} for i in range(4)]


def test_stacked_members_with_terms_of_their_own_each_learn_towards_their_peers_as_apart(in_process_host):
    """A user's coupling whose members each have a term of their own (``term_is_joint = False``,
    by import path): in a stack, one call gives every member's term, row i reaching member i only,
    each times its own weight, as each alone computes it; between exchanges against the peers'
    values of the last one."""
    coupled = dict(steps=12, exchange={"every": 2}, couplings=[{"type": "tests.reference:TowardPeersMean", "param": "activation.weight", "weight": 0.5}])
    alone, link_a = in_process_host(prelu_members(ADAM), **coupled)
    metrics_a = train_host(alone, link_a, 12)
    stacked, link_b = in_process_host(prelu_members(ADAM), **coupled)
    units = form_groups(stacked)
    assert len(units) == 1 and isinstance(units[0], StackedGroup), [t.stacking_problem for t in stacked]
    metrics_b = train_host(units, link_b, 12)
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")
    name = next(k for k in metrics_a[-1][0] if k.startswith("coupling/"))
    terms_a, terms_b = [m[name] for m in metrics_a[-1]], [m[name] for m in metrics_b[-1][0]]
    assert terms_b == pytest.approx(terms_a, rel=1e-5) and len(set(terms_a)) == len(terms_a), "each member's own term"


@pytest.mark.parametrize(
    "coupling, optimizers",
    [
        ({"type": "gossip"}, ADAM),
        ({"type": "average", "rate": 0.5}, ADAM),
        ({"type": "gossip"}, ADAM[:3]),
        ({"type": "wash", "fraction": 0.2}, SGD),
        ({"type": "diloco", "every": 1, "outer_lr": 0.7, "outer_momentum": 0.9}, ADAM),
    ],
    ids=["gossip", "papa", "gossip, one member left out of each round", "wash", "diloco"],
)
def test_stacked_members_whose_parameters_a_round_rewrites_step_on_the_new_ones_as_apart(coupling, optimizers, in_process_host):
    """An averaging round rewrites members' parameters at the exchange before their forward pass:
    a stacked group waits for it as each member alone does, instead of computing the step on the
    parameters it had sent (0.04 off after 60 steps of gossip). The round's new values go into the
    stack as columns, into the rows it rewrote only (three members in pairs: one is left as it was)."""
    members, size = prelu_members(optimizers), len(optimizers)
    rewritten = dict(steps=12, exchange={"every": 2, "shared_memory": False}, couplings=[coupling])
    alone, link_a = in_process_host(members, **rewritten)
    metrics_a = train_host(alone, link_a, 12)
    stacked, link_b = in_process_host(members, **rewritten)
    units = form_groups(stacked)
    assert isinstance(units[0], StackedGroup), [t.stacking_problem for t in stacked]
    metrics_b = train_host(units, link_b, 12)
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")
    # What each member received at a round, on its own metrics, stacked as apart: at every round (even steps) and only then.
    received_a = [[m.get("received/distance") for m in step] for step in metrics_a]
    received_b = [[m.get("received/distance") for m in step[0]] for step in metrics_b]
    assert all((value is not None) == (step % 2 == 0) for step, row in enumerate(received_b) for value in row), received_b
    moved = [sum(value > 0 for value in row) for row in received_b[::2]]
    # Every member paired, pulled or restarted from the global weights at every round, but in threes
    # gossip's odd one out (0), and at DiLoCo's first round the member whose weights start the global ones.
    assert all(count >= size - 1 for count in moved), moved
    for row_a, row_b in zip(received_a[::2], received_b[::2], strict=True):
        assert row_b == pytest.approx(row_a, rel=1e-4)


def test_a_users_own_model_by_import_path_stacks_and_ends_as_trained_one_by_one(in_process_host):
    members = [prelu_member(f"m{i}", model=SEED_MODULE, optimizer={"name": "adam", "lr": 0.01 * (i + 1)}) for i in range(3)]
    coupled = dict(steps=20, exchange={"every": 1}, couplings=[{"type": "separation", "param": "activation.weight", "margin": 2.0}])
    alone, link_a = in_process_host(members, **coupled)
    train_host(alone, link_a, 20)
    stacked, link_b = in_process_host(members, **coupled)
    units = form_groups(stacked)
    assert len(units) == 1 and isinstance(units[0], StackedGroup), [t.stacking_problem for t in stacked]
    train_host(units, link_b, 20)
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")


LSTM = {
    "model": {"name": "lstm_classifier", "kwargs": {"input_size": 8, "hidden_size": 4, "num_classes": 10}},
    "data": {"name": "digits", "kwargs": {"view": "rows"}},
    "loss": "cross_entropy",
}


@pytest.mark.parametrize(
    "member, reason",
    [
        ({"model": {"name": "tests.helpers:NormalizedNet"}}, "buffers (norm.running_mean"),
        ({"model": {"name": "tests.helpers:BranchingNet"}}, "torch.func cannot stack its model"),
        (LSTM, "no batching rule for"),
    ],
    ids=["batchnorm", "data-dependent branch", "lstm"],
)
def test_a_model_torch_func_cannot_stack_as_it_computes_alone_trains_alone_and_says_why(member, reason, in_process_host):
    trainers, _ = in_process_host([prelu_member(f"m{i}", **member) for i in range(2)], couplings=[])
    units = form_groups(trainers)
    assert units == trainers, "each trains alone"
    assert all(reason in t.stacking_problem for t in trainers), [t.stacking_problem for t in trainers]


def test_check_says_which_members_stack_and_why_the_others_train_alone(capsys, tmp_path):
    from poptrain.cli import main

    config = make_config(
        tmp_path,
        f"sqlite:///{tmp_path}/m.db",
        "check",
        members=[prelu_member(f"s{i}", model=SEED_MODULE) for i in range(3)]
        + [prelu_member(f"n{i}", model={"name": "tests.helpers:NormalizedNet"}) for i in range(2)],
        couplings=[],
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "# stacking: 3 of 5 members train stacked" in out and "# trains alone: n0, n1: its model has buffers" in out


def test_a_stacked_step_reads_its_device_once(device_reads, in_process_host):
    """On a GPU every read of a tensor's value waits for the step to finish: a stacked step that
    neither exchanges nor logs reads back once (every member's loss and objective, and whether all
    is finite), counted here on the CPU, where the same code runs."""
    coupled = dict(
        steps=30,
        exchange={"every": 10},
        tracking={"log_every": 10, "plots": False, "log_models": False},
        couplings=[{"type": "separation", "param": "activation.weight", "margin": 2.0}],
    )
    trainers, link = in_process_host(prelu_members(OPTIMIZERS["sgd with momentum"]), **coupled)
    units = form_groups(trainers)
    train_host(units, link, 2)  # an exchanging, logged step, then one that is neither
    reads = device_reads()
    step_together(units, [u.step_program() for u in units], link)
    # The one read (tolist), and on the CPU only, separation sizing its scalar slopes' near pairs
    # (Separation._near_pairs: a path a GPU never takes, and a read that waits for nothing here).
    assert reads == ["__int__", "tolist"]


def test_each_stacked_member_uses_its_own_changed_learning_rate_from_the_next_step_on(in_process_host):
    members = prelu_members([{"name": "adam", "lr": 0.01}] * 3)
    alone, link_a = in_process_host(members, steps=20)
    stacked, link_b = in_process_host(members, steps=20)
    units = form_groups(stacked)
    for trainers, drive in ((alone, alone), (stacked, units)):
        train_host(drive, link_a if trainers is alone else link_b, 10)
        trainers[1].optimizer.param_groups[0]["lr"] = 0.05  # as population-based training's explore does
        after_pbt_round(drive)
        train_host(drive, link_a if trainers is alone else link_b, 10)
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE)
    assert not torch.equal(stacked[1].params["input.weight"], stacked[0].params["input.weight"])


def test_a_stack_holds_its_optimizer_state_alone_once_a_checkpoint_has_read_the_members_copies(in_process_host):
    coupled = dict(steps=20, exchange={"every": 1}, couplings=[{"type": "separation", "param": "activation.weight", "margin": 2.0}])
    optimizers = OPTIMIZERS["adam, own lr and weight decay"]
    alone, link_a = in_process_host(prelu_members(optimizers), **coupled)
    train_host(alone, link_a, 10)
    stacked, link_b = in_process_host(prelu_members(optimizers), **coupled)
    units = form_groups(stacked)
    train_host(units, link_b, 5)  # ends with to_members, as a host before a checkpoint
    units[0].release_member_copies()
    assert all(not m.optimizer.state for m in stacked), "no second copy of the moments"
    train_host(units, link_b, 5)
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")


def test_a_stacked_member_restored_from_its_state_continues_exactly(in_process_host):
    members = prelu_members([{"name": "adam", "lr": 0.01 * (i + 1)} for i in range(3)])
    stacked, link = in_process_host(members, steps=20)
    units = form_groups(stacked)
    train_host(units, link, 10)
    saved = stacked[2].state_dict()
    train_host(units, link, 5)
    stacked[2].load_state_dict(saved)  # as a restart or an exploit loads a state into a member
    units[0].from_members()
    assert torch.equal(stacked[2].params["input.weight"], saved["model"]["input.weight"]), "loaded into the stack"
    assert units[0].steps.tolist() == [15.0, 15.0, 10.0]


def test_stacked_batches_draw_bitwise_what_each_members_own_stream_draws_over_epoch_ends():
    """A cohort's streams drawn as one (StackedBatches): each member keeps its own seed, shuffle and
    position (one a few batches ahead), its epoch ending on its own step; every draw is bitwise its
    own stream's, and written back, each stream goes on as if it had drawn alone."""
    import copy

    from torch.utils.data import TensorDataset

    from poptrain.components.batches import BatchStream, StackedBatches

    data = TensorDataset(torch.randn(50, 3), torch.randn(50, 1))
    streams = [BatchStream(data, 8, shuffle=i != 2, seed=7 + i) for i in range(4)]
    for _ in range(3):
        streams[1].next()  # a member ahead of the others (an exploit copied a donor's position)
    alone = copy.deepcopy(streams)
    together = StackedBatches(streams)
    for _ in range(20):  # 6 batches an epoch: every member's epoch ends, member 1's on its own steps
        drawn = together.next()
        for i, stream in enumerate(alone):
            for column, own in zip(drawn, stream.next(), strict=True):
                assert torch.equal(column[i], own)
    together.to_streams()
    for stream, reference in zip(streams, alone, strict=True):
        assert stream.state_dict() == reference.state_dict()
        assert all(torch.equal(a, b) for a, b in zip(stream.next(), reference.next(), strict=True))


def test_stacked_members_each_in_its_own_sample_order_end_as_trained_one_by_one(in_process_host):
    """Members over one dataset, each shuffled by its own ``data.seed``, train stacked with their
    batches drawn in one gather, across epoch ends (8 batches an epoch, 30 steps), and end as the
    same members trained one by one; each one's data position is its own when a checkpoint reads it."""
    data = lambda i: {"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20}, "batch_size": 32, "seed": 10 + i}  # noqa: E731
    members = [prelu_member(f"m{i}", data=data(i), optimizer={"name": "adam", "lr": 0.01 * (i + 1)}) for i in range(3)]
    coupled = dict(steps=30, couplings=[{"type": "separation", "param": "activation.weight", "margin": 2.0}])
    alone, link_a = in_process_host(members, **coupled)
    train_host(alone, link_a, 30)
    stacked, link_b = in_process_host(members, **coupled)
    units = form_groups(stacked)
    assert isinstance(units[0], StackedGroup) and units[0].stacked_batches is not None, "drawn as one"
    train_host(units, link_b, 30)
    for a, b in zip(alone, stacked, strict=True):
        assert b.batches.state_dict() == a.batches.state_dict()
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")


def test_what_cannot_stack_says_why_and_trains_one_after_another(in_process_host):
    functional_dropout, twice = {"model": {"name": "tests.helpers:FunctionalDropoutNet"}}, {"model": {"name": "tests.helpers:TwiceDroppedNet"}}
    trainers, _ = in_process_host(
        [
            prelu_member("m1"),
            prelu_member("m2", terms=[{"name": "l1", "fn": "param_l2", "weight": 0.01}]),
            prelu_member("d", **functional_dropout),
            prelu_member("e", **functional_dropout),
            prelu_member("t", **twice),
            prelu_member("u", **twice),
        ],
        couplings=[],
    )
    assert stackable(trainers[0]) is None
    assert "extra terms" in stackable(trainers[1])
    assert all(not isinstance(u, StackedGroup) for u in form_groups(trainers)), "no two alike members that stack"
    assert "in training mode torch.func cannot stack its model" in trainers[2].stacking_problem, "dropout called as a function: not the member's own masks"
    assert "called more than once per forward" in trainers[4].stacking_problem


def test_each_stacked_member_trains_with_its_own_coupling_weight_as_population_based_training_sets_it(in_process_host):
    """Population-based training perturbs `couplings.<name>.weight` member by member (each member
    then has coupling objects of its own): a stacked member's coupling term and its gradient take
    its own weight, not the first member's."""
    coupled = dict(
        steps=20,
        exchange={"every": 1},
        couplings=[{"type": "separation", "param": "activation.weight", "margin": 2.0}],
        pbt={"every": 1000, "metric": "loss", "hyperparameters": {"couplings.separation.weight": {"factors": [0.8, 1.2]}}},
    )
    members = prelu_members([{"name": "adam", "lr": 0.01}] * 3)
    alone, link_a = in_process_host(members, **coupled)
    stacked, link_b = in_process_host(members, **coupled)
    units = form_groups(stacked)
    assert len(units) == 1 and isinstance(units[0], StackedGroup)

    def weights_changed_after_5_steps(trainers, drive, link) -> list:
        train_host(drive, link, 5)
        for trainer, weight in zip(trainers, (0.5, 1.0, 4.0), strict=True):  # as an explore step sets them
            trainer.hyperparameters.set({"couplings.separation.weight": weight})
        after_pbt_round(drive)
        return train_host(drive, link, 10)[-1]

    metrics_a = weights_changed_after_5_steps(alone, alone, link_a)
    metrics_b = weights_changed_after_5_steps(stacked, units, link_b)[0]
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")
    assert [m["coupling/separation"] for m in metrics_b] == pytest.approx([m["coupling/separation"] for m in metrics_a], rel=1e-5)
    assert [m["objective"] for m in metrics_b] == pytest.approx([m["objective"] for m in metrics_a], rel=1e-5)


def test_a_stacked_member_logs_the_same_metrics_on_the_same_steps_as_the_member_alone(in_process_host):
    """The host logs a member's metrics every `tracking.log_every`-th step and at the last step: on
    each of those a stacked member's metrics are the member's alone (its couplings' own metrics,
    layer norms and terms included)."""
    steps, log_every = 8, 3
    run = dict(
        steps=steps,
        exchange={"every": 1},
        tracking={"log_every": log_every, "layer_norms_every": 2, "plots": False, "log_models": False},
        couplings=[{"type": "tests.helpers:SeparationWithOwnMetrics", "name": "separation", "param": "activation.weight", "margin": 2.0}],
    )
    members = prelu_members([{"name": "adam", "lr": 0.01 * (i + 1)} for i in range(3)])
    alone, link_a = in_process_host(members, **run)
    stacked, link_b = in_process_host(members, **run)
    units = form_groups(stacked)
    assert len(units) == 1 and isinstance(units[0], StackedGroup)
    metrics_a = train_host(alone, link_a, steps)
    metrics_b = [by_unit[0] for by_unit in train_host(units, link_b, steps)]
    logged = [s for s in range(steps) if s % log_every == 0 or s + 1 == steps]
    assert logged == [0, 3, 6, 7]
    for s in logged:
        for a, b in zip(metrics_a[s], metrics_b[s], strict=True):
            assert "coupling/separation/own_sum" in a
            assert b == pytest.approx(a, rel=1e-5, abs=1e-6), f"step {s}"


def test_a_stacked_members_wait_for_the_coordinator_is_profiled_as_exchange_wait_not_compute(in_process_host):
    """`tracking.profile`: while a stacked group blocks on the coordinator's reply (here a coordinator
    slow to complete one round), its members' `profile/exchange_wait_ms` hold that wait, each its
    share (the host books the rest of a member's share of the step as compute)."""
    slow = [
        {
            "type": "tests.helpers:SeparationThatHangsTheCoordinator",
            "name": "separation",
            "param": "activation.weight",
            "margin": 2.0,
            "hang_at_exchange": 1,
            "hang_s": 0.2,
        }
    ]
    stacked, link = in_process_host(prelu_members([{"name": "adam", "lr": 0.01}] * 3), client=ReplyTimingClient, steps=3, couplings=slow)
    units = form_groups(stacked)
    assert len(units) == 1 and isinstance(units[0], StackedGroup)
    train_host(units, link, 1)
    units[0].timings = dict.fromkeys(units[0].timings, 0.0)  # as the host does before every step
    link.client.waited_ms = 0.0
    train_host(units, link, 1)  # the round the coordinator is slow to complete
    assert link.client.waited_ms > 0
    shares = timing_shares(units)  # what the host logs as each member's profile/exchange_wait_ms
    waits = [shares[m.name]["exchange_wait_ms"] for m in stacked]
    assert sum(waits) >= link.client.waited_ms and waits == [waits[0]] * 3, "the whole wait, shared evenly among the members"


def test_members_with_different_batch_sizes_stack_apart_and_end_as_trained_one_by_one(in_process_host):
    """A stacked step draws one batch of every member as one tensor: members whose batches differ
    in size train in stacks of their own."""

    def members():
        return [
            prelu_member(f"m{i}", data={"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20}, "batch_size": size})
            for i, size in enumerate((32, 16, 32, 16))
        ]

    alone, link_a = in_process_host(members(), steps=6, couplings=[])
    stacked, link_b = in_process_host(members(), steps=6, couplings=[])
    units = form_groups(stacked)
    assert [u.names for u in units] == [("m0", "m2"), ("m1", "m3")]
    train_host(alone, link_a, 6)
    train_host(units, link_b, 6)
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")


def test_an_optimizer_group_option_the_stacked_update_lacks_keeps_its_member_out_of_stacks(in_process_host):
    """The stacked update implements Adam's, AdamW's and SGD's plain options only: a parameter group
    asking for another (amsgrad, nesterov) would silently train without it in a stack."""
    amsgrad = {"name": "adam", "lr": 0.01, "groups": [{"params": ["input.*"], "kwargs": {"amsgrad": True}}]}
    nesterov = {"name": "sgd", "lr": 0.01, "kwargs": {"momentum": 0.9}, "groups": [{"params": ["output.*"], "kwargs": {"nesterov": True}}]}
    trainers, _ = in_process_host(prelu_members([amsgrad, amsgrad, nesterov, nesterov]), couplings=[])
    assert all("not stackable" in stackable(t) for t in trainers)
    assert all(not isinstance(u, StackedGroup) for u in form_groups(trainers))


def test_a_stacked_sgd_member_given_momentum_later_starts_its_momentum_as_alone(in_process_host):
    """SGD keeps no momentum for a member trained without it: when population-based training gives
    it momentum, its first momentum step starts from its gradient, in a stack as alone."""
    members = prelu_members([{"name": "sgd", "lr": 0.02, "kwargs": {"momentum": m}} for m in (0.0, 0.5, 0.9)])
    alone, link_a = in_process_host(members, steps=10, couplings=[])
    stacked, link_b = in_process_host(members, steps=10, couplings=[])
    units = form_groups(stacked)
    for trainers, drive, link in ((alone, alone, link_a), (stacked, units, link_b)):
        train_host(drive, link, 5)
        trainers[0].optimizer.param_groups[0]["momentum"] = 0.9  # as an explore step of optimizer.kwargs.momentum does
        after_pbt_round(drive)
        train_host(drive, link, 5)
    for a, b in zip(alone, stacked, strict=True):
        for key in a.params:
            torch.testing.assert_close(b.params[key], a.params[key], **CLOSE, msg=f"{a.name}.{key}")


def test_a_stacked_groups_members_are_evaluated_in_one_pass_as_each_alone_to_float_rounding(in_process_host):
    """A host evaluates a stacked group's members (the same held-out data) in one forward pass of the
    stack: each member's held-out metrics, outputs and targets are its own, as it computes them alone."""
    data = {"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20, "split": "train"}, "batch_size": 32}
    members = [prelu_member(f"m{i}", data=data, optimizer={"name": "adam", "lr": 0.01 * (i + 1)}) for i in range(3)]
    trainers, link = in_process_host(members, steps=10, evaluation={"every": 5, "metrics": ["mse", "mae"]})
    units = form_groups(trainers)
    assert len(units) == 1 and units[0].shared_eval
    train_host(units, link, 4)
    evaluated = units[0].evaluate()
    assert list(evaluated) == [t.name for t in trainers]
    for trainer in trainers:
        metrics, outputs, targets = evaluated[trainer.name]
        alone_metrics, alone_outputs, alone_targets = trainer.evaluate()
        assert metrics.keys() == alone_metrics.keys() == {"eval/mse", "eval/mae"}
        assert metrics == pytest.approx(alone_metrics, rel=1e-5)
        torch.testing.assert_close(outputs, alone_outputs, **CLOSE)
        assert torch.equal(targets, alone_targets)
    assert len({m["eval/mse"] for m, _, _ in evaluated.values()}) == 3, "each member's own model"


def test_stacked_dropout_draws_each_members_masks_from_its_own_stream(in_process_host):
    """A stack draws each member's dropout masks from the member's own random stream, as it draws
    them alone: a member ends as it does alone (to float rounding), whoever its group-mates are."""
    a, b, c = (digits_member(name, model_kwargs={"num_nodes": 64, "dropout": 0.3}, lr=lr) for name, lr in (("a", 0.01), ("b", 0.02), ("c", 0.005)))
    ends = []
    for members in ([a, b], [a, c], [a]):
        trainers, link = in_process_host(members, steps=12, couplings=[])
        units = form_groups(trainers)
        assert isinstance(units[0], StackedGroup) == (len(members) > 1), [t.stacking_problem for t in trainers]
        train_host(units, link, 12)
        ends.append(trainers[0])
    for stacked in ends[:2]:
        for key, value in ends[2].params.items():
            torch.testing.assert_close(stacked.params[key], value, **CLOSE, msg=f"a.{key}")
        assert stacked.randomness.state_dict()["torch"].equal(ends[2].randomness.state_dict()["torch"]), "its stream moved on as alone"


def test_a_stacked_groups_exchange_copies_each_stacked_parameter_once_each_way(in_process_host):
    """At a parameter exchange a stacked group sends each stacked parameter as one copy off its
    device (every member's value a row of it), and takes the reply in as one tensor per quantity
    family, the peers' values rows of it (on a GPU: one device-to-host and one host-to-device copy
    per family, not one per member and quantity), without making the values one by one; the
    couplings read that column as it came."""
    coupled = dict(steps=4, exchange={"every": 1}, couplings=[{"type": "separation", "param": "activation.weight", "margin": 2.0}])
    trainers, link = in_process_host(prelu_members([{"name": "adam", "lr": 0.01}] * 4), **coupled)
    (group,) = form_groups(trainers)
    program = group.step_program()
    send = next(program)
    assert send.kind == "param" and len(send.values) == 4
    assert len({id(array.base) for array in send.values.values()}) == 1, "the members' slopes: rows of one copy"
    op = program.send(link.send(send.kind, send.step, group.names, send.values))
    replies = []
    while True:
        try:
            replies.append(op.pending())
            op = program.send(replies[-1])
        except StopIteration:
            break
    assert [len(r.values) for r in replies] == [4] and replies[0].values.rows is None, "the reply's values never made one by one"
    peers = trainers[0].peers
    assert all(t.peers is peers for t in trainers) and len(peers) == 4
    assert len({t.untyped_storage().data_ptr() for t in peers.values()}) == 1, "the reply's slopes: rows of one tensor"
    column = peers.column("param", "activation.weight", tuple(group.names))
    assert column.untyped_storage().data_ptr() == next(iter(peers.values())).untyped_storage().data_ptr(), "the column as it came"


def test_a_stacked_member_s_non_finite_loss_or_gradient_stops_the_run_naming_it_as_alone(in_process_host):
    """``failure.nonfinite: fail`` in a stack: the step's one finiteness check over the columns finds
    a NaN loss (a poisoned batch at step 1) or a NaN gradient behind a finite loss (seed 000's
    separation in L2 at distance 0: sqrt's gradient at 0), and the member is named as alone."""
    from poptrain.training.member import TrainingError

    poisoned = {"name": "tests.helpers:poisoned_data", "kwargs": {"bad_index": 40}, "batch_size": 32, "shuffle": False}
    trainers, link = in_process_host([prelu_member(f"m{i}", data=poisoned) for i in (1, 2, 3)], steps=5)
    units = form_groups(trainers)
    assert len(units) == 1 and isinstance(units[0], StackedGroup)
    train_host(units, link, 1)
    with pytest.raises(TrainingError, match=r"member 'm1', step 1: non-finite term 'loss'"):
        train_host(units, link, 1)

    l2 = [{"type": "separation", "param": "activation.weight", "margin": 2.0, "norm": "l2"}]
    trainers, link = in_process_host([prelu_member(f"m{i}") for i in (1, 2, 3)], steps=5, exchange={"every": 1}, couplings=l2)
    units = form_groups(trainers)
    assert len(units) == 1 and isinstance(units[0], StackedGroup)
    with pytest.raises(TrainingError, match=r"member 'm1', step 0: non-finite .*gradient"):
        train_host(units, link, 1)
