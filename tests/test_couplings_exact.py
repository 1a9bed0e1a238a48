"""Every coupling, run by poptrain with `exchange.every: 1`, ends at the weights of a
single-process reference that computes the seed's joint objective in one backward pass."""

from __future__ import annotations

import copy

import pytest
import torch
from mlflow.tracking import MlflowClient

import poptrain
from poptrain.builtins.data import constant, digits
from poptrain.builtins.models import MLP, EncoderClassifier, LSTMClassifier
from tests.conftest import LSTM_PARAMS, assert_weights_equal, digits_member, members_on_thirds_of_the_digits, save_init
from tests.reference import (
    diloco_training,
    gossip_training,
    papa_training,
    seed001_training,
    seed002_average,
    seed003_joint_training,
    sequential_batches,
    shared_lstm_training,
    squared_loss_gap_joint_training,
    wash_training,
)

STEPS = 20
EVAL_BATCH = 128  # held-out samples per forward pass, in the run and in the reference alike


def seed_member(name, view, init, **changes):
    """A digits classifier as the seeds' references train it: the first 256 digits in order, from ``init``."""
    return digits_member(name, view, data_kwargs={"limit": 256}, shuffle=False, init=init, **changes)


def _seed003(ray_session, base_config, tmp_path, routed):
    torch.manual_seed(3)
    views = [("full", 64), ("downsampled", 16), ("crop", 36)]
    models = [EncoderClassifier(f, 10, num_nodes=16) for _, f in views]
    inits = [save_init(m, tmp_path / f"m{i}.pt") for i, m in enumerate(models)]
    weight = 1.0 if routed else 0.0
    members = [
        seed_member("m1", "full", inits[0]),
        seed_member("m2", "downsampled", inits[1], loss_weight=weight),
        seed_member("m3", "crop", inits[2], loss_weight=weight),
    ]
    trains = {"trains": ["m1"]} if routed else {}
    couplings = [
        {"type": "relative", "name": "r2", "terms": [{"member": "m1", "coef": 0.5}, {"member": "m2", "coef": -0.5}], **trains},
        {"type": "relative", "name": "r3", "terms": [{"member": "m1", "coef": 0.5}, {"member": "m3", "coef": -0.5}], **trains},
    ]
    result = poptrain.run(base_config(members=members, couplings=couplings, steps=STEPS))
    streams = [sequential_batches(digits(view=v, limit=256), 32) for v, _ in views]  # same samples, three views
    reference = seed003_joint_training(models, zip(*streams, strict=True), STEPS, lr=0.01, routed=routed)
    for name, module in zip(("m1", "m2", "m3"), reference, strict=True):
        assert_weights_equal(result, name, module)


def test_relative_losses_as_written_match_the_seed_003_objective(ray_session, base_config, tmp_path):
    _seed003(ray_session, base_config, tmp_path, routed=False)


def test_relative_losses_routed_into_m1_match_the_detached_reference(ray_session, base_config, tmp_path):
    _seed003(ray_session, base_config, tmp_path, routed=True)


def test_non_linear_relative_loss_uses_the_peers_current_loss_and_matches_the_joint_objective(ray_session, base_config, tmp_path):
    """`fn: (L1 - L2)**2`: its gradient for m1 is 2 * (L1 - L2) * dL1, so it depends on m2's loss
    of the same step (exchanged between forward and backward), unlike the linear terms above,
    whose gradient for m1 is coef * dL1 whatever L2 is."""
    torch.manual_seed(3)
    views = [("full", 64), ("downsampled", 16)]
    models = [EncoderClassifier(f, 10, num_nodes=16) for _, f in views]
    inits = [save_init(m, tmp_path / f"m{i}.pt") for i, m in enumerate(models)]
    members = [seed_member(f"m{i + 1}", view, inits[i]) for i, (view, _) in enumerate(views)]
    couplings = [{"type": "relative", "name": "gap", "fn": {"name": "tests.helpers:squared_loss_gap"}}]
    result = poptrain.run(base_config(members=members, couplings=couplings, steps=STEPS, exchange={"every": 1, "mode": "sync"}))
    streams = [sequential_batches(digits(view=v, limit=256), 32) for v, _ in views]
    reference = squared_loss_gap_joint_training(*models, zip(*streams, strict=True), STEPS, lr=0.01)
    for name, module in zip(("m1", "m2"), reference, strict=True):
        assert_weights_equal(result, name, module)


