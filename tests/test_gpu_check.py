"""The prepared GPU check (``python -m benchmarks --gpu``) stays runnable between GPU loans: its dry
run goes through every step on the CPU at tiny sizes, says it found no GPU and writes its JSON;
without a GPU and without ``--dry-run`` it measures nothing and says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def benchmarks(*args, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "benchmarks", *args, "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_the_gpu_check_dry_run_exercises_every_step_on_the_cpu_and_says_it_found_no_gpu(ray_session, tmp_path, capsys):
    # In this process, on the session's Ray (the check uses a Ray already up, as `python -m
    # benchmarks --gpu --dry-run` starts its own): the suite hides GPUs from what it starts
    # (conftest), so this is the dry run on any machine.
    from benchmarks.gpu import check

    assert check(tmp_path, dry_run=True) == 0
    done = capsys.readouterr()
    assert "found no GPU" in done.out and "no GPU found, plumbing only" in done.out, done.out[-3000:]
    report = json.loads((tmp_path / "latest-gpu-dry-run.json").read_text())
    assert report["gpu_found"] is False and not [r for r in report["rows"] if r.get("error")]
    rows = {r["figure"]: r for r in report["rows"]}
    assert set(rows) == {"gpu_tests", "quick_start", "warm_handover", "two_members_vs_single_process", "stacked_vs_torch_func", "stacked_syncs_per_step"}
    assert set(rows["quick_start"]["details"]["devices"].values()) == {"cpu"} and rows["quick_start"]["value"] == 2, "each member's device read back"
    assert rows["stacked_vs_torch_func"]["ratio"] > 0 and rows["stacked_vs_torch_func"]["baseline"]["value"] > 0
    assert rows["stacked_vs_torch_func"]["target"] == {"op": ">=", "value": 1.0}
    two = rows["two_members_vs_single_process"]
    assert two["ratio"] > 0 and two["baseline"]["value"] > 0 and two["details"]["devices"] == ["cpu"] and two["details"]["single_process"]["device"] == "cpu"
    # No CUDA synchronisation on a CPU to count: said so, after the stacked steps ran under the profiler.
    syncs = rows["stacked_syncs_per_step"]
    assert not syncs["available"] and "no CUDA synchronisation on the CPU" in syncs["note"] and syncs["target"] == {"op": "<=", "value": 1.0}
    assert syncs["details"]["steps"] == list(range(10, 20)) and min(syncs["details"]["cpu_ops_per_step"]) > 0, "every profiled step seen"
    for figure in rows:
        assert figure in done.out, "the table"

    without = benchmarks("--gpu", tmp_path=tmp_path / "real")
    assert without.returncode == 2 and "sees no CUDA device" in without.stderr and not (tmp_path / "real").exists()
