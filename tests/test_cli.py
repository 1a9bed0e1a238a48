"""The `poptrain` command as a user runs it: exit codes, messages, what it leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.conftest import REPO, InBackground, started
from tests.conftest import poptrain_command as poptrain


def test_invalid_config_exits_2_with_one_message_and_starts_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load((REPO / "configs" / "prelu_separation.yaml").read_text())
    config["members"][1]["frozen"] = ["encoder.*"]
    config["couplings"][0]["members"] = ["m1", "m3"]
    bad.write_text(yaml.safe_dump(config))
    done = poptrain("run", str(bad), cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert str(bad) in done.stderr
    assert "couplings.0.members: unknown member 'm3'" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"], "nothing written: no runs/, no mlflow.db"


def test_check_prints_the_resolved_config_and_the_driver_never_loads_the_compiler(tmp_path):
    done = poptrain("check", str(REPO / "configs" / "prelu_separation.yaml"), "steps=5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = yaml.safe_load(done.stdout)
    assert resolved["steps"] == 5 and resolved["couplings"][0]["margin"] == 2.0
    assert not (tmp_path / "runs").exists()
    # What `poptrain run` checks before Ray starts (prepare) must not build the optimizers: that
    # imports torch._dynamo (seconds of CPU and 70 MiB in the driver), which the checks do not need.
    # (`poptrain check` itself also tries torch.func on each architecture, which imports it.)
    # PYTHONPROFILEIMPORTTIME lists every module the process imports on stderr.
    script = f"from poptrain.driver.checks import prepare; prepare({str(REPO / 'configs' / 'prelu_separation.yaml')!r}, ['steps=5'])"
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONPROFILEIMPORTTIME": "1"}
    environment.pop("MLFLOW_TRACKING_URI", None)
    prepared = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "| torch._dynamo" not in prepared.stderr and "torch.optim" in prepared.stderr


def seed_000_from_the_command_line(folder, uri):
    """`poptrain run configs/prelu_separation.yaml` as a user types it in ``folder`` (its default
    sqlite store there), m1 with two weight-0 terms of the user's own: the finished process."""
    # Import paths in a config find modules in the folder `poptrain run` is started from and on the
    # user's PYTHONPATH, in the members' processes too: m1 evaluates and logs two weight-0 terms.
    zero = "def zero(model, inputs, outputs, targets):\n    return 0 * outputs.sum()\n"
    (folder / "here_terms.py").write_text(zero)
    (folder / "lib").mkdir()
    (folder / "lib" / "lib_terms.py").write_text(zero)
    user_terms = "members.m1.terms=[{name: here, fn: {name: 'here_terms:zero'}, weight: 0}, {name: lib, fn: {name: 'lib_terms:zero'}, weight: 0}]"
    pythonpath = os.pathsep.join([str(REPO), str(folder / "lib")])
    return poptrain("run", str(REPO / "configs" / "prelu_separation.yaml"), "steps=300", user_terms, cwd=folder, env={"PYTHONPATH": pythonpath})


def start_seed_000_from_the_command_line():
    return InBackground(seed_000_from_the_command_line, "poptrain-cli-")


def test_run_trains_the_seed_000_config_from_the_command_line(request):
    work = started(request, start_seed_000_from_the_command_line)  # its process (its own Ray) started with the session
    done, tmp_path = work.result(), work.folder
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting" in done.stdout and "finished" in done.stdout
    assert (tmp_path / "mlflow.db").is_file()
    import torch

    alphas = [torch.load(tmp_path / "runs" / "prelu_separation" / "members" / m / "model.pt", weights_only=True)["activation.weight"] for m in ("m1", "m2")]
    assert float((alphas[0] - alphas[1]).abs().sum()) >= 2.0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run in client.search_runs([client.get_experiment_by_name("poptrain").experiment_id]):
        if run.data.tags.get("poptrain.role") == "member":
            losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
            assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20, "the task loss falls"
            if run.data.tags["poptrain.member"] == "m1":
                for term in ("here", "lib"):
                    assert len(client.get_metric_history(run.info.run_id, f"term/{term}")) == 300, f"the {term} term ran in m1's process"


def test_unknown_command_line_option_exits_2(tmp_path):
    done = poptrain("run", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_the_final_table_of_a_large_population_shows_its_best_and_worst_members_not_every_one(tmp_path):
    from poptrain.cli import SUMMARY_ROWS, _summary_table
    from poptrain.driver.population import RunResult

    metrics = {f"m{i:02d}": {"loss": float((i * 7) % 20)} for i in range(20)}  # m00's loss 0, m17's 19
    result = RunResult("run", {}, tmp_path, "sqlite://", metrics=metrics, seconds=1.0)  # no config.yaml there: ranked by loss
    table = _summary_table(result, metrics, ["loss"], best="m00")
    names = list(table.columns[0].cells)
    assert len(names) == SUMMARY_ROWS
    assert names[0] == "m00 (best)" and names[-1] == "m17", names
    assert names[SUMMARY_ROWS // 2] == f"… {20 - SUMMARY_ROWS + 1} more"


def test_the_final_table_of_a_large_population_ranks_by_the_runs_held_out_metric(tmp_path):
    """thousand.yaml ranks by held-out MSE: its table shows the best by eval/mse first (not by
    training loss, which the table fell back to while the ranking could not be read)."""
    from poptrain.cli import SUMMARY_ROWS, _summary_table
    from poptrain.config import dump_config, load_config
    from poptrain.driver.population import RunResult

    (tmp_path / "config.yaml").write_text(dump_config(load_config(REPO / "configs" / "thousand.yaml")))
    metrics = {f"m{i:03d}": {"loss": float(i), "eval/mse": float(1000 - i)} for i in range(1000)}  # lowest loss, highest MSE: m000
    result = RunResult("run", {}, tmp_path, "sqlite://", metrics=metrics, seconds=1.0)
    names = list(_summary_table(result, metrics, ["eval/mse", "loss"], best="m999").columns[0].cells)
    assert names[0] == "m999 (best)" and names[-1] == "m000", names
    assert len(names) == SUMMARY_ROWS
