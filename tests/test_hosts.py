"""Hosts carrying several members: a member stays a member (its own results, checkpoints, MLflow
run) whichever host carries it and next to whom, and a host that dies restarts with all of them."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

import poptrain
from poptrain.config import ConfigError, load_config
from poptrain.driver.placement import PlacementError, host_resources, plan_hosts
from poptrain.training.host import member_devices
from tests.conftest import assert_bitwise_equal, digits_member, logged_steps, make_config, prelu_member, run_killing_m2_once, weights

STEPS, CHECKPOINT_EVERY = 240, 40
MEMBERS = ("m1", "m2", "m3")


def population(output_dir, tracking_uri, experiment, per_host, placement=None, **changes) -> dict:
    """Seed 000's two members kept apart by a separation coupling, and a third of another
    architecture (a digits classifier with dropout: what it draws at random in its steps is its
    own), held-out evaluation on, ``per_host`` members per host. Half a CPU each, so one torch
    thread wherever they are (how many threads compute a matrix product changes its float
    rounding)."""
    other_data = {"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20}, "batch_size": 32, "seed": 7}
    classifier = digits_member("m3", model_kwargs={"num_nodes": 32, "depth": 1, "dropout": 0.3}, data_kwargs={"split": "train"}, lr=0.003)
    members = [prelu_member("m1"), prelu_member("m2", data=other_data), classifier]
    return make_config(
        output_dir,
        tracking_uri,
        experiment,
        name=f"hosts-{per_host}",
        steps=STEPS,
        members=[{**m, "resources": {"num_cpus": 0.5}} for m in members],
        couplings=[{"type": "separation", "param": "activation.weight", "margin": 2.0, "members": ["m1", "m2"]}],
        checkpoint={"every": CHECKPOINT_EVERY},
        evaluation={"every": 80},
        placement=placement or {"members_per_host": per_host},
        **changes,
    )


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory, tracking_uri):
    """The same population one member per host; three on one host, one after another; two (m1
    and m2, alike: stacked) plus one."""
    out = tmp_path_factory.mktemp("hosts")
    return {
        1: poptrain.run(population(out, tracking_uri, "hosts", 1)),
        3: poptrain.run(population(out, tracking_uri, "hosts", 3, placement={"members_per_host": 3, "stacked": False})),
        2: poptrain.run(population(out, tracking_uri, "hosts", 2)),
    }


def test_a_member_ends_bitwise_the_same_whichever_host_carries_it_and_next_to_whom(runs):
    assert runs[1].placement["m1"]["pid"] != runs[1].placement["m2"]["pid"]
    assert len({runs[3].placement[m]["pid"] for m in MEMBERS}) == 1, "one process carried all three"
    assert runs[3].placement["m1"]["members_on_host"] == 3
    assert_bitwise_equal(runs[1].output_dir, runs[3].output_dir, MEMBERS)


def test_members_of_one_architecture_on_a_host_train_stacked_and_end_as_alone_to_float_rounding(runs):
    assert runs[2].placement["m1"]["pid"] == runs[2].placement["m2"]["pid"] != runs[2].placement["m3"]["pid"]
    assert runs[2].placement["m1"]["stacked_with"] == 2 and runs[2].placement["m3"]["stacked_with"] == 1
    for member in ("m1", "m2"):
        stacked, alone = weights(runs[2].output_dir, member), weights(runs[1].output_dir, member)
        for key in alone:
            torch.testing.assert_close(stacked[key], alone[key], rtol=1e-4, atol=1e-5, msg=f"{member}.{key}")
    assert_bitwise_equal(runs[1].output_dir, runs[2].output_dir, ("m3",))


def test_packed_members_keep_their_own_mlflow_runs_checkpoints_and_metrics(runs, tracking_uri):
    client = MlflowClient(tracking_uri)
    packed, alone = runs[3], runs[1]
    for member in MEMBERS:
        assert logged_steps(tracking_uri, packed.member_run_ids[member]) == list(range(STEPS)), f"{member}: every step exactly once"
        assert (packed.output_dir / "members" / member / "model.pt").exists()
        assert sorted(p.name for p in (packed.output_dir / "checkpoints" / member).glob("*.pt")) == sorted(
            p.name for p in (alone.output_dir / "checkpoints" / member).glob("*.pt")
        ), f"{member}: its own checkpoint files"
        assert packed.metrics[member] == alone.metrics[member], f"{member}: the same last step's metrics"
    separation = [m.value for m in client.get_metric_history(packed.run_id, "coupling/separation")]
    assert separation == [m.value for m in client.get_metric_history(alone.run_id, "coupling/separation")], "the same rounds, the same values"


def test_a_host_that_dies_restarts_with_all_its_members_and_the_run_ends_as_if_nothing_happened(ray_session, tmp_path, tracking_uri, runs):
    config = population(tmp_path / "runs", tracking_uri, "hosts-killed", 2)
    result, killed = run_killing_m2_once(config, STEPS, restarted=("m1", "m2"))
    assert result.placement["m1"]["pid"] == result.placement["m2"]["pid"] != killed["pid"]
    for member in MEMBERS:
        assert logged_steps(tracking_uri, result.member_run_ids[member]) == list(range(STEPS)), f"{member}: no step missing, none twice"
    assert MlflowClient(tracking_uri).get_run(result.member_run_ids["m1"]).data.tags["poptrain.restarts"] == "1"
    assert_bitwise_equal(result.output_dir, runs[2].output_dir, MEMBERS)  # stacked, interrupted or not


def test_async_exchange_with_packed_members_sends_one_message_per_host_and_logs_every_round(ray_session, tmp_path, tracking_uri):
    config = population(tmp_path / "runs", tracking_uri, "hosts-async", 3, exchange={"mode": "async", "max_staleness": 1})
    result = poptrain.run(config)
    for member in MEMBERS:
        assert logged_steps(tracking_uri, result.member_run_ids[member]) == list(range(STEPS))
    staleness = [m.value for m in MlflowClient(tracking_uri).get_metric_history(result.member_run_ids["m1"], "exchange/staleness")]
    assert staleness and max(staleness) <= 1.0


def config_with(members: int, per_host="auto", **resources) -> poptrain.config.RunConfig:
    member = prelu_member("x", resources=resources) if resources else prelu_member("x")
    return load_config({"name": "p", "steps": 1, "placement": {"members_per_host": per_host}, "members": [{**member, "name": f"m{i}"} for i in range(members)]})


def test_auto_packing_keeps_one_member_per_host_while_there_are_cores_and_packs_beyond():
    two_cpus = {"CPU": 2.0}
    assert plan_hosts(config_with(2), two_cpus) == [["m0"], ["m1"]], "no more members than CPUs: as before"
    assert plan_hosts(config_with(5), two_cpus) == [["m0", "m1", "m2"], ["m3", "m4"]], "one host per CPU"
    assert plan_hosts(config_with(5, per_host=5), two_cpus) == [[f"m{i}" for i in range(5)]]
    assert plan_hosts(config_with(3, num_gpus=1), {"CPU": 2.0, "GPU": 4.0}) == [["m0"], ["m1"], ["m2"]], "a GPU each"
    assert plan_hosts(config_with(6), {"CPU": 2.0, "GPU": 1.0}) == [[f"m{i}" for i in range(6)]], "members share the GPU in one process"


def test_a_packed_host_holds_its_members_resources_summed_and_auto_members_share_the_cores():
    cfg = config_with(1000)
    hosts = plan_hosts(cfg, {"CPU": 2.0})
    assert [len(h) for h in hosts] == [500, 500]
    assert host_resources(cfg, hosts, {"CPU": 2.0}) == [{"CPU": 1.0}, {"CPU": 1.0}]
    gpus = config_with(6)
    assert host_resources(gpus, plan_hosts(gpus, {"CPU": 2.0, "GPU": 1.0}), {"CPU": 2.0, "GPU": 1.0}) == [{"CPU": 2.0, "GPU": 1.0}]
    quarter = config_with(8, num_cpus=0.25)
    assert host_resources(quarter, plan_hosts(quarter, {"CPU": 2.0}), {"CPU": 2.0}) == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_a_gpu_share_above_one_gpu_must_be_a_whole_number_of_gpus():
    with pytest.raises(
        ConfigError, match=r"members\.0\.resources\.num_gpus: a GPU share must be a fraction of one GPU \(at most 1\) or a whole number of GPUs, got 1\.5"
    ):
        config_with(1, num_gpus=1.5)
    assert config_with(1, num_gpus=2).members[0].resources.num_gpus == 2


def test_members_of_a_host_holding_several_gpus_train_on_distinct_gpus():
    cfg = config_with(2, per_host=2, num_gpus=1)
    assert host_resources(cfg, plan_hosts(cfg, {"CPU": 2.0, "GPU": 2.0}), {"CPU": 2.0, "GPU": 2.0}) == [{"CPU": 2.0, "GPU": 2.0}]
    assert member_devices(2, "cuda", 2) == ["cuda:0", "cuda:1"], "one GPU each, not both on cuda:0"
    assert member_devices(4, "cuda", 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"], "in turn"
    assert member_devices(3, "cuda", 1) == ["cuda:0"] * 3, "a host of one GPU (or a share of one): all on it"
    assert member_devices(2, "cpu", 0) == ["cpu", "cpu"]


def test_gpu_shares_a_host_cannot_place_or_use_are_refused_before_anything_starts():
    # Four members at 0.3 on one host ask Ray for 1.2 GPUs, which it cannot place.
    with pytest.raises(
        ConfigError, match=r"placement\.members_per_host: the host of members m0, m1, m2, m3 cannot be placed: its 4 members' GPU shares sum to 1\.2"
    ):
        config_with(4, per_host=4, num_gpus=0.3)
    # 2 GPUs for five members at 0.4: cuda:0 would carry three of them.
    with pytest.raises(ConfigError, match=r"cuda:0 would carry 1\.2 GPUs' worth"):
        config_with(5, per_host=5, num_gpus=0.4)
    assert config_with(4, per_host=4, num_gpus=0.5).placement.members_per_host == 4, "two members per GPU fill both evenly"
    # Packed by `auto` (more members than CPUs): found when the cluster is known, before placing.
    cfg = config_with(4, num_gpus=0.3)
    with pytest.raises(PlacementError, match=r"sum to 1\.2"):
        host_resources(cfg, plan_hosts(cfg, {"CPU": 2.0, "GPU": 1.0}), {"CPU": 2.0, "GPU": 1.0})


def test_members_sharing_gpus_under_auto_get_one_process_per_gpu_not_one_each():
    sixteen_cores = {"CPU": 16.0, "GPU": 1.0}
    cfg = config_with(16)
    assert plan_hosts(cfg, sixteen_cores) == [[f"m{i}" for i in range(16)]], "one host (one CUDA context) for the GPU"
    assert host_resources(cfg, plan_hosts(cfg, sixteen_cores), sixteen_cores) == [{"CPU": 16.0, "GPU": 1.0}]
    two_gpus = {"CPU": 16.0, "GPU": 2.0}
    assert [len(h) for h in plan_hosts(cfg, two_gpus)] == [8, 8]
    assert host_resources(cfg, plan_hosts(cfg, two_gpus), two_gpus) == [{"CPU": 8.0, "GPU": 1.0}] * 2
    asked = config_with(16, num_gpus=0.0625)
    assert len(plan_hosts(asked, sixteen_cores)) == 16, "a share per process only when asked for"
    mixed = load_config({"name": "p", "steps": 1, "members": [{**prelu_member(f"m{i}"), "resources": {"num_gpus": 1 if i == 0 else "auto"}} for i in range(5)]})
    hosts = plan_hosts(mixed, {"CPU": 16.0, "GPU": 3.0})
    assert hosts == [["m0"], ["m1", "m2"], ["m3", "m4"]], "a GPU asked for by number keeps its host; the others share the 2 left"
    assert host_resources(mixed, hosts, {"CPU": 16.0, "GPU": 3.0}) == [{"CPU": 3.2, "GPU": 1.0}, {"CPU": 6.4, "GPU": 1.0}, {"CPU": 6.4, "GPU": 1.0}]


_MAPPED_BY_A_48_MIB_TENSOR = """
import ctypes, sys, torch
from poptrain.training.allocator import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "host" else None
before = libc.mallinfo2().hblkhd
block = torch.ones(12 << 20)  # 48 MiB: above anything glibc's own threshold reaches (32 MiB)
print(applied, (libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_a_hosts_allocator_serves_a_steps_large_temporaries_from_its_heap_where_freed_pages_stay_mapped():
    """poptrain.training.allocator: in a fresh process as a host sets it, a 48 MiB block comes from
    the heap (kept mapped when freed, so the next step faults no new pages); by default glibc maps
    it on its own and unmaps it when it is freed."""

    def mapped_mib(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _MAPPED_BY_A_48_MIB_TENSOR, mode], capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])

    assert mapped_mib("default") == ("None", 48)
    assert mapped_mib("host") == ("True", 0)
