"""Faults with real processes: killed members, a killed driver, NaNs, damaged checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import poptrain
from poptrain.storage.checkpoint import CheckpointError, latest_complete_step, load_checkpoint, save_checkpoint, steps_of
from tests.conftest import (
    KILLED_CHECKPOINT_EVERY,
    KILLED_STEPS,
    REPO,
    InBackground,
    assert_bitwise_equal,
    assert_weights_equal,
    logged_steps,
    make_config,
    members_on_thirds_of_the_digits,
    prelu_member,
    resume_in_a_process,
    run_killing_m2_once,
    run_killing_the_driver,
    started,
    weights,
)
from tests.mlflow_server import TcpRelay

# The interrupted runs below and their uninterrupted twin.
STEPS, CHECKPOINT_EVERY = KILLED_STEPS, KILLED_CHECKPOINT_EVERY


@pytest.fixture(scope="session")  # also read by this module's EARLY test, run last: built once
def uninterrupted(ray_session, tmp_path_factory, tracking_uri):
    """A run never interrupted, with the settings of the interrupted ones (its RunResult)."""
    config = make_config(tmp_path_factory.mktemp("clean"), tracking_uri, "uninterrupted", name="clean", steps=STEPS, checkpoint={"every": CHECKPOINT_EVERY})
    return poptrain.run(config)


def steps_of_m1_while_m2_was_down(tracking_uri, result, killed):
    """m1's steps logged between m2's kill and m2's first step after it (m2's replayed steps are
    not logged again, so its first new step is after its restart and replay)."""
    client = MlflowClient(tracking_uri)
    back_ms = min(m.timestamp for m in client.get_metric_history(result.member_run_ids["m2"], "loss") if m.step > killed["step"])
    return [m.step for m in client.get_metric_history(result.member_run_ids["m1"], "loss") if killed["time_ms"] < m.timestamp < back_ms]


def test_a_killed_member_is_restarted_from_its_checkpoint_and_the_run_ends_as_if_nothing_happened(ray_session, base_config, tracking_uri, uninterrupted):
    result, killed = run_killing_m2_once(base_config(steps=STEPS, checkpoint={"every": CHECKPOINT_EVERY}), STEPS)
    assert logged_steps(tracking_uri, result.member_run_ids["m2"]) == list(range(STEPS)), "no step missing, none twice"
    assert MlflowClient(tracking_uri).get_run(result.member_run_ids["m2"]).data.tags["poptrain.restarts"] == "1"
    assert len(steps_of_m1_while_m2_was_down(tracking_uri, result, killed)) <= 3, "its peer waited for it"
    # It ran in the uninterrupted run's warm processes (poptrain.driver.pool), and m2's new process still
    # restored this run's checkpoint, not the run its process was first started for.
    assert result.placement["m1"]["pid"] == uninterrupted.placement["m1"]["pid"]
    assert_bitwise_equal(result.output_dir, uninterrupted.output_dir)


def test_with_while_restarting_continue_peers_go_on_with_a_dead_members_last_values(ray_session, base_config, tracking_uri):
    config = base_config(steps=STEPS, checkpoint={"every": CHECKPOINT_EVERY}, failure={"while_restarting": "continue"})
    result, killed = run_killing_m2_once(config, STEPS)
    assert len(steps_of_m1_while_m2_was_down(tracking_uri, result, killed)) >= 20, "its peer did not wait"
    for member in ("m1", "m2"):
        assert logged_steps(tracking_uri, result.member_run_ids[member]) == list(range(STEPS)), f"{member}: every step exactly once"
    assert all(torch.isfinite(t).all() for t in weights(result.output_dir, "m2").values())
    couplings = MlflowClient(tracking_uri).get_metric_history(result.run_id, "coupling/separation")
    assert sorted(m.step for m in couplings) == list(range(STEPS)), "every round completed once"


# The averaging family at once, each rewriting parameters of its own (one coupling per quantity: in place).
AVERAGING_FAMILY = [
    {"type": "average", "every": 3, "params": ["input.bias"]},  # local SGD
    {"type": "average", "name": "papa", "rate": 0.5, "params": ["input.weight"]},
    {"type": "wash", "fraction": 0.2, "params": ["output.*"]},
    {"type": "gossip", "params": ["activation.weight"]},
]


def test_killed_members_of_the_averaging_family_replay_the_rounds_they_missed_and_a_resume_ends_the_same(ray_session, base_config, tracking_uri):
    """Local SGD, PAPA, WASH and gossip in shared memory: the coordinator writes each round into the
    members' own pages, and keeps a copy for the replay of a member restarted from its checkpoint;
    the run ends bitwise as an uninterrupted one. Taken back to its last checkpoint (as if the
    driver had died there) and resumed, it ends there again: the rounds depend on the run's seed and
    the step only. (DiLoCo, which keeps state between rounds, has a test of its own below.)"""
    from poptrain.driver.population import resume
    from poptrain.storage.checkpoint import latest_complete_step

    members = [
        prelu_member("m1"),
        prelu_member("m2", data={"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20, "seed": 1}, "batch_size": 32}),
    ]
    steps = 240  # the kill window (steps 40 to steps - 100) spans several progress polls even when the host is fast
    settings = dict(steps=steps, checkpoint={"every": CHECKPOINT_EVERY}, members=members, couplings=AVERAGING_FAMILY)
    clean = poptrain.run(base_config(name="averaging-clean", **settings))
    result, _ = run_killing_m2_once(base_config(name="averaging", **settings), steps)
    assert result.placement["m2"]["shared_params"] > 0, "the restarted member shares its parameters again"
    assert logged_steps(tracking_uri, result.member_run_ids["m2"]) == list(range(steps))
    assert_bitwise_equal(result.output_dir, clean.output_dir)

    run_dir = result.output_dir
    assert latest_complete_step(run_dir, ["m1", "m2"]) == steps - CHECKPOINT_EVERY
    for name in ("m1", "m2"):
        (run_dir / "members" / name / "model.pt").unlink()
    resume(run_dir)
    assert_bitwise_equal(run_dir, clean.output_dir)


def test_a_replacement_that_dies_while_starting_is_replaced_again_within_max_restarts(ray_session, base_config, tracking_uri, tmp_path):
    marker = tmp_path / "deaths"
    data = {"name": "tests.helpers:dies_while_restarting", "kwargs": {"marker": str(marker), "deaths": 1}, "batch_size": 32}
    config = base_config(
        steps=120, checkpoint={"every": CHECKPOINT_EVERY}, failure={"max_restarts": 2}, members=[prelu_member("m1"), prelu_member("m2", data=data)]
    )
    killed = {}

    def kill_m2_once(snapshot):
        if not killed and snapshot["members"].get("m2", {}).get("step", 0) >= 40:
            marker.write_text("0")  # from now on, m2's next process dies while it starts
            killed["pid"] = snapshot["placement"]["m2"]["pid"]
            os.kill(killed["pid"], signal.SIGKILL)

    result = poptrain.run(config, progress=kill_m2_once, poll_s=0.1)
    assert killed and marker.read_text() == "1", "m2 was killed, and its first replacement died while starting"
    assert result.restarts == {"m2": 2}, "both deaths count against failure.max_restarts"
    assert MlflowClient(tracking_uri).get_run(result.member_run_ids["m2"]).data.tags["poptrain.restarts"] == "2"
    assert logged_steps(tracking_uri, result.member_run_ids["m2"]) == list(range(120)), "no step missing, none twice"


def test_a_member_that_keeps_dying_fails_the_run_naming_it_and_the_checkpoint(ray_session, base_config, tracking_uri, experiment):
    config = base_config(steps=300, checkpoint={"every": 20}, failure={"max_restarts": 0})

    def kill_m1(snapshot):
        if snapshot["members"].get("m1", {}).get("step", 0) >= 40:
            try:
                os.kill(snapshot["placement"]["m1"]["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass

    with pytest.raises(poptrain.PopulationError, match=r"member m1 died.*failure.max_restarts: 0.*poptrain resume"):
        poptrain.run(config, progress=kill_m1, poll_s=0.1)
    # The failed runs keep what was logged before the failure, every step once.
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"}
    (m1,) = [r for r in runs if r.data.tags.get("poptrain.member") == "m1"]
    steps = logged_steps(tracking_uri, m1.info.run_id)
    assert steps == list(range(len(steps))) and len(steps) >= 40


def killed_driver(folder, uri):
    """The uninterrupted run's config as a real `poptrain run` SIGKILLed with its Ray after step
    50's checkpoint, then `poptrain resume`, each a process of its own: its run folder."""
    config = make_config(folder / "runs", uri, "resumed", steps=STEPS, checkpoint={"every": CHECKPOINT_EVERY}, name="resumable")
    run_dir, _ = run_killing_the_driver(config, folder, 50)
    resume_in_a_process(run_dir, folder)
    return run_dir


