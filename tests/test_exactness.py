"""With `exchange.every: 1`, poptrain trains exactly the seed's single-process joint objective."""

from __future__ import annotations

import torch

import poptrain
from poptrain.builtins.data import synthetic_regression
from tests.conftest import prelu_member
from tests.reference import SeedModule, seed000_joint_training, sequential_batches

STEPS, LR, BATCH = 25, 0.01, 32


def _initial_modules(tmp_path, alphas=(0.25, 0.25)):
    torch.manual_seed(1234)
    modules = [SeedModule(20, 1), SeedModule(20, 1)]
    paths = []
    for index, (module, alpha) in enumerate(zip(modules, alphas)):
        with torch.no_grad():
            module.activation.weight.fill_(alpha)  # equal slopes: the separation term is active every step
        path = tmp_path / f"init{index}.pt"
        torch.save(module.state_dict(), path)
        paths.append(str(path))
    return modules, paths


def test_sync_exchange_matches_single_process_joint_objective(ray_session, base_config, tmp_path):
    modules, paths = _initial_modules(tmp_path)
    data = {"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20}, "batch_size": BATCH, "shuffle": False}
    config = base_config(
        steps=STEPS,
        members=[prelu_member(f"m{i + 1}", init=paths[i], data=data, optimizer={"name": "adam", "lr": LR}) for i in range(2)],
    )
    result = poptrain.run(config)

    reference = seed000_joint_training(*modules, sequential_batches(synthetic_regression(n=256, in_features=20), BATCH), STEPS, LR)
    for name, module in zip(("m1", "m2"), reference):
        trained = torch.load(result.output_dir / "members" / name / "model.pt", weights_only=True)
        for key, expected in module.state_dict().items():
            torch.testing.assert_close(trained[key], expected, rtol=0, atol=1e-6, msg=f"{name}.{key}")
    # The coupling really acted: the slopes moved apart from 0.25 / 0.25.
    alphas = [torch.load(result.output_dir / "members" / n / "model.pt", weights_only=True)["activation.weight"] for n in ("m1", "m2")]
    assert float((alphas[0] - alphas[1]).abs()) > 0.1


# Bitwise determinism across runs with the same seed is shown by tests/test_failures.py: runs
# interrupted (member killed, driver killed) end bitwise equal to an uninterrupted run.
