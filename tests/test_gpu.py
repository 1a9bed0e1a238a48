"""On a CUDA machine, members train on the GPU Ray gave them: each member's device read back,
stacked members on one GPU ending as one-by-one training does (to float rounding), and
population-based training copying a donor between GPU members.

Skipped where torch sees no CUDA device (``gpu`` marker, see conftest). The rest of the suite
hides the GPUs from everything it starts; each run here is ``python -m poptrain run`` in a
subprocess that starts its own Ray with the GPUs visible (GPU_ENV), read back from what the run
left: its MLflow runs and ``model.pt`` files. The last test needs no Ray and runs in this process
(torch counted the GPUs in pytest_configure, before the suite hid them from what it starts).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests import conftest
from tests.conftest import REPO, prelu_member

pytestmark = pytest.mark.gpu


def run_on_gpu(tmp_path: Path, config: dict) -> tuple[Path, dict[str, dict]]:
    """Run ``config`` with the GPUs visible; the run's folder and each member's MLflow run (tags, metric keys)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {**config, "output_dir": str(tmp_path / "runs"), "tracking": {"uri": uri, "experiment": config["name"], "plots": False, "log_models": False}}
    path = tmp_path / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**conftest.GPU_ENV, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "poptrain", "run", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(config["name"]).experiment_id])
    members = {r.data.tags["poptrain.member"]: {"tags": r.data.tags, "metrics": set(r.data.metrics)} for r in runs if r.data.tags.get("poptrain.role") == "member"}
    return tmp_path / "runs" / config["name"], members


def weights(run_dir: Path, member: str) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "members" / member / "model.pt", weights_only=True)


def test_each_member_trains_on_the_gpu_ray_assigned_it(tmp_path):
    run_dir, members = run_on_gpu(tmp_path, {
        "name": "gpu-devices", "steps": 30, "members": [prelu_member("m1"), prelu_member("m2")],
        "couplings": [{"type": "separation", "param": "activation.weight", "margin": 2.0}],
    })
    for name in ("m1", "m2"):
        tags = members[name]["tags"]
        assert tags["poptrain.placement.device"].startswith("cuda"), tags
        assert tags["poptrain.placement.gpu_ids"], "the member holds a GPU of Ray's"
        assert all(torch.isfinite(t).all() for t in weights(run_dir, name).values())


def test_stacked_members_on_a_gpu_end_as_members_trained_one_by_one_to_float_rounding(tmp_path):
    members = [prelu_member(f"m{i}", optimizer={"name": "adam", "lr": 0.01 * (i + 1)}) for i in range(4)]
    base = {"steps": 40, "members": members, "couplings": [{"type": "separation", "param": "activation.weight", "margin": 2.0}]}
    stacked_dir, stacked = run_on_gpu(tmp_path / "stacked", {**base, "name": "gpu-stacked", "placement": {"members_per_host": 4}})
    alone_dir, _ = run_on_gpu(tmp_path / "alone", {**base, "name": "gpu-alone", "placement": {"members_per_host": 4, "stacked": False}})
    for name in stacked:
        assert stacked[name]["tags"]["poptrain.placement.device"].startswith("cuda")
        assert stacked[name]["tags"]["poptrain.placement.stacked_with"] == "4"
        a, b = weights(stacked_dir, name), weights(alone_dir, name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")


def test_packed_members_on_one_gpu_end_bitwise_as_each_alone_on_it(tmp_path):
    """Two members carried by one process on one GPU, one after another (not stacked), against each
    in its own process on the same GPU: the same kernels on the same shapes. Bitwise is the claim
    to check here (cuBLAS picks its algorithms by shape; separation's index_add, which is not
    deterministic on CUDA, only computes logged values)."""
    base = {"steps": 30, "members": [prelu_member("m1"), prelu_member("m2")], "couplings": [{"type": "separation", "param": "activation.weight", "margin": 2.0}]}
    packed_dir, packed = run_on_gpu(tmp_path / "packed", {**base, "name": "gpu-packed", "placement": {"members_per_host": 2, "stacked": False}})
    alone_dir, alone = run_on_gpu(tmp_path / "alone", {**base, "name": "gpu-alone", "placement": {"members_per_host": 1}, "members": [
        prelu_member("m1", resources={"num_gpus": 0.5}), prelu_member("m2", resources={"num_gpus": 0.5})]})
    assert packed["m1"]["tags"]["poptrain.placement.pid"] == packed["m2"]["tags"]["poptrain.placement.pid"], "one process"
    assert alone["m1"]["tags"]["poptrain.placement.pid"] != alone["m2"]["tags"]["poptrain.placement.pid"], "a process each"
    for name in ("m1", "m2"):
        a, b = weights(packed_dir, name), weights(alone_dir, name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: packed and alone differ on the GPU"


def test_population_based_training_copies_a_donor_between_gpu_members(tmp_path):
    from tests.test_pbt import population

    config = {"name": "gpu-pbt", **population(steps=40, every=10)}
    _, members = run_on_gpu(tmp_path, config)
    assert all(m["tags"]["poptrain.placement.device"].startswith("cuda") for m in members.values())
    assert any("pbt/exploited" in m["metrics"] for m in members.values()), "at least one exploit happened"


def test_a_donors_state_leaves_its_gpu_before_it_travels_to_the_receiver():
    """What population-based training puts in Ray's object store holds only CPU tensors (a CUDA
    tensor there would need the donor's GPU to be unpickled); the receiver loads it onto its own."""
    from poptrain.pbt import transferable

    param = torch.nn.Parameter(torch.ones(3, device="cuda"))
    optimizer = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones_like(param)
    optimizer.step()
    state = {"model": {"w": param.detach()}, "optimizer": optimizer.state_dict(), "balancer": {}, "batches": {"epoch": 0, "offset": 0}}
    moved = transferable(state)
    tensors = [moved["model"]["w"], *moved["optimizer"]["state"][0].values()]
    assert all(t.device.type == "cpu" for t in tensors), [t.device for t in tensors]
    receiver = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    again = torch.optim.Adam([receiver], lr=0.1)
    again.load_state_dict(moved["optimizer"])
    assert again.state[receiver]["exp_avg"].device.type == "cuda", "loaded onto the receiver's device"


def test_a_function_over_a_gpu_tensor_is_refused_before_anything_starts(tmp_path):
    """A lambda closing over a CUDA tensor pickles, but only a process holding that device could
    unpickle it: the config refuses it (README, *From a notebook*)."""
    script = (
        "import torch\n"
        "from poptrain.config import ConfigError, load_config\n"
        "from tests.conftest import make_config, prelu_member\n"
        "offset = torch.ones(1, device='cuda')\n"
        "member = prelu_member('m1', loss=lambda outputs, targets: ((outputs - targets - offset) ** 2).mean())\n"
        f"config = make_config({str(tmp_path)!r}, 'sqlite:///unused.db', 'gpu', members=[member, prelu_member('m2')])\n"
        "try:\n"
        "    load_config(config)\n"
        "except ConfigError as exc:\n"
        "    print(exc.render())\n"
    )
    env = {**conftest.GPU_ENV, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "members.0.loss: `__main__:<lambda>` holds a tensor on cuda:0" in done.stdout, done.stdout