def start_killed_driver():
    return InBackground(killed_driver, "poptrain-killed-driver-")


def test_a_killed_driver_resumes_into_the_same_runs_bitwise_equal_to_an_uninterrupted_run(request, uninterrupted):
    steps = STEPS
    work = started(request, start_killed_driver)  # its processes started with the session, beside the suite
    run_dir, tracking_uri = work.result(), work.uri

    record = yaml.safe_load((run_dir / "run.json").read_text())
    for member, run_id in record["members"].items():
        assert logged_steps(tracking_uri, run_id) == list(range(steps)), f"{member}: every step exactly once"
    assert logged_steps(tracking_uri, record["parent"], "coupling/separation") == list(range(steps)), "the coordinator's too"
    parent = MlflowClient(tracking_uri).get_run(record["parent"])
    assert parent.info.status == "FINISHED"
    assert_bitwise_equal(run_dir, uninterrupted.output_dir)


def test_diloco_global_weights_and_outer_momentum_survive_a_member_kill_and_a_resume_bitwise(ray_session, base_config, tmp_path, tracking_uri):
    """DiLoCo (H = 5) keeps its global weights and outer momentum on the coordinator. A member killed
    mid-run is replayed the outer rounds it missed, and the run ends bitwise at the single-process
    reference; taken back to its last checkpoint (as if the driver had died there) and resumed with
    `poptrain resume`, it restores that state from beside the checkpoint and ends there again.
    Without the saved state the resume is refused, naming the file."""
    from poptrain.config import ConfigError
    from poptrain.driver.population import resume
    from poptrain.storage.checkpoint import COUPLING_STATE, latest_complete_step, member_dir
    from tests.reference import diloco_training

    steps = 240  # the kill window (steps 40 to steps - 100) spans several progress polls even when the host is fast
    models, members, streams = members_on_thirds_of_the_digits(tmp_path, 10, count=2)
    config = base_config(
        name="diloco",
        members=members,
        couplings=[{"type": "diloco", "every": 5}],
        steps=steps,
        checkpoint={"every": CHECKPOINT_EVERY},
        exchange={"every": 1, "mode": "sync"},
        placement={"members_per_host": 1},
    )
    result, _ = run_killing_m2_once(config, steps)
    reference = diloco_training(models, streams(), steps, lr=0.01, every=5, outer_lr=0.7, outer_momentum=0.9)
    for name, module in zip(("m1", "m2"), reference, strict=True):
        assert_weights_equal(result, name, module, atol=0)

    run_dir, names = result.output_dir, ["m1", "m2"]
    resumed_from = latest_complete_step(run_dir, names)
    assert resumed_from == steps - CHECKPOINT_EVERY, "resumes after many outer steps: a momentum that matters"
    for name in names:
        (run_dir / "members" / name / "model.pt").unlink()
    state = member_dir(run_dir, COUPLING_STATE)
    state.rename(run_dir / "moved")
    with pytest.raises(ConfigError, match=rf"cannot resume from step {resumed_from}: couplings \['diloco'\] keep state between rounds"):
        resume(run_dir)
    (run_dir / "moved").rename(state)
    resume(run_dir)
    for name, module in zip(("m1", "m2"), reference, strict=True):
        assert_weights_equal(result, name, module, atol=0)