def test_maximize_term_matches_seed_001_objective(ray_session, base_config, tmp_path):
    torch.manual_seed(1)
    net = MLP(1, 1, hidden=[5, 10], activation="relu")
    init = save_init(net, tmp_path / "net.pt")
    member = {
        "name": "net",
        "model": {"name": "mlp", "kwargs": {"in_features": 1, "out_features": 1, "hidden": [5, 10], "activation": "relu"}},
        "data": {"name": "constant", "kwargs": {"n": 3}, "batch_size": 3, "shuffle": False},
        "loss": "squared_sum_error",
        "terms": [{"name": "weight_sum", "fn": "param_sum", "weight": 0.1, "maximize": True}],
        "optimizer": {"name": "adam", "lr": 0.01},
        "init": init,
    }
    result = poptrain.run(base_config(members=[member], couplings=[], steps=STEPS))
    features = constant(n=3).tensors[0]
    assert_weights_equal(result, "net", seed001_training(net, features, STEPS, lr=0.01, alpha=0.1))
    assert result.metrics["net"]["weight/weight_sum"] == -0.1


@pytest.mark.parametrize("shared_memory", [True, False], ids=["in-shared-memory", "copies"])
def test_average_into_a_target_is_exactly_the_seed_002_mean(ray_session, base_config, tmp_path, shared_memory):
    torch.manual_seed(2)
    models = [EncoderClassifier(64, 10, num_nodes=16) for _ in range(2)]
    inits = [save_init(m, tmp_path / f"m{i}.pt") for i, m in enumerate(models)]
    members = [
        seed_member("m1", "full", inits[0]),
        seed_member("m2", "full", inits[1], optimizer={"name": "adam", "lr": 0.003}),
        seed_member("m3", "full", None, trainable=False),
    ]
    couplings = [{"type": "average", "members": ["m1", "m2"], "into": "m3"}]
    result = poptrain.run(base_config(members=members, couplings=couplings, steps=STEPS, exchange={"shared_memory": shared_memory}))
    # Every parameter is averaged: all of them in memory the coordinator maps, or none.
    count = len(list(models[0].parameters())) if shared_memory else 0
    assert {n: p["shared_params"] for n, p in result.placement.items()} == dict.fromkeys(("m1", "m2", "m3"), count)
    # m1 and m2 are not coupled to each other: each is plain training on its own.
    for model, lr in zip(models, (0.01, 0.003), strict=True):
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for _, (x, y) in zip(range(STEPS), sequential_batches(digits(view="full", limit=256), 32), strict=False):  # the first STEPS of an endless stream
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for name, module in zip(("m1", "m2"), models, strict=True):
        assert_weights_equal(result, name, module)
    assert_weights_equal(result, "m3", seed002_average(*models, EncoderClassifier(64, 10, num_nodes=16)))


