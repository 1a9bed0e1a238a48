"""Members whose parameters are not float32: NumPy has no bfloat16, so exchanged values travel as
float32 (exact) and are cast back where they are written into a member."""

from __future__ import annotations

import math

import torch
from mlflow.tracking import MlflowClient

import poptrain
from tests.conftest import prelu_member
from tests.helpers import BFloat16MLP


def bf16_member(name, **changes):
    member = prelu_member(name, **changes)
    member["model"]["name"] = "tests.helpers:BFloat16MLP"
    return member


def test_bfloat16_members_exchange_share_average_and_save_their_models(ray_session, base_config, tracking_uri, tmp_path):
    kwargs = prelu_member("x")["model"]["kwargs"]
    torch.manual_seed(5)
    initial = BFloat16MLP(**kwargs).state_dict()
    torch.save(initial, tmp_path / "m1.pt")
    # m1's transform makes a float32 gradient for a bfloat16 parameter: it is cast to the parameter's dtype.
    zeroed = [{"params": ["mlp.output.bias"], "fn": {"name": "tests.helpers:zero_gradient_made_anew"}}]
    members = [bf16_member("m1", init=str(tmp_path / "m1.pt"), grad_transforms=zeroed), bf16_member("m2"), bf16_member("t", trainable=False)]
    couplings = [
        {"type": "separation", "param": "mlp.activation.weight", "margin": 2.0},  # scalars, over the direct connection
        {"type": "share", "members": ["m1", "m2"], "params": ["mlp.input.*"]},  # parameters and gradients every step
        {"type": "average", "members": ["m1", "m2"], "into": "t"},  # in shared memory, in place, in bfloat16
    ]
    result = poptrain.run(base_config(members=members, couplings=couplings, steps=6))

    saved = {n: torch.load(result.output_dir / "members" / n / "model.pt", weights_only=True) for n in ("m1", "m2", "t")}
    assert all(v.dtype == torch.float32 for state in saved.values() for v in state.values()), "bfloat16 is saved as float32"
    assert all(torch.equal(v, v.to(torch.bfloat16).float()) for state in saved.values() for v in state.values()), "holding bfloat16 values"
    for key in ("mlp.input.weight", "mlp.input.bias"):
        assert torch.equal(saved["m1"][key], saved["m2"][key]), f"{key} is shared"
    assert not torch.equal(saved["m1"]["mlp.output.weight"], saved["m2"]["mlp.output.weight"])
    assert not torch.equal(saved["m1"]["mlp.output.weight"], initial["mlp.output.weight"].float())
    assert torch.equal(saved["m1"]["mlp.output.bias"], initial["mlp.output.bias"].float()), "Adam on zero gradients stays put"
    for key, value in saved["t"].items():  # the target is the mean of the final sources, rounded to bfloat16
        mean = (saved["m1"][key] + saved["m2"][key]) / 2
        torch.testing.assert_close(value, mean, rtol=2**-7, atol=1e-6, msg=key)

    parent = MlflowClient(tracking_uri).get_run(result.run_id).data.metrics
    assert any(k.startswith("coupling/average/divergence/") for k in parent) and any(k.startswith("coupling/separation") for k in parent)
    assert all(math.isfinite(v) for v in parent.values()), parent
