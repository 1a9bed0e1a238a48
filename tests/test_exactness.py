"""With `exchange.every: 1`, poptrain trains exactly the seed's single-process joint objective."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

import poptrain
from poptrain.builtins.data import synthetic_regression
from tests.conftest import SEED000_BATCH, SEED000_LR, prelu_member, seed000_initial_modules, weights
from tests.reference import seed000_joint_training, sequential_batches

STEPS, LR, BATCH = 25, SEED000_LR, SEED000_BATCH


# One member per host (a process each); both on one host, one after another; both on one host, stacked.
PLACEMENTS = {"one per host": {"members_per_host": 1}, "packed": {"members_per_host": 2, "stacked": False}, "stacked": {"members_per_host": 2}}


def tolerance(placement: dict) -> float:
    """Absolute tolerance on the weights. Stacked members' gradients differ from one by one by float
    rounding (a batched matrix product adds in another order: about 3e-8 here), and Adam's first
    step turns that into up to lr/2 where a gradient is near its eps (lr * g / (|g| + eps)): 8e-5
    on a handful of input weights, at lr 0.01. The slopes the coupling acts on stay within 1e-7."""
    return 2e-4 if placement.get("stacked", True) and placement.get("members_per_host") == 2 else 1e-6


# Packed and stacked run in the test below, which also fails when the exchange is one step stale.
@pytest.mark.parametrize("placement", [PLACEMENTS["one per host"]], ids=["one per host"])
def test_sync_exchange_matches_single_process_joint_objective(ray_session, base_config, tmp_path, placement):
    modules, paths = seed000_initial_modules(tmp_path)
    data = {"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20}, "batch_size": BATCH, "shuffle": False}
    config = base_config(
        steps=STEPS,
        placement=placement,
        members=[prelu_member(f"m{i + 1}", init=paths[i], data=data, optimizer={"name": "adam", "lr": LR}) for i in range(2)],
    )
    result = poptrain.run(config)
    assert result.placement["m1"]["stacked_with"] == (2 if placement.get("stacked", True) and placement["members_per_host"] == 2 else 1)

    reference = seed000_joint_training(*modules, sequential_batches(synthetic_regression(n=256, in_features=20), BATCH), STEPS, LR)
    for name, module in zip(("m1", "m2"), reference, strict=True):
        trained = torch.load(result.output_dir / "members" / name / "model.pt", weights_only=True)
        for key, expected in module.state_dict().items():
            atol = 1e-6 if key == "activation.weight" else tolerance(placement)
            torch.testing.assert_close(trained[key], expected, rtol=0, atol=atol, msg=f"{name}.{key}")
    # The coupling really acted: the slopes moved apart from 0.25 / 0.25.
    alphas = [torch.load(result.output_dir / "members" / n / "model.pt", weights_only=True)["activation.weight"] for n in ("m1", "m2")]
    assert float((alphas[0] - alphas[1]).abs()) > 0.1


@pytest.mark.parametrize("placement", [PLACEMENTS["one per host"], PLACEMENTS["stacked"], PLACEMENTS["packed"]], ids=["one per host", "stacked", "packed"])
def test_separation_crossing_its_margin_matches_single_process_reference(ray_session, base_config, tmp_path, placement):
    """The hinge switches off during the run: with margin 2 (above) it is active every step and its
    slope gradient is -sign(w1 - w2) whatever the peer's exact value, so stale peers would go
    unnoticed. Here the slopes, equal at 0.25, move apart by about 0.02 a step and reach the margin
    at step 6 (distance 0.109; a one-step-old peer slope would give about 0.0995, still inside it):
    which steps the hinge acts on depends on the peer's current slope."""
    steps, margin = 15, 0.105
    modules, paths = seed000_initial_modules(tmp_path)
    data = {"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20}, "batch_size": BATCH, "shuffle": False}
    config = base_config(
        steps=steps,
        exchange={"every": 1, "mode": "sync"},
        placement=placement,
        members=[prelu_member(f"m{i + 1}", init=paths[i], data=data, optimizer={"name": "adam", "lr": LR}) for i in range(2)],
        couplings=[{"type": "separation", "param": "activation.weight", "margin": margin}],
    )
    result = poptrain.run(config)

    distances = []
    batches = sequential_batches(synthetic_regression(n=256, in_features=20), BATCH)
    reference = seed000_joint_training(*modules, batches, steps, LR, margin=margin, distances=distances)
    for name, module in zip(("m1", "m2"), reference, strict=True):
        trained = weights(result.output_dir, name)
        for key, expected in module.state_dict().items():
            atol = 1e-6 if key == "activation.weight" else tolerance(placement)
            torch.testing.assert_close(trained[key], expected, rtol=0, atol=atol, msg=f"{name}.{key}")
    # The margin really is crossed: the hinge acts for the first steps, then is inactive.
    active = [d < margin for d in distances]
    assert active[:6] == [True] * 6 and not any(active[6:]), distances
    # poptrain's own run crossed it at the same step: its logged distances are the reference's.
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "coupling/separation/distance/m1-m2")
    logged = {m.step: m.value for m in history}
    assert set(range(steps)) <= set(logged), sorted(logged)
    for step, distance in enumerate(distances):
        assert logged[step] == pytest.approx(distance, abs=1e-6), step


# Bitwise determinism across runs with the same seed is shown by tests/test_failures.py: runs
# interrupted (member killed, driver killed) end bitwise equal to an uninterrupted run.