def test_shared_module_matches_one_module_used_by_both_models_and_stays_bitwise_identical(ray_session, base_config, tmp_path):
    torch.manual_seed(4)
    model1, model2 = LSTMClassifier(8, 12, 10), LSTMClassifier(8, 12, 10)
    model2.lstm.load_state_dict(model1.lstm.state_dict())  # one shared module: one initial value
    inits = [save_init(model1, tmp_path / "m1.pt"), save_init(model2, tmp_path / "m2.pt")]
    members = [
        {
            "name": f"m{i + 1}",
            "model": {"name": "lstm_classifier", "kwargs": {"input_size": 8, "hidden_size": 12, "num_classes": 10}},
            "data": {"name": "digits", "kwargs": {"view": "rows", "limit": 256, "part": i, "parts": 2}, "batch_size": 32, "shuffle": False},
            "loss": "cross_entropy",
            "optimizer": {"name": "adam", "lr": 0.01},
            "init": inits[i],
        }
        for i in range(2)
    ]
    result = poptrain.run(base_config(members=members, couplings=[{"type": "share", "params": ["lstm.*"]}], steps=STEPS))
    streams = [sequential_batches(digits(view="rows", limit=256, part=i, parts=2), 32) for i in range(2)]
    reference = shared_lstm_training(model1, model2, zip(*streams, strict=True), STEPS, lr=0.01)
    for name, module in zip(("m1", "m2"), reference, strict=True):
        assert_weights_equal(result, name, module)
    a, b = (torch.load(result.output_dir / "members" / n / "model.pt", weights_only=True) for n in ("m1", "m2"))
    assert [k for k in a if k.startswith("lstm.")] == LSTM_PARAMS
    for key in LSTM_PARAMS:
        assert torch.equal(a[key], b[key]), f"{key}: shared parameters bitwise identical"
    assert not torch.equal(a["linear.weight"], b["linear.weight"]), "heads are each member's own"


def test_averaging_back_into_members_in_shared_memory_matches_copies_bitwise_and_logs_the_same_divergence(ray_session, base_config, tmp_path):
    """Local SGD: m1 and m2 train on halves of the data and are replaced by their mean every
    3 steps; in shared memory the coordinator overwrites their parameters in place, after
    measuring how far apart they were."""
    torch.manual_seed(5)
    init = save_init(EncoderClassifier(64, 10, num_nodes=16), tmp_path / "init.pt")
    members = [digits_member(f"m{i + 1}", data_kwargs={"limit": 256, "part": i, "parts": 2}, init=init) for i in range(2)]
    couplings = [{"type": "average", "name": "local_sgd", "every": 3}]
    results = {
        shared: poptrain.run(base_config(name=f"fedavg-{shared}", members=members, couplings=couplings, steps=STEPS, exchange={"shared_memory": shared}))
        for shared in (True, False)
    }
    count = len(list(EncoderClassifier(64, 10, num_nodes=16).parameters()))
    assert results[True].placement["m1"]["shared_params"] == count and results[False].placement["m1"]["shared_params"] == 0
    for name in ("m1", "m2"):
        a, b = (torch.load(r.output_dir / "members" / name / "model.pt", weights_only=True) for r in results.values())
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: the same weights either way"
    histories = {}
    for shared, result in results.items():
        client = MlflowClient(result.tracking_uri)
        histories[shared] = {m.step: m.value for m in client.get_metric_history(result.run_id, "coupling/local_sgd/divergence/m1")}
    assert sorted(histories[True]) == sorted(histories[False]) == list(range(STEPS + 1)), "every step, and after the last"
    assert histories[True][4] > 0, "measured before the members were replaced by their mean"
    for step, value in histories[False].items():
        assert histories[True][step] == pytest.approx(value, rel=1e-5)


def test_mutual_learning_matches_the_single_process_dml_objective(ray_session, base_config, tmp_path):
    """Seed 003's three views learning from each other's predictions: each member's gradient is
    that of its cross-entropy plus T^2 * the mean KL towards its peers' (detached) predictions on the
    same images. The peers' predictions of the same step are exchanged between forward and backward;
    predictions one step old would change every step's gradient."""
    from tests.reference import mutual_learning_training

    torch.manual_seed(5)
    views = [("full", 64), ("downsampled", 16), ("crop", 36)]
    models = [EncoderClassifier(f, 10, num_nodes=16) for _, f in views]
    inits = [save_init(m, tmp_path / f"m{i}.pt") for i, m in enumerate(models)]
    members = [seed_member(f"m{i + 1}", view, inits[i]) for i, (view, _) in enumerate(views)]
    couplings = [{"type": "mutual", "weight": 0.7, "temperature": 2.0}]
    result = poptrain.run(base_config(members=members, couplings=couplings, steps=STEPS, exchange={"every": 1, "mode": "sync"}))
    streams = [sequential_batches(digits(view=v, limit=256), 32) for v, _ in views]
    reference = mutual_learning_training(models, zip(*streams, strict=True), STEPS, lr=0.01, weight=0.7, temperature=2.0)
    for name, module in zip(("m1", "m2", "m3"), reference, strict=True):
        assert_weights_equal(result, name, module)
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id).data.metrics
    assert 0.0 <= parent["coupling/mutual/agreement"] <= 1.0 and "coupling/mutual/divergence/m2" in parent
    member = client.get_run(result.member_run_ids["m2"]).data.metrics
    assert 0.0 <= member["coupling/mutual/agreement"] <= 1.0 and member["coupling/mutual"] > 0, "each member logs its own term and agreement"


