"""Shared fixtures: one real local Ray per pytest run (2 CPUs, no GPU), a real MLflow store per test."""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The suite's end-to-end tests check what holds on the CPU: device `cpu`, mapped memory (CPU only),
# bitwise and 1e-6 agreement with CPU references. On a GPU machine `num_gpus: auto` would put
# every member on CUDA and those checks would fail for the wrong reason, so everything the suite
# starts sees no GPU: the session Ray is started with `num_gpus=0`, and drivers and `ray start`
# nodes started in subprocesses inherit an empty CUDA_VISIBLE_DEVICES (set in pytest_configure).
# Only the `gpu`-marked tests (tests/test_gpu.py) use the GPU, in subprocesses given GPU_ENV.
GPU_ENV: dict[str, str] = {}  # the environment as it was, GPUs visible (filled in pytest_configure)
CUDA = False  # whether torch saw a CUDA device before the suite hid them


def pytest_configure(config):
    global CUDA
    import torch

    GPU_ENV.update(os.environ)
    CUDA = torch.cuda.is_available()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


# Tests whose work is a process of its own that mostly waits (its own Ray, fresh processes): started
# as the session starts when selected, run beside the rest of the suite, and checked by the test
# (nodeid -> "module:function" returning the handle the test takes from STARTED). Node ids are kept
# whole, one line each, to be found by grep: E501 is waived on them.
EARLY = {
    "tests/test_benchmarks_smoke.py::test_smoke_pass_writes_every_figure_with_a_numeric_ratio": "tests.test_benchmarks_smoke:start_smoke_pass",
    "tests/test_variation.py::test_a_thousand_members_resume_after_their_driver_is_killed_with_every_history_whole": "tests.test_variation:start_killed_and_resumed",  # noqa: E501
    "tests/test_failures.py::test_a_killed_driver_resumes_into_the_same_runs_bitwise_equal_to_an_uninterrupted_run": "tests.test_failures:start_killed_driver",
    "tests/test_pbt.py::test_perturbed_hyperparameters_and_the_lineage_survive_a_driver_resume_bitwise": "tests.test_pbt:start_killed_driver",
    "tests/test_cli.py::test_run_trains_the_seed_000_config_from_the_command_line": "tests.test_cli:start_seed_000_from_the_command_line",
    "tests/test_code_quality.py::test_mypy_finds_nothing_in_the_package": "tests.test_code_quality:start_mypy",
    # A two-node cluster of its own and the jobs submitted to it, once for all these tests (tests.test_cluster:cluster_work).
    **{
        f"tests/test_cluster.py::{test}": "tests.test_cluster:start_cluster_work"
        for test in (
            "test_population_submitted_with_ray_job_submit_runs_on_both_nodes",
            "test_the_readme_command_keeps_its_outputs_where_the_log_says",
            "test_a_multi_node_run_with_a_local_sqlite_store_warns",
            "test_a_failing_job_has_a_failed_status",
            "test_the_cluster_refuses_a_client_without_its_token",
            "test_the_cluster_script_stops_its_own_processes_and_a_second_stop_finds_none",
        )
    },
}
STARTED: dict[str, object] = {}


class InBackground(threading.Thread):
    """``work(folder, uri)`` on a thread of its own, with a new folder and an sqlite store of its
    own in it (never the session's: no contention for its file): for work made of processes of
    their own (a driver killed, then resumed) that an EARLY test checks. One at a time, in the
    order started: each such work starts its own Ray, and several at once beside the suite starved
    the cluster tests' `ray start` on 2 cores. :meth:`result` waits for it and returns what it
    returned, or raises what it raised."""

    last: InBackground | None = None  # the work started before this one, which runs first

    def __init__(self, work, prefix: str):
        super().__init__(daemon=True)
        import tempfile

        self.work, self.after = work, InBackground.last
        InBackground.last = self
        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.uri = f"sqlite:///{self.folder / 'mlflow.db'}"
        self.value, self.error = None, None
        self.start()

    def run(self) -> None:
        if self.after is not None:
            self.after.join()
        try:
            self.value = self.work(self.folder, self.uri)
        except BaseException as exc:  # raised by result()
            self.error = exc

    def result(self, timeout_s: float = 1800):
        self.join(timeout_s)
        assert not self.is_alive(), f"the work started in the background did not end within {timeout_s:g} s"
        if self.error is not None:
            raise self.error
        return self.value


def started(request, start):
    """What ``start()`` started for this test as the session started (EARLY), or starts now."""
    return STARTED.pop(request.node.nodeid, None) or start()