def test_with_nonfinite_rollback_a_member_goes_back_to_its_checkpoint_and_no_peer_sees_a_nan(ray_session, base_config, tracking_uri):
    # m1's data has one NaN sample: unshuffled, 8 batches an epoch, it spoils steps 1 and 9.
    data = {"name": "tests.helpers:poisoned_data", "kwargs": {"bad_index": 40}, "batch_size": 32, "shuffle": False}
    config = base_config(members=[prelu_member("m1", data=data), prelu_member("m2")], steps=12, checkpoint={"every": 4}, failure={"nonfinite": "rollback"})
    result = poptrain.run(config)
    rollbacks = MlflowClient(tracking_uri).get_metric_history(result.member_run_ids["m1"], "rollback")
    assert sorted((m.step, m.value) for m in rollbacks) == [(1, 0.0), (9, 8.0)], "to the initial state, then to the step-8 checkpoint"
    assert all(torch.isfinite(t).all() for t in weights(result.output_dir, "m1").values())
    couplings = MlflowClient(tracking_uri).get_metric_history(result.run_id, "coupling/separation")
    assert len(couplings) == 12 and all(torch.isfinite(torch.tensor(m.value)) for m in couplings)


def test_an_mlflow_server_unreachable_mid_run_loses_no_metric_and_logs_none_twice(ray_session, base_config, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # MLflow's own retries, shortened for the test
    relay = TcpRelay(int(mlflow_server.rsplit(":", 1)[1]))  # the run reaches the server through it
    outage = {}

    def restore():
        relay.restore()
        outage["restored"] = True

    def cut_then_restore(snapshot):
        step = min((m.get("step", 0) for m in snapshot["members"].values()), default=0)
        if not outage and step >= 20:
            relay.cut()
            outage["step"] = step
            # On a timer, not on progress: the outage may outlast training, which must not wait for it.
            threading.Timer(3.0, restore).start()

    steps = 600
    tracking = {"uri": relay.url, "experiment": "outage", "plots": False, "log_models": False}
    # At least 8 ms a step (8 samples of 1 ms), so the run outlasts the first progress snapshots.
    paced = [prelu_member(m, data={"name": "tests.helpers:slow_data", "kwargs": {"delay_s": 0.001}, "batch_size": 8}) for m in ("m1", "m2")]
    try:
        result = poptrain.run(base_config(steps=steps, tracking=tracking, members=paced), progress=cut_then_restore, poll_s=0.1)
    finally:
        relay.cut()
    assert outage.get("restored") and outage["step"] < steps - 100, "the server was unreachable mid-run"
    client = MlflowClient(mlflow_server)
    for member, run_id in result.member_run_ids.items():
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(steps)), f"{member}: every step exactly once"
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_damaged_checkpoints_are_refused_never_half_loaded(tmp_path):
    state = {"step": 3, "model": {"w": torch.arange(1000.0)}}
    path = save_checkpoint(state, tmp_path, "m1", 3, keep=2)
    assert load_checkpoint(path)["model"]["w"].equal(state["model"]["w"])
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(CheckpointError, match="truncated or was altered"):
        load_checkpoint(path)
    path.write_bytes(payload[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="truncated or was altered"):
        load_checkpoint(path)


def test_a_checkpoint_that_smuggles_objects_is_refused_even_with_a_matching_checksum(tmp_path):
    import argparse
    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save({"step": 1, "payload": argparse.Namespace(command="rm -rf /")}, buffer)  # an arbitrary Python object
    path = tmp_path / "checkpoints" / "m1" / "step-000000001.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(buffer.getvalue())
    path.with_suffix(".sha256").write_text(hashlib.sha256(buffer.getvalue()).hexdigest())
    with pytest.raises(CheckpointError, match="other than tensors"):
        load_checkpoint(path)


WRITER = """
import os, sys, torch
from poptrain.storage import checkpoint
real_fsync = os.fsync
def fsync_then_stall(fd):
    real_fsync(fd)
    if checkpoint.checkpoint_path(sys.argv[1], "m1", 20).exists() is False:
        print("temporary file written", flush=True)
        import time; time.sleep(60)
os.fsync = fsync_then_stall
checkpoint.save_checkpoint({"step": 20, "model": {"w": torch.ones(10)}}, sys.argv[1], "m1", 20, keep=2)
"""


def test_a_process_killed_in_the_middle_of_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    save_checkpoint({"step": 10, "model": {"w": torch.zeros(10)}}, tmp_path, "m1", 10, keep=2)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert writer.stdout.readline().strip() == "temporary file written"
    writer.kill()
    writer.wait()
    assert steps_of(tmp_path, "m1") == [10]
    assert latest_complete_step(tmp_path, ["m1"]) == 10
    assert load_checkpoint(tmp_path / "checkpoints" / "m1" / "step-000000010.pt")["model"]["w"].equal(torch.zeros(10))


def test_an_artifact_that_cannot_be_logged_at_the_end_warns_and_keeps_the_weights(ray_session, base_config, tracking_uri, capsys):
    """Issue 14: the run's config.yaml deleted under the driver (as a second Ray node unpacking a
    job's working dir did) failed the finished run with a traceback. Now: a warning naming what was
    not logged and where the weights are, the weights saved, the runs FINISHED."""
    config = base_config(steps=6)
    deleted = []

    def delete_config(snapshot):
        path = Path(config["output_dir"]) / "pop" / "config.yaml"
        if path.exists():
            path.unlink()
            deleted.append(path)

    result = poptrain.run(config, progress=delete_config, keep_warm_s=0)
    assert deleted
    err = capsys.readouterr().err
    assert "poptrain: warning: could not log the config" in err and "config.yaml" in err, err
    assert f"the final weights are saved (m1: {result.output_dir / 'members' / 'm1' / 'model.pt'}" in err, err
    assert "Traceback" not in err, err
    for member in ("m1", "m2"):
        assert "activation.weight" in weights(result.output_dir, member)
    client = MlflowClient(tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