def test_codistillation_uses_peers_weights_refreshed_every_k_exchanges_on_each_members_own_data(ray_session, base_config, tmp_path):
    """Two members on different halves of the digits: each runs its peer's model, with the weights
    the peer sent at the last refresh (every 3 exchanges), on its own batch, and learns towards its
    predictions; exactly the single-process codistillation with copies taken every 3 steps."""
    from tests.reference import codistillation_training

    torch.manual_seed(7)
    models = [EncoderClassifier(64, 10, num_nodes=16) for _ in range(2)]
    inits = [save_init(m, tmp_path / f"m{i}.pt") for i, m in enumerate(models)]
    shards = [{"view": "full", "part": i, "parts": 2, "limit": 128} for i in range(2)]
    members = [digits_member(f"m{i + 1}", data_kwargs=shards[i], shuffle=False, init=inits[i]) for i in range(2)]
    couplings = [{"type": "mutual", "mode": "codistillation", "refresh_every": 3, "weight": 0.5, "temperature": 2.0}]
    result = poptrain.run(base_config(members=members, couplings=couplings, steps=STEPS, exchange={"every": 1, "mode": "sync"}))
    streams = [sequential_batches(digits(**shard), 32) for shard in shards]
    reference = codistillation_training(models, zip(*streams, strict=True), STEPS, lr=0.01, weight=0.5, temperature=2.0, refresh=3)
    for name, module in zip(("m1", "m2"), reference, strict=True):
        assert_weights_equal(result, name, module)


# -- averaging beyond the mean (issue 26): PAPA, gossip, WASH, DiLoCo -------------------------


def _matches_fresh_not_stale(result, fresh, stale):
    for name, module in zip(("m1", "m2", "m3"), fresh, strict=True):
        assert_weights_equal(result, name, module, atol=0)
    for name, module in zip(("m1", "m2", "m3"), stale, strict=True):  # what a coordinator one round late would have given
        with pytest.raises(AssertionError):
            assert_weights_equal(result, name, module, atol=1e-3)