def pytest_collection_finish(session):
    import importlib

    for item in session.items:
        if item.nodeid in EARLY and not session.config.option.collectonly:
            module, function = EARLY[item.nodeid].split(":")
            # Work started for a test that never runs (-x, an interrupt) ends on its own, its processes with it.
            STARTED[item.nodeid] = getattr(importlib.import_module(module), function)()


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid in EARLY)  # last: their work runs meanwhile (stable: the rest keep their order)
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is false on this machine")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip)


def weights(result_dir, member):
    """A member's final state_dict, as a run saved it in its output folder."""
    import torch

    return torch.load(result_dir / "members" / member / "model.pt", weights_only=True)


def assert_bitwise_equal(dir_a, dir_b, members=("m1", "m2")):
    """Every member's final weights in two runs' output folders are bitwise equal."""
    import torch

    for member in members:
        a, b = weights(dir_a, member), weights(dir_b, member)
        for key in a:
            assert torch.equal(a[key], b[key]), (
                f"{member}.{key} differs between {dir_a} and {dir_b} (max |a - b| {(a[key].double() - b[key].double()).abs().max():.3g})"
            )


@pytest.fixture
def device_reads(monkeypatch):
    """Counts the reads of tensor values into Python (``tolist``, ``item``, ``bool``, ``float``,
    ``int``), which on a GPU each wait for all the work queued there: call it to start counting;
    it returns the list each read's name goes into. The same code runs on the CPU, so the
    count is checked here."""

    def start() -> list[str]:
        import torch

        reads: list[str] = []
        for name in ("tolist", "item", "__bool__", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                reads.append(_name)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        return reads

    return start


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once for the whole run and sized like CI's machine: 2 CPUs and
    no GPU on any machine (see GPU_ENV above)."""
    import os

    import ray

    if not ray.is_initialized():
        # Actors import tests.helpers: a local Ray's processes inherit this environment. Not a job
        # runtime_env, which would leave the workers Ray starts ahead of time unused, as poptrain's
        # own ensure_ray explains.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One real sqlite MLflow store for the session (creating one costs seconds); tests keep apart
    by experiment (see ``experiment``)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (its own sqlite store and artifact folder); its URL."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pbt_yaml_run(ray_session, tmp_path_factory, tracking_uri):
    """configs/pbt.yaml as shipped (its eight members made by `vary`), run once for the session with
    :data:`PBT_YAML_OVERRIDES`: 12 steps, evaluated and ranked every 4, so exploits happen. Its
    RunResult serves every test that needs this run (tests/test_configs.py: every shipped config
    runs; tests/test_variation.py: it ends as the written-out file)."""
    import poptrain

    out = tmp_path_factory.mktemp("pbt_yaml")
    overrides = [*PBT_YAML_OVERRIDES, f"tracking.uri={tracking_uri}", "tracking.experiment=pbt-yaml", f"output_dir={out}"]
    return poptrain.run(REPO / "configs" / "pbt.yaml", overrides)


# Shortened so that exploits happen within the run; plots and logged models off (they cost seconds a run).
PBT_YAML_OVERRIDES = ["steps=12", "evaluation.every=4", "pbt.every=4", "tracking.plots=false", "tracking.log_models=false"]


@pytest.fixture
def experiment(request) -> str:
    """An MLflow experiment of this test's own."""
    return request.node.name[:200]


def make_config(output_dir: Path, tracking_uri: str, experiment: str, **changes) -> dict:
    """A small valid config (a dict): seed 000's two members kept apart by a separation coupling."""
    cfg = {
        "name": "pop",
        "seed": 0,
        "steps": 10,
        "output_dir": str(output_dir),
        # Plots and logged models cost seconds per run; tests/test_observability.py covers them.
        "tracking": {"uri": tracking_uri, "experiment": experiment, "plots": False, "log_models": False},
        "members": [prelu_member("m1"), prelu_member("m2")],
        "couplings": [{"type": "separation", "param": "activation.weight", "margin": 2.0}],
    }
    cfg.update(copy.deepcopy(changes))
    return cfg


@pytest.fixture
def base_config(tmp_path: Path, tracking_uri: str, experiment: str):
    """Factory of :func:`make_config` configs writing into this test's temporary folder."""
    return lambda **changes: make_config(tmp_path / "runs", tracking_uri, experiment, **changes)


def prelu_member(name: str, **changes) -> dict:
    """Seed 000's member: Linear(20, 40) -> PReLU -> Linear(40, 1) on a synthetic regression."""
    member = {
        "name": name,
        "model": {"name": "mlp", "kwargs": {"in_features": 20, "out_features": 1, "hidden": 40, "activation": "prelu"}},
        "data": {"name": "synthetic_regression", "kwargs": {"n": 256, "in_features": 20}, "batch_size": 32},
        "loss": "mse",
        "optimizer": {"name": "adam", "lr": 0.01},
    }
    member.update(copy.deepcopy(changes))
    return member


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch):
    """Run in an empty working directory (to see what a command leaves behind)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
