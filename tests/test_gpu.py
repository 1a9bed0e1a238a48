"""On a CUDA machine, members train on the GPU Ray gave them: each member's device read back,
stacked members on one GPU ending as one-by-one training does (to float rounding), packed members
ending bitwise as each alone on the GPU, a killed member restarted from its checkpoint ending
bitwise as an uninterrupted run, population-based training copying a donor between GPU members,
and a warm process giving its GPU memory back while it waits for the next run.

Which claims are bitwise (``torch.equal``) and which to a tolerance: packed against alone and
killed against uninterrupted are bitwise, the same kernels on the same shapes in the same order
on one GPU (cuBLAS is deterministic for a given GPU and shape on one stream; separation's
``index_add``, not deterministic on CUDA, only computes logged values); stacked against one by
one is to 1e-4 relative, 1e-5 absolute, as on the CPU (other formulas: vectorised).

Skipped where torch sees no CUDA device (``gpu`` marker, see conftest). The rest of the suite
hides the GPUs from everything it starts; each run here is a driver process (``python -m
poptrain run``, or a short script) that starts its own Ray with the GPUs visible (GPU_ENV), read
back from what the run left: its MLflow runs and ``model.pt`` files. The last tests need no Ray
and run in this process (torch counted the GPUs in pytest_configure, before the suite hid them
from what it starts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests import conftest
from tests.conftest import KILLED_CHECKPOINT_EVERY, KILLED_STEPS, REPO, assert_bitwise_equal, digits_member, logged_steps, pbt_population, prelu_member, weights

pytestmark = pytest.mark.gpu


SEPARATION = {"type": "separation", "param": "activation.weight", "margin": 2.0}


def gpu_env() -> dict[str, str]:
    """The environment of a driver that sees the GPUs (as it was before the suite hid them) and imports this checkout."""
    env = {**conftest.GPU_ENV, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return env


def gpu_config(tmp_path: Path, config: dict) -> dict:
    """``config`` writing into ``tmp_path``: its output folder and its MLflow store (plots and logged
    models off; ``config``'s own ``tracking`` keys kept)."""
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": config["name"], "plots": False, "log_models": False, **config.get("tracking", {})}
    return {**config, "output_dir": str(tmp_path / "runs"), "tracking": tracking}


def finished(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"


def run_on_gpu(tmp_path: Path, config: dict) -> tuple[Path, dict[str, dict]]:
    """Run ``config`` with the GPUs visible; the run's folder and each member's MLflow run (tags, metric keys)."""
    config = gpu_config(tmp_path, config)
    path = tmp_path / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    finished(subprocess.run([sys.executable, "-m", "poptrain", "run", str(path)], cwd=tmp_path, env=gpu_env(), capture_output=True, text=True, timeout=600))
    client = MlflowClient(config["tracking"]["uri"])
    runs = client.search_runs([client.get_experiment_by_name(config["tracking"]["experiment"]).experiment_id])
    members = {
        r.data.tags["poptrain.member"]: {"tags": r.data.tags, "metrics": set(r.data.metrics)} for r in runs if r.data.tags.get("poptrain.role") == "member"
    }
    return tmp_path / "runs" / config["name"], members


def drive_on_gpu(tmp_path: Path, script: str, given: dict) -> object:
    """``script`` (Python) run as a driver with the GPUs visible: its first argument a YAML file of
    ``given``, its second the file it writes its findings into, as JSON (not on its stdout,
    where Ray's workers print too). Those findings."""
    given_path, found_path = tmp_path / "given.yaml", tmp_path / "found.json"
    given_path.write_text(yaml.safe_dump(given))
    finished(
        subprocess.run(
            [sys.executable, "-c", script, str(given_path), str(found_path)], cwd=tmp_path, env=gpu_env(), capture_output=True, text=True, timeout=600
        )
    )
    return json.loads(found_path.read_text())


def test_each_member_trains_on_the_gpu_ray_assigned_it(tmp_path):
    # Profiled: the step's clock waits for the GPU's queued work (MemberHost.timed_gpus).
    run_dir, members = run_on_gpu(
        tmp_path,
        {
            "name": "gpu-devices",
            "steps": 30,
            "members": [prelu_member("m1"), prelu_member("m2")],
            "couplings": [SEPARATION],
            "tracking": {"profile": True},
        },
    )
    for name in ("m1", "m2"):
        tags = members[name]["tags"]
        assert tags["poptrain.placement.device"].startswith("cuda"), tags
        assert tags["poptrain.placement.gpu_ids"], "the member holds a GPU of Ray's"
        assert "profile/compute_ms" in members[name]["metrics"]
        assert all(torch.isfinite(t).all() for t in weights(run_dir, name).values())


def assert_stacked_on_the_gpu_as_one_by_one(tmp_path: Path, name: str, base: dict) -> None:
    """``base``'s members, all on one host, stacked and then one by one on the GPU: each stacked
    member on CUDA, stacked with all the others, ends as it does one by one, to float rounding."""
    count = len(base["members"])
    stacked_dir, stacked = run_on_gpu(tmp_path / "stacked", {**base, "name": f"{name}-stacked", "placement": {"members_per_host": count}})
    alone_dir, _ = run_on_gpu(tmp_path / "alone", {**base, "name": f"{name}-alone", "placement": {"members_per_host": count, "stacked": False}})
    for member in stacked:
        assert stacked[member]["tags"]["poptrain.placement.device"].startswith("cuda")
        assert stacked[member]["tags"]["poptrain.placement.stacked_with"] == str(count)
        a, b = weights(stacked_dir, member), weights(alone_dir, member)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{member}.{key}")


def test_stacked_members_on_a_gpu_end_as_members_trained_one_by_one_to_float_rounding(tmp_path):
    members = [prelu_member(f"m{i}", optimizer={"name": "adam", "lr": 0.01 * (i + 1)}) for i in range(4)]
    assert_stacked_on_the_gpu_as_one_by_one(tmp_path, "gpu", {"steps": 40, "members": members, "couplings": [SEPARATION]})


def test_stacked_dropout_members_on_a_gpu_draw_their_masks_from_their_own_cuda_streams(tmp_path):
    """On a GPU a stack draws each member's dropout masks from the member's own CUDA generator
    state: stacked, each ends as it does trained one by one on the GPU, to float rounding."""
    members = [digits_member(f"d{i}", model_kwargs={"num_nodes": 64, "dropout": 0.3}, lr=0.005 * (i + 1)) for i in range(3)]
    assert_stacked_on_the_gpu_as_one_by_one(tmp_path, "gpu-dropout", {"steps": 30, "members": members, "couplings": []})


def test_packed_members_on_one_gpu_end_bitwise_as_each_alone_on_it(tmp_path):
    """Two members carried by one process on one GPU, one after another (not stacked), against each
    in its own process on the same GPU: the same kernels on the same shapes. Bitwise is the claim
    to check here (cuBLAS picks its algorithms by shape; separation's index_add, which is not
    deterministic on CUDA, only computes logged values)."""
    base = {"steps": 30, "members": [prelu_member("m1"), prelu_member("m2")], "couplings": [SEPARATION]}
    packed_dir, packed = run_on_gpu(tmp_path / "packed", {**base, "name": "gpu-packed", "placement": {"members_per_host": 2, "stacked": False}})
    alone_dir, alone = run_on_gpu(
        tmp_path / "alone",
        {
            **base,
            "name": "gpu-alone",
            "placement": {"members_per_host": 1},
            "members": [prelu_member("m1", resources={"num_gpus": 0.5}), prelu_member("m2", resources={"num_gpus": 0.5})],
        },
    )
    assert packed["m1"]["tags"]["poptrain.placement.pid"] == packed["m2"]["tags"]["poptrain.placement.pid"], "one process"
    assert alone["m1"]["tags"]["poptrain.placement.pid"] != alone["m2"]["tags"]["poptrain.placement.pid"], "a process each"
    for name in ("m1", "m2"):
        a, b = weights(packed_dir, name), weights(alone_dir, name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: packed and alone differ on the GPU"


def test_population_based_training_copies_a_donor_between_gpu_members(tmp_path):
    config = {"name": "gpu-pbt", **pbt_population(steps=40, every=10)}
    _, members = run_on_gpu(tmp_path, config)
    assert all(m["tags"]["poptrain.placement.device"].startswith("cuda") for m in members.values())
    assert any("pbt/exploited" in m["metrics"] for m in members.values()), "at least one exploit happened"


def test_a_donors_state_leaves_its_gpu_before_it_travels_to_the_receiver():
    """What population-based training puts in Ray's object store holds only CPU tensors (a CUDA
    tensor there would need the donor's GPU to be unpickled); the receiver loads it onto its own."""
    from poptrain.pbt.policy import transferable

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


RESTARTED = """
import json, sys
from pathlib import Path

import ray, yaml

import poptrain
from poptrain.driver.placement import ensure_ray
from tests.conftest import run_killing_m2_once

config = yaml.safe_load(Path(sys.argv[1]).read_text())
ensure_ray()  # one Ray for both runs: the killed run takes over the clean one's processes, as on the CPU
clean = poptrain.run({**config, "name": "clean"})
result, _ = run_killing_m2_once(config, config["steps"], until_step=config["steps"] - 60)
Path(sys.argv[2]).write_text(json.dumps({"clean": str(clean.output_dir), "killed": str(result.output_dir), "runs": result.member_run_ids,
                                         "devices": {m: p["device"] for m, p in result.placement.items()}}))
ray.shutdown()
"""


def test_a_killed_member_on_a_gpu_restarts_from_its_checkpoint_and_ends_bitwise_as_an_uninterrupted_run(tmp_path):
    """tests/test_failures.py's kill on the GPU: m2's process (its own, on half a GPU) SIGKILLed
    mid-run; a new process restores its checkpoint (model, optimizer, its CUDA random state) on
    the GPU and replays while m1 waits. Every step logged once, and final weights bitwise equal
    to the same run uninterrupted (see the module's docstring for why bitwise is the claim)."""
    # At least 8 ms a step (8 samples of 1 ms), so the kill lands mid-run however fast the GPU is.
    paced = {"name": "tests.helpers:slow_data", "kwargs": {"delay_s": 0.001}, "batch_size": 8}
    members = [prelu_member(m, resources={"num_gpus": 0.5}, data=paced) for m in ("m1", "m2")]
    config = gpu_config(
        tmp_path,
        {
            "name": "gpu-restarted",
            "steps": KILLED_STEPS,
            "checkpoint": {"every": KILLED_CHECKPOINT_EVERY},
            "placement": {"members_per_host": 1},
            "members": members,
            "couplings": [SEPARATION],
        },
    )
    found = drive_on_gpu(tmp_path, RESTARTED, config)
    assert all(d.startswith("cuda") for d in found["devices"].values()), found["devices"]
    uri = config["tracking"]["uri"]
    for member, run_id in found["runs"].items():
        assert logged_steps(uri, run_id) == list(range(KILLED_STEPS)), f"{member}: every step exactly once"
    assert MlflowClient(uri).get_run(found["runs"]["m2"]).data.tags["poptrain.restarts"] == "1"
    assert_bitwise_equal(Path(found["killed"]), Path(found["clean"]))


WARM = """
import json, sys
from pathlib import Path

import ray, yaml

import poptrain
from poptrain.driver import pool
from poptrain.driver.placement import ensure_ray


def gpu_memory(host):
    # In a warm host process: what torch's allocator holds on its GPU (bytes), and its peak since the last look.
    import torch

    held = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_allocated()}
    torch.cuda.reset_peak_memory_stats()
    return held


runs = yaml.safe_load(Path(sys.argv[1]).read_text())["runs"]
ensure_ray()  # this process's own Ray: a finished run's processes are kept warm for the next
looks = []
for config in runs:
    result = poptrain.run(config, keep_warm_s=600)
    looks.append({"pids": sorted(p["pid"] for p in result.placement.values()), "devices": sorted(p["device"] for p in result.placement.values()),
                  "memory": ray.get([host.__ray_call__.remote(gpu_memory) for host in pool.kept().actors])})
Path(sys.argv[2]).write_text(json.dumps(looks))
ray.shutdown()
"""


def test_a_warm_process_gives_its_gpu_memory_back_while_it_waits_and_builds_no_run_beside_the_last(tmp_path):
    """poptrain.driver.pool's handover on the GPU: a small run, then a run of members of 134 MB of
    parameters each, then that run again, in the same warm processes. Parked after the big run, a
    process holds on its GPU (allocated, and cached by torch's allocator) what it held parked after
    the small one (its CUDA libraries' workspaces), not the big run's models and optimizer state;
    and the next big run's peak is the last one's, not both runs at once."""
    from poptrain.builtins.models import MLP

    wide = {"in_features": 2048, "out_features": 1, "hidden": 16384, "activation": "prelu"}
    member_bytes = 4 * sum(p.numel() for p in MLP(**wide).parameters())  # one big member's parameters, float32
    small = [prelu_member(m) for m in ("m1", "m2")]
    big = [
        prelu_member(
            m,
            model={"name": "mlp", "kwargs": wide},
            data={"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 2048}, "batch_size": 32},
            optimizer={"name": "adam", "lr": 1e-4},
        )
        for m in ("m1", "m2")
    ]
    runs = [
        gpu_config(tmp_path, {"name": name, "steps": 10, "members": members, "couplings": [SEPARATION]})
        for name, members in (("gpu-warm-small", small), ("gpu-warm-big", big), ("gpu-warm-big-again", big))
    ]
    looks = drive_on_gpu(tmp_path, WARM, {"runs": runs})
    assert looks[0]["pids"] == looks[1]["pids"] == looks[2]["pids"], "the later runs took the warm processes over"
    assert all(d.startswith("cuda") for look in looks for d in look["devices"]), [look["devices"] for look in looks]
    for after_small, after_big, after_again in zip(*(look["memory"] for look in looks), strict=True):
        assert after_big["peak"] >= 2 * member_bytes, "the big run's members were on this GPU"
        assert after_big["allocated"] - after_small["allocated"] < member_bytes / 2, "nothing of the big run is still allocated"
        assert after_big["reserved"] - after_small["reserved"] < member_bytes / 2, "its cached blocks were given back"
        assert after_again["peak"] < after_big["peak"] + member_bytes / 2, "the next run was not built beside the last"


def test_a_batch_goes_to_the_gpu_without_waiting_for_the_work_queued_there():
    """A member's batch is copied through pinned memory (poptrain.components.batches.to_device): the copy is
    queued behind the GPU's work and the host goes on queueing the step. From ordinary (pageable)
    memory a copy may first wait for everything queued: a host-device synchronisation per step."""
    from poptrain.components.batches import to_device

    batch, device = [torch.randn(32, 20), torch.randn(32, 1)], torch.device("cuda")
    to_device(batch, device)  # the first pinned block and CUDA's start-up, not timed
    torch.cuda.synchronize()
    started = time.perf_counter()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work queued (torch's own tests use it)
    on_gpu = to_device(batch, device)
    queued_s = time.perf_counter() - started
    torch.cuda.synchronize()
    total_s = time.perf_counter() - started
    assert queued_s < 0.25 * total_s, f"the copy waited for the queued work: {queued_s:.3f} s of {total_s:.3f} s"
    assert all(t.device.type == "cuda" and torch.equal(t.cpu(), b) for t, b in zip(on_gpu, batch, strict=True))


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
