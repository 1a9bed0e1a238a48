"""Every shipped config runs, and couplings keep working when members exchange only every k steps."""

from __future__ import annotations

import pytest
import torch

import poptrain
from tests.conftest import LSTM_PARAMS, REPO

# prelu_separation.yaml runs in full through the CLI (test_cli.py) and with every=10 below;
# shared_module.yaml with every=3 below.
RUN_BELOW = {"prelu_separation.yaml", "shared_module.yaml"}
# Plots and logged models cost seconds a run; test_cli.py and test_observability.py cover them.
QUIET = ["tracking.plots=false", "tracking.log_models=false"]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in RUN_BELOW)
# thousand.yaml runs whole, all 1,000 members, killed and resumed, in tests/test_variation.py
# (test_a_thousand_members_resume_...; with seed 000's own Module by import path, the same network
# as its built-in mlp), which checks there what this test checks of the others;
# test_thousand_members_... below checks what the full config resolves to.
RUN_ELSEWHERE = {"thousand.yaml"}
# pbt.yaml's run is the session's `pbt_yaml_run` (tests/conftest.py), 12 steps ranked every 4,
# which tests/test_variation.py compares with the written-out file.
SHARED = {"pbt.yaml": "pbt_yaml_run"}
# Configs whose members an averaging coupling (average, gossip, wash, diloco) averages.
AVERAGING = {"averaging.yaml", "diloco.yaml", "gossip.yaml", "papa.yaml", "wash.yaml"}


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in RUN_ELSEWHERE])
def test_shipped_config_runs(ray_session, config, tmp_path, tracking_uri, experiment, request):
    if config in SHARED:
        result = request.getfixturevalue(SHARED[config])
    else:
        result = poptrain.run(
            REPO / "configs" / config,
            overrides=["steps=6", "exchange.every=2", f"output_dir={tmp_path}", f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}", *QUIET],
        )
    cfg = poptrain.load_config(REPO / "configs" / config)
    assert set(result.metrics) == set(cfg.member_names)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics.values())
    ranking = f"eval/{cfg.evaluation.ranking.key}"
    assert all(ranking in m for m in result.metrics.values()), "every member is evaluated on held-out data at the end"
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(tracking_uri).get_run(result.run_id)
    assert {f"{ranking}/median", f"best/{ranking}"} <= set(parent.data.metrics) and parent.data.tags["poptrain.best_member"] == result.best_member
    # `evaluation.population_average: auto`: the averaging family's configs evaluate their average model, no other does.
    averaged = f"population_average/{cfg.evaluation.ranking.key}" in parent.data.metrics
    assert averaged == (config in AVERAGING) == (result.output_dir / "population_average.pt").is_file(), config
    # `exchange.shared_memory: auto`: averaged members that stack on a host exchange copies (the stack
    # holds their parameters); a member alone keeps its averaged parameters in the mapped memory.
    for name, placement in result.placement.items() if config == "papa.yaml" else ():
        assert (placement["stacked_with"] > 1) == (placement["shared_params"] == 0), (name, placement)
    if config == "papa.yaml":
        assert any(p["stacked_with"] > 1 for p in result.placement.values()) and any(p["shared_params"] > 0 for p in result.placement.values()), (
            result.placement
        )


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_evaluates_every_member_on_held_out_data(config):
    cfg = poptrain.load_config(REPO / "configs" / config)
    assert cfg.evaluation.every > 0
    for member in cfg.members:
        held_out = member.held_out_data()
        assert held_out is not None, member.name
        assert held_out.kwargs != member.data.kwargs, f"{member.name} is evaluated on data it trains on"


def test_thousand_members_resolve_to_a_thousand_members_on_one_host_per_core():
    from poptrain.driver.placement import host_resources, plan_hosts

    cfg = poptrain.load_config(REPO / "configs" / "thousand.yaml")
    assert len(cfg.members) == 1000 and cfg.member_names[:2] == ["m000", "m001"] and cfg.member_names[-1] == "m999"
    hosts = plan_hosts(cfg, {"CPU": 2.0})
    assert [len(h) for h in hosts] == [500, 500] and host_resources(cfg, hosts, {"CPU": 2.0}) == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_separation_still_converges_when_exchanging_every_10_steps(ray_session, tmp_path, tracking_uri, experiment):
    result = poptrain.run(
        REPO / "configs" / "prelu_separation.yaml",
        overrides=["exchange.every=10", f"output_dir={tmp_path}", f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}", *QUIET],
    )
    alphas = [torch.load(result.output_dir / "members" / m / "model.pt", weights_only=True)["activation.weight"] for m in ("m1", "m2")]
    assert float((alphas[0] - alphas[1]).abs().sum()) >= 2.0
    assert set(result.metrics) == {"m1", "m2"} and all(m["loss"] < 0.1 for m in result.metrics.values())


def test_shared_module_copies_end_identical_when_averaged_every_3_steps(ray_session, tmp_path, tracking_uri, experiment):
    result = poptrain.run(
        REPO / "configs" / "shared_module.yaml",
        overrides=["steps=10", "exchange.every=3", f"output_dir={tmp_path}", f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}", *QUIET],
    )
    a, b = (torch.load(result.output_dir / "members" / n / "model.pt", weights_only=True) for n in ("m1", "m2"))
    assert [k for k in a if k.startswith("lstm.")] == LSTM_PARAMS
    for key in LSTM_PARAMS:
        assert torch.equal(a[key], b[key]), key


def test_async_exchange_converges_and_never_uses_values_older_than_max_staleness(ray_session, tmp_path, tracking_uri, experiment):
    from mlflow.tracking import MlflowClient

    result = poptrain.run(
        REPO / "configs" / "prelu_separation.yaml",
        overrides=[
            "exchange.mode=async",
            "exchange.max_staleness=2",
            f"output_dir={tmp_path}",
            f"tracking.uri={tracking_uri}",
            f"tracking.experiment={experiment}",
            *QUIET,
        ],
    )
    alphas = [torch.load(result.output_dir / "members" / m / "model.pt", weights_only=True)["activation.weight"] for m in ("m1", "m2")]
    assert float((alphas[0] - alphas[1]).abs().sum()) >= 2.0
    client = MlflowClient(tracking_uri)
    for member in ("m1", "m2"):
        staleness = [m.value for m in client.get_metric_history(result.member_run_ids[member], "exchange/staleness")]
        assert staleness and max(staleness) <= 2
    assert client.get_metric_history(result.run_id, "coupling/separation"), "couplings still logged on the parent"


def test_async_exchange_refuses_couplings_that_replace_values():
    from poptrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"couplings.0.type: 'share' replaces members' values .* `exchange.mode: sync`"):
        poptrain.load_config(REPO / "configs" / "shared_module.yaml", ["exchange.mode=async"])
