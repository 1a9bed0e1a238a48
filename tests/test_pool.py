"""Warm processes (poptrain.driver.pool): a finished run's processes take on the next run of the same
shape, which must end exactly as it would in new processes, and they give their resources back."""

from __future__ import annotations

import time

import psutil
from mlflow.tracking import MlflowClient

import poptrain
from tests.conftest import assert_bitwise_equal, prelu_member, run_killing_m2_once


def pids(result) -> set[int]:
    return {info["pid"] for info in result.placement.values()}


def losses(tracking_uri, result) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(tracking_uri)
    return {m: sorted((x.step, x.value) for x in client.get_metric_history(run_id, "loss")) for m, run_id in result.member_run_ids.items()}


def within(seconds: float, condition) -> bool:
    """Whether ``condition()`` holds within ``seconds`` (Ray kills and frees resources asynchronously)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def cpus_free_within(ray, seconds: float) -> bool:
    return within(seconds, lambda: ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"])


def ended_within(processes: set[int], seconds: float) -> bool:
    """Whether every one of ``processes`` has exited within ``seconds``."""
    return within(seconds, lambda: not any(psutil.pid_exists(p) for p in processes))


def test_a_run_of_the_same_shape_takes_over_the_warm_processes_and_ends_as_in_new_ones(ray_session, base_config, tracking_uri):
    first = poptrain.run(base_config(name="first", steps=8))
    # Another run entirely, of the same shape: its own seed, a frozen layer, a learning rate per
    # member, and a term of its own. Nothing of the first run may leak into it.
    other = dict(
        steps=20,
        seed=7,
        members=[prelu_member("m1", frozen=["input.*"]), prelu_member("m2", optimizer={"name": "sgd", "lr": 0.05, "kwargs": {"momentum": 0.9}})],
        couplings=[{"type": "separation", "param": "activation.weight", "margin": 3.0}],
    )
    warm = poptrain.run(base_config(name="warm", **other))
    assert pids(warm) == pids(first), "the first run's member processes took the second run on"

    poptrain.release_warm_members()
    assert cpus_free_within(ray_session, 30), "released: every CPU is free again"
    assert ended_within(pids(first), 30)
    fresh = poptrain.run(base_config(name="fresh", **other))
    assert not pids(fresh) & pids(first), "new processes"

    assert losses(tracking_uri, warm) == losses(tracking_uri, fresh)
    assert_bitwise_equal(warm.output_dir, fresh.output_dir)


def test_on_one_node_a_run_splitting_the_same_cpus_otherwise_takes_over_the_warm_processes(ray_session, base_config, tracking_uri):
    """Two members on 2 cores hold 1 + 1 CPUs; three hold 1.33 + 0.67 on the same two hosts. On one
    node only the total is reserved, so the three take the two's processes and end as in new ones,
    a host killed mid-run included: its new process asks for what the warm bundle holds (asking
    for the three's 1.33 CPUs it was never placed)."""

    three = dict(steps=120, checkpoint={"every": 20}, members=[prelu_member("m1"), prelu_member("m2"), prelu_member("m3")])
    first = poptrain.run(base_config(name="first", steps=4))
    first_pids = pids(first)
    warm, _ = run_killing_m2_once(base_config(name="warm", **three), 120, restarted=("m1", "m2"), from_step=20, until_step=80)
    assert pids(warm) & first_pids and pids(warm) != first_pids, "the two members' processes took the three on, one of them restarted"
    assert sorted(info["members_on_host"] for info in {i["pid"]: i for i in warm.placement.values()}.values()) == [1, 2]
    fresh = poptrain.run(base_config(name="fresh", **three), keep_warm_s=0)
    assert not pids(fresh) & first_pids, "new processes"
    assert losses(tracking_uri, warm) == losses(tracking_uri, fresh)
    assert_bitwise_equal(warm.output_dir, fresh.output_dir, members=("m1", "m2", "m3"))


def test_a_run_of_another_shape_ends_the_warm_processes_first(ray_session, base_config):
    two = poptrain.run(base_config(steps=4))
    alone = poptrain.run(base_config(steps=4, members=[prelu_member("m1")], couplings=[]), keep_warm_s=0)
    assert not pids(alone) & pids(two)
    assert ended_within(pids(two), 30), "ended to make room"
    assert cpus_free_within(ray_session, 30), "keep_warm_s=0: the processes ended with the run"


def test_warm_processes_end_after_keep_warm_s_unused(ray_session, base_config):
    result = poptrain.run(base_config(steps=4), keep_warm_s=1.0)
    assert all(psutil.pid_exists(p) for p in pids(result)), "kept for the next run"
    assert cpus_free_within(ray_session, 30)
    assert ended_within(pids(result), 30)


def test_warm_processes_dropped_say_why(ray_session, base_config, capsys, monkeypatch):
    """Issue 14: warm processes that are not kept, or not reused, were dropped silently."""
    import signal

    from poptrain.driver import pool

    first = poptrain.run(base_config(name="first", steps=4))
    killed = next(iter(pids(first)))
    psutil.Process(killed).send_signal(signal.SIGKILL)
    assert ended_within({killed}, 30)
    second = poptrain.run(base_config(name="second", steps=4))
    err = capsys.readouterr().err
    assert "poptrain: warning: the warm processes of an earlier run are not reused; new ones start (one of them died" in err, err
    assert not pids(second) & pids(first)

    def refuse(warm, idle_s):
        raise RuntimeError("the pool is closed")

    monkeypatch.setattr(pool, "keep", refuse)
    third = poptrain.run(base_config(name="third", steps=4))
    err = capsys.readouterr().err
    assert "poptrain: warning: this run's processes are not kept warm for the next run (RuntimeError: the pool is closed)" in err, err
    assert ended_within(pids(second) | pids(third), 30)
    assert cpus_free_within(ray_session, 30)


def test_a_parked_process_keeps_nothing_of_its_last_run_stacked_members_included(in_process_host, request):
    """What ``MemberHost._start`` leaves a host holding (its trainers on one link, two of them in a
    stacked group), built in this process without Ray: once parked, no trainer, model, optimizer
    or stack of that run is still alive, so the next run is not built beside it (the objects
    _start froze out of the collector's full passes included)."""
    import gc
    import weakref

    from poptrain.tracking.outbox import MetricsOutbox
    from poptrain.training.host import Hosted, MemberHost
    from poptrain.training.stacked import StackedGroup, form_groups
    from tests.in_process import train_host

    trainers, link = in_process_host(
        [
            prelu_member("m1"),
            prelu_member("m2"),
            prelu_member("m3", model={"name": "mlp", "kwargs": {"in_features": 20, "out_features": 1, "hidden": 8, "activation": "prelu"}}),
        ]
    )
    warm = MemberHost.__new__(MemberHost)  # the actor's state, not the actor: no Ray here
    warm.link, warm.coordinator, warm.run = link, None, trainers[0].run
    warm.members = [Hosted(t, MetricsOutbox()) for t in trainers]
    warm.by_name = {m.name: m for m in warm.members}
    warm.units = form_groups(trainers)
    warm.groups = [u for u in warm.units if isinstance(u, StackedGroup)]
    train_host(warm.units, link, 2)  # optimizer state in the stack and in the members' optimizers
    gc.freeze()  # as _start leaves the run's objects: out of the collector's full passes
    request.addfinalizer(gc.unfreeze)  # this process's, should the test fail before park
    assert len(warm.groups) == 1, "m1 and m2 stack, m3 trains alone"
    held = [weakref.ref(x) for t in trainers for x in (t, t.model, t.optimizer)] + [weakref.ref(g) for g in warm.groups]
    held += [weakref.ref(warm.groups[0].state[k]["exp_avg"]) for k in warm.groups[0].keys]
    del trainers, link
    gc.collect()
    assert all(r() is not None for r in held), "the host still carries the run"

    warm.park()
    alive = [r() for r in held if r() is not None]
    assert not alive, f"still alive after park: {[type(x).__name__ for x in alive]}"