def test_papa_pulls_members_towards_the_mean_of_the_same_round_bitwise_as_the_single_process_reference(ray_session, base_config, tmp_path):
    """`average` with `rate: 0.25` (PAPA) at every exchange: each member moves a quarter of the way
    to the mean of the values all three sent at that very exchange, then steps on its own batch;
    the final weights are the single-process reference's bit for bit, and not those of the
    reference fed the previous round's mean. The parent run logs each member's distance to the
    mean before the pull; each member logs what the pull moved it by (a quarter of that distance),
    though the coordinator pulls it in place; and the population's average model is the mean of
    the saved final weights, evaluated on the held-out digits."""
    models, members, streams = members_on_thirds_of_the_digits(tmp_path, 6)
    for member in members:  # held out for the population's average model (evaluation changes no training)
        member["eval_data"] = {"name": "digits", "kwargs": {"view": "full", "split": "test"}, "batch_size": EVAL_BATCH}
    starts = [copy.deepcopy(m) for m in models]
    couplings = [{"type": "average", "name": "papa", "rate": 0.25}]
    result = poptrain.run(
        base_config(
            members=members,
            couplings=couplings,
            steps=STEPS,
            exchange={"every": 1, "mode": "sync"},
            placement={"members_per_host": 1},
            evaluation={"metrics": ["accuracy", "loss"]},
        )
    )
    fresh = papa_training(models, streams(), STEPS, lr=0.01, rate=0.25)
    stale = papa_training([copy.deepcopy(m) for m in starts], streams(), STEPS, lr=0.01, rate=0.25, stale=True)
    _matches_fresh_not_stale(result, fresh, stale)
    history = {m.step: m.value for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "coupling/papa/divergence/m1")}
    assert sorted(history) == list(range(STEPS + 1)), "every step, and after the last"
    initial = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in starts]
    expected = float((initial[0] - sum(initial) / 3).norm())
    assert history[0] == pytest.approx(expected, rel=1e-4), "measured before the first pull"
    client = MlflowClient(result.tracking_uri)
    spread = {
        (when, stat): {m.step: m.value for m in client.get_metric_history(result.run_id, f"coupling/papa/distance/{when}/{stat}")}
        for when in ("before", "after")
        for stat in ("min", "median", "max")
    }
    assert sorted(spread["after", "max"]) == list(range(STEPS + 1)), "after every round"
    for stat in ("min", "median", "max"):  # each member a quarter of the way to the mean, which stays: 3/4 of its distance
        assert all(spread["after", stat][s] == pytest.approx(0.75 * spread["before", stat][s], rel=1e-4) for s in range(STEPS + 1)), stat
    assert result.placement["m1"]["shared_params"] > 0, "the coordinator pulls m1 in memory it maps: m1 never receives its new values"
    for name in ("m1", "m2", "m3"):  # what each received: a quarter of its distance to the mean, at every round it logged
        received = {m.step: m.value for m in client.get_metric_history(result.member_run_ids[name], "received/distance")}
        divergence = {m.step: m.value for m in client.get_metric_history(result.run_id, f"coupling/papa/divergence/{name}")}
        assert sorted(received) == list(range(STEPS)), "every logged step; not the round after the last"
        assert all(received[s] == pytest.approx(0.25 * divergence[s], rel=1e-4) for s in received), name
    _population_average_is_the_mean_of_the_saved_members_evaluated(result, ("m1", "m2", "m3"), EncoderClassifier(64, 10, num_nodes=16))


def _population_average_is_the_mean_of_the_saved_members_evaluated(result, names, model):
    """The run's `population_average/<metric>` is, float for float, the mean of the members' saved
    final weights, written out, loaded into ``model`` and evaluated on the held-out digits."""
    states = [torch.load(result.output_dir / "members" / n / "model.pt", weights_only=True) for n in names]
    mean = {key: sum(state[key] for state in states) / len(states) for key in states[0]}
    saved = torch.load(result.output_dir / "population_average.pt", weights_only=True)
    assert saved.keys() == mean.keys() and all(torch.equal(saved[k], mean[k]) for k in mean)
    model.load_state_dict(mean)
    model.eval()
    inputs, targets = digits(view="full", split="test").tensors
    with torch.no_grad():
        outputs = torch.cat([model(inputs[i : i + EVAL_BATCH]) for i in range(0, len(inputs), EVAL_BATCH)])
    expected = {
        "accuracy": float((outputs.argmax(dim=1) == targets).float().mean()),
        "loss": float(torch.nn.functional.cross_entropy(outputs, targets)),
        "members": float(len(names)),
    }
    parent = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    assert {k: parent[f"population_average/{k}"] for k in expected} == expected
    assert result.population_average == {f"population_average/{k}": v for k, v in expected.items()}


