"""End-to-end runs on a real local Ray with a real MLflow store."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

import poptrain
from poptrain.driver.placement import member_resources
from tests.conftest import make_config, prelu_member


def runs_of(tracking_uri: str, experiment: str):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def test_population_is_one_parent_run_with_one_nested_run_per_member(ray_session, base_config, tracking_uri, experiment):
    config = base_config(steps=12)
    config["tracking"]["profile"] = True
    result = poptrain.run(config)
    client, runs = runs_of(tracking_uri, experiment)
    parents = [r for r in runs if r.data.tags.get("poptrain.role") == "population"]
    children = [r for r in runs if r.data.tags.get("poptrain.role") == "member"]
    assert len(parents) == 1 and parents[0].info.run_id == result.run_id
    assert sorted(r.data.tags["poptrain.member"] for r in children) == ["m1", "m2"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == result.run_id
        assert child.info.status == "FINISHED"
        assert child.data.params["model.kwargs.activation"] == "prelu"
        assert child.data.params["optimizer.lr"] == "0.01"
        assert child.data.params["coupling.separation.margin"] == "2.0"
        assert child.data.tags["poptrain.placement.device"] == "cpu" and "placement.device" not in child.data.params
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(steps) == list(range(12)), "every step logged exactly once"
        # --profile: where the step time went
        assert child.data.metrics["profile/compute_ms"] > 0 and child.data.metrics["profile/exchange_wait_ms"] >= 0
        assert {"profile/serialize_ms", "profile/logging_ms", "profile/checkpoint_ms"} <= set(child.data.metrics)
    parent = parents[0]
    coupling_steps = [m.step for m in client.get_metric_history(parent.info.run_id, "coupling/separation")]
    assert sorted(coupling_steps) == list(range(12))
    assert "coupling/separation/distance/m1-m2" in parent.data.metrics
    assert "config.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert (result.output_dir / "config.yaml").is_file()
    state = torch.load(result.output_dir / "members" / "m1" / "model.pt", weights_only=True)
    assert state["activation.weight"].shape == (1,)


def test_an_async_coupling_read_only_by_the_coordinator_on_one_side_is_logged_on_the_parent(ray_session, base_config, tracking_uri, experiment):
    # Separation routed to m1 only: m1's slope is read by the coordinator alone. In async mode it must
    # still travel (no mapped memory there), or the parent never gets coupling/separation.
    couplings = [{"type": "separation", "param": "activation.weight", "margin": 2.0, "trains": ["m1"]}]
    result = poptrain.run(base_config(steps=8, couplings=couplings, exchange={"mode": "async"}))
    client, _ = runs_of(tracking_uri, experiment)
    assert client.get_metric_history(result.run_id, "coupling/separation"), "the coupling's value is on the parent run"
    assert result.placement["m1"]["shared_params"] == 0


def save_initial_mlp(path):
    """Seed 000's module with fixed initial weights, saved for a member's `init`."""
    from poptrain.builtins.models import MLP

    torch.manual_seed(0)
    torch.save(MLP(20, 1, 40, "prelu").state_dict(), path)
    return path


PER_PARAMETER_STEPS = 5


@pytest.fixture(scope="module")
def per_parameter_population(ray_session, tmp_path_factory, tracking_uri):
    """One run, two members trained by SGD from the same initial weights: m1 with a frozen input
    layer and a slow output group, m2 with a gradient transform on each of its layers. Returns
    (initial weights, result)."""
    tmp_path = tmp_path_factory.mktemp("per_parameter")
    init = save_initial_mlp(tmp_path / "init.pt")
    frozen = prelu_member(
        "m1",
        init=str(init),
        frozen=["input.*"],
        optimizer={"name": "sgd", "lr": 0.1, "groups": [{"params": ["output.*"], "lr": 0.0001}]},
    )
    transformed = prelu_member(
        "m2",
        init=str(init),
        optimizer={"name": "sgd", "lr": 0.1},
        grad_transforms=[
            {"params": ["output.*"], "scale": 0.0},
            {"params": ["input.bias"], "fn": {"name": "tests.helpers:halve_gradient", "kwargs": {"factor": 0.0}}},
            {"params": ["input.weight"], "clip_norm": 1e-3},
        ],
    )
    config = make_config(tmp_path / "runs", tracking_uri, "per_parameter_population", members=[frozen, transformed], couplings=[], steps=PER_PARAMETER_STEPS)
    return torch.load(init, weights_only=True), poptrain.run(config)


def test_frozen_parameters_never_change_and_groups_get_their_own_learning_rate(per_parameter_population, tracking_uri):
    before, result = per_parameter_population
    after = torch.load(result.output_dir / "members" / "m1" / "model.pt", weights_only=True)
    assert torch.equal(before["input.weight"], after["input.weight"]) and torch.equal(before["input.bias"], after["input.bias"])
    slow = (after["output.weight"] - before["output.weight"]).abs().max()
    fast = (after["activation.weight"] - before["activation.weight"]).abs().max()
    assert 0 < slow < fast
    # Per-layer norms in MLflow: frozen parameters have a weight norm and no gradient norm.
    logged = MlflowClient(tracking_uri).get_run(result.member_run_ids["m1"]).data.metrics
    assert "weight_norm/input.weight" in logged and "grad_norm/input.weight" not in logged
    assert logged["grad_norm/output.weight"] > 0 and "grad_norm/activation.weight" in logged


def test_gradient_transforms_change_only_the_selected_parameters(per_parameter_population):
    before, result = per_parameter_population
    after = torch.load(result.output_dir / "members" / "m2" / "model.pt", weights_only=True)
    assert torch.equal(before["output.weight"], after["output.weight"]), "scale 0: unchanged"
    assert torch.equal(before["input.bias"], after["input.bias"]), "user fn returning a zero gradient: unchanged"
    step = (after["input.weight"] - before["input.weight"]).norm()
    assert 0 < step <= PER_PARAMETER_STEPS * 0.1 * 1e-3 + 1e-7, "clipped to norm 1e-3 per step"
    assert not torch.equal(before["activation.weight"], after["activation.weight"])


def test_a_failing_member_fails_the_run_naming_it(ray_session, base_config):
    broken = prelu_member("m2", data={"name": "tests.helpers:not_a_dataset"})
    with pytest.raises(poptrain.PopulationError, match=r"member m2 .*not a map-style torch Dataset"):
        poptrain.run(base_config(members=[prelu_member("m1"), broken]))


def test_a_straggler_fails_the_barrier_with_its_name_instead_of_hanging(ray_session, base_config):
    straggler = prelu_member("slow", data={"name": "tests.helpers:slow_data", "kwargs": {"delay_s": 0.5}, "batch_size": 8})
    config = base_config(members=[prelu_member("m1"), straggler], exchange={"every": 1, "timeout_s": 1.0}, steps=3)
    with pytest.raises(poptrain.PopulationError, match=r"waited 1 s for \['slow'\]"):
        poptrain.run(config)


@pytest.mark.parametrize(
    "cluster_gpus, asked, expected",
    [
        (0, {}, [0, 0, 0]),
        (4, {}, [1, 1, 1]),
        (1, {}, [0.3333, 0.3333, 0.3333]),  # three members on one GPU
        (2, {}, [0.5, 0.5, 0.5]),  # two on one GPU, one on the other: 0.67 each would fit neither
        (2, {"m0": 1}, [1, 0.5, 0.5]),  # a GPU asked for by number is not shared out
        (1, {"m0": 0.5}, [0.5, 0.25, 0.25]),
        (1, {"m0": 1}, [1, 0, 0]),
    ],
)
def test_num_gpus_auto_gives_each_member_a_gpu_or_a_share_that_packs_onto_whole_gpus(tmp_path, cluster_gpus, asked, expected):
    members = [prelu_member(f"m{i}", resources={"num_gpus": asked.get(f"m{i}", "auto")}) for i in range(3)]
    cfg = poptrain.load_config(make_config(tmp_path, f"sqlite:///{tmp_path}/unused.db", "unused", members=members))
    bundles = member_resources(cfg, {"CPU": 16.0, "GPU": float(cluster_gpus)})
    assert [b.get("GPU", 0) for b in bundles] == expected
    assert all(b["CPU"] == 1.0 for b in bundles)


def test_a_population_the_cluster_cannot_fit_is_refused_at_once_naming_what_it_needs(ray_session, base_config):
    big = [prelu_member(f"m{i}", resources={"num_cpus": 2}) for i in range(2)]
    with pytest.raises(poptrain.PopulationError, match=r"needs 4 CPUs and 0 GPUs .* the cluster has 2 CPUs"):
        poptrain.run(base_config(members=big))