def test_gossip_averages_the_seeds_random_pairs_of_the_same_round_bitwise_as_the_single_process_reference(ray_session, base_config, tmp_path):
    """`gossip` at every exchange with three members: each round the pair drawn from the run's seed
    and the step is replaced by its mean and the odd one out keeps its weights; the final weights
    are the single-process reference's bit for bit, and not those of the reference whose pairs
    average the previous round's values."""
    models, members, streams = members_on_thirds_of_the_digits(tmp_path, 7)
    starts = [copy.deepcopy(m) for m in models]
    result = poptrain.run(
        base_config(
            seed=11, members=members, couplings=[{"type": "gossip"}], steps=STEPS, exchange={"every": 1, "mode": "sync"}, placement={"members_per_host": 1}
        )
    )
    fresh = gossip_training(models, streams(), STEPS, lr=0.01, seed=11)
    stale = gossip_training([copy.deepcopy(m) for m in starts], streams(), STEPS, lr=0.01, seed=11, stale=True)
    _matches_fresh_not_stale(result, fresh, stale)
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "coupling/gossip/divergence/m2")
    assert len(history) == STEPS + 1 and all(m.value > 0 for m in history)


def test_wash_shuffles_the_seeds_positions_of_the_same_round_bitwise_as_the_single_process_reference(ray_session, base_config, tmp_path):
    """`wash` with `fraction: 0.1` at every exchange: each round, positions drawn from the run's seed
    and the step (a tenth of them) take values permuted among the three members, those sent at
    that very exchange; the final weights are the single-process reference's bit for bit (the
    reference permutes position by position in a Python loop), and not those of the reference
    whose shuffled positions take the previous round's values."""
    models, members, streams = members_on_thirds_of_the_digits(tmp_path, 8)
    starts = [copy.deepcopy(m) for m in models]
    result = poptrain.run(
        base_config(
            seed=5,
            members=members,
            couplings=[{"type": "wash", "fraction": 0.1}],
            steps=STEPS,
            exchange={"every": 1, "mode": "sync"},
            placement={"members_per_host": 1},
        )
    )
    fresh = wash_training(models, streams(), STEPS, lr=0.01, seed=5, fraction=0.1)
    stale = wash_training([copy.deepcopy(m) for m in starts], streams(), STEPS, lr=0.01, seed=5, fraction=0.1, stale=True)
    _matches_fresh_not_stale(result, fresh, stale)
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "coupling/wash/divergence/m1")
    assert len(history) == STEPS + 1 and all(m.value > 0 for m in history)


def test_diloco_takes_nesterov_outer_steps_on_the_mean_delta_of_the_same_round_bitwise_as_the_single_process_reference(ray_session, base_config, tmp_path):
    """`diloco` with H = 4: the members start from the first one's weights and take 4 inner Adam
    steps each; then the mean of (global - member) over the values sent at that very exchange is
    the outer gradient of SGD with Nesterov momentum (lr 0.7, momentum 0.9) on the global weights,
    which every member restarts from; once more after the last step. Bitwise the single-process reference's (which
    uses torch.optim.SGD), and not the reference's fed the previous round's values."""
    models, members, streams = members_on_thirds_of_the_digits(tmp_path, 9)
    starts = [copy.deepcopy(m) for m in models]
    couplings = [{"type": "diloco", "every": 4}]
    result = poptrain.run(
        base_config(members=members, couplings=couplings, steps=STEPS, exchange={"every": 1, "mode": "sync"}, placement={"members_per_host": 1})
    )
    fresh = diloco_training(models, streams(), STEPS, lr=0.01, every=4, outer_lr=0.7, outer_momentum=0.9)
    stale = diloco_training([copy.deepcopy(m) for m in starts], streams(), STEPS, lr=0.01, every=4, outer_lr=0.7, outer_momentum=0.9, stale=True)
    _matches_fresh_not_stale(result, fresh, stale)
    final = [torch.load(result.output_dir / "members" / m / "model.pt", weights_only=True) for m in ("m1", "m2", "m3")]
    assert all(torch.equal(final[0][k], other[k]) for other in final[1:] for k in final[0]), "every member ends at the global weights"
    after = {m.step: m.value for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "coupling/diloco/distance/after/max")}
    assert sorted(after) == list(range(0, STEPS + 1, 4)), "after each outer round, and only then"
    assert all(v < 1e-5 for v in after.values()), "every member at the global weights (their mean's rounding apart)"
