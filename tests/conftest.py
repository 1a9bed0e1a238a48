"""Shared fixtures: one real local Ray per pytest run (2 CPUs, no GPU), a real MLflow store per test."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
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
    count is checked here. The coordinator's thread that records a round's metrics is left out:
    in a run it is in the coordinator's process, and here, in-process, it may overlap a step."""

    def start() -> list[str]:
        import threading

        import torch

        from poptrain.coordinator.coordinator import RECORDING_THREAD

        reads: list[str] = []
        for name in ("tolist", "item", "__bool__", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                if not threading.current_thread().name.startswith(RECORDING_THREAD):
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
def _empty_store(tmp_path_factory) -> Path:
    """An sqlite MLflow store with MLflow's tables and nothing in them, made once (its migrations cost a second or two)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def new_store(_empty_store, tmp_path):
    """Factory ``(name) -> sqlite URI``: a store of its own for a test that compares whole stores, a copy of an empty one."""
    import shutil

    def make(name: str) -> str:
        path = tmp_path / f"{name}.db"
        shutil.copyfile(_empty_store, path)
        return f"sqlite:///{path}"

    return make


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


@pytest.fixture
def in_process_host(base_config):
    """Factory ``(members, client=InProcessClient, **changes) -> (trainers, link)``: a
    :func:`make_config` config with these members (and ``changes``) as one host in this process
    (:func:`tests.in_process.one_host`; no Ray)."""
    from tests.in_process import InProcessClient, one_host

    return lambda members, client=InProcessClient, **changes: one_host(base_config(members=members, **changes), client)


# Seed 000's Module as the user wrote it (tests.reference.SeedModule), by import path: the network
# prelu_member builds with the built-in `mlp` (Linear 20 -> 40, PReLU, Linear 40 -> 1), its slopes
# named activation.weight as there.
SEED_MODULE = {"name": "tests.reference:SeedModule", "kwargs": {"in_features": 20, "out_features": 1}}


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


# Digits per image in each view of poptrain.builtins.data.digits ("rows" is a sequence: not for the MLP).
DIGIT_FEATURES = {"full": 64, "downsampled": 16, "crop": 36, "left": 32, "right": 32}


def digits_member(
    name: str,
    view: str = "full",
    *,
    model_kwargs: dict | None = None,
    data_kwargs: dict | None = None,
    batch_size: int = 32,
    shuffle: bool = True,
    lr: float = 0.01,
    **changes,
) -> dict:
    """A classifier of scikit-learn's bundled 8x8 digits (no download): the built-in
    ``encoder_classifier`` (16 nodes, 10 classes) on one ``view`` of the images, 32 a batch, Adam at
    ``lr`` on cross-entropy. ``model_kwargs`` and ``data_kwargs`` add to (or override) the model's
    and the dataset's kwargs (``split``, ``limit``, ``part``/``parts``); ``changes`` replace whole
    entries of the member (``init``, ``optimizer``, ``resources``, ...)."""
    member = {
        "name": name,
        "model": {"name": "encoder_classifier", "kwargs": {"in_features": DIGIT_FEATURES[view], "num_classes": 10, "num_nodes": 16, **(model_kwargs or {})}},
        "data": {"name": "digits", "kwargs": {"view": view, **(data_kwargs or {})}, "batch_size": batch_size, "shuffle": shuffle},
        "loss": "cross_entropy",
        "optimizer": {"name": "adam", "lr": lr},
    }
    member.update(copy.deepcopy(changes))
    return member


PBT_LR = {"optimizer.lr": {"factors": [0.5, 2.0]}}  # halve or double the learning rate


def pbt_population(steps: int, every: int, **changes) -> dict:
    """Settings (for :func:`make_config`) of four digits classifiers from lr 1e-4 to 3e-2, evaluated
    on held-out accuracy and exploited/explored (lr, weight decay) every ``every`` steps, no coupling."""
    members = [
        digits_member(
            f"m{i + 1}",
            model_kwargs={"depth": 1},
            data_kwargs={"split": "train", "limit": 256},
            optimizer={"name": "adam", "lr": lr, "kwargs": {"weight_decay": 0.0001}},
        )
        for i, lr in enumerate((0.0001, 0.003, 0.01, 0.03))
    ]
    settings = {
        "steps": steps,
        "members": members,
        "couplings": [],
        "evaluation": {"every": every, "metrics": ["accuracy"]},
        "pbt": {"every": every, "quantile": 0.25, "hyperparameters": {**PBT_LR, "optimizer.kwargs.weight_decay": {"values": [0.0, 0.001]}}},
    }
    settings.update(changes)
    return settings


# The LSTM encoder's parameters in poptrain.builtins' lstm_classifier (one layer): what a `share` of "lstm.*" shares.
LSTM_PARAMS = ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0"]


def save_init(model, path: Path) -> str:
    """``model``'s state_dict saved at ``path``, for a member's ``init``: that path, as a string."""
    import torch

    torch.save(model.state_dict(), path)
    return str(path)


def assert_weights_equal(result, name: str, reference_module, atol: float = 1e-5) -> None:
    """Member ``name``'s final weights in a run's output folder are within ``atol`` of a reference
    module's (``atol=0``: bitwise)."""
    import torch

    trained = weights(result.output_dir, name)
    for key, expected in reference_module.state_dict().items():
        torch.testing.assert_close(trained[key], expected, rtol=0, atol=atol, msg=f"{name}.{key}")


def members_on_thirds_of_the_digits(tmp_path: Path, seed: int, count: int = 3):
    """``count`` digits classifiers with different initial weights (seeded by ``seed``), each
    training on its own third of the first 256 digits in order. Returns (the initial modules, the
    members' configs, a function giving the members' batch streams as a reference reads them)."""
    import torch

    from poptrain.builtins.data import digits
    from poptrain.builtins.models import EncoderClassifier
    from tests.reference import sequential_batches

    torch.manual_seed(seed)
    models = [EncoderClassifier(64, 10, num_nodes=16) for _ in range(count)]
    inits = [save_init(m, tmp_path / f"m{i}.pt") for i, m in enumerate(models)]
    members = [digits_member(f"m{i + 1}", data_kwargs={"limit": 256, "part": i, "parts": 3}, shuffle=False, init=inits[i]) for i in range(count)]
    streams = lambda: zip(*(sequential_batches(digits(view="full", limit=256, part=i, parts=3), 32) for i in range(count)), strict=True)  # noqa: E731
    return models, members, streams


SEED000_LR, SEED000_BATCH = 0.01, 32  # seed 000's Adam learning rate and batch size


def seed000_initial_modules(folder: Path, alphas=(0.25, 0.25)):
    """Two seed-000 modules (fixed seed) whose PReLU slopes start at ``alphas`` (equal by default:
    the separation term is active every step), saved in ``folder``: (the modules, their paths)."""
    import torch

    from tests.reference import SeedModule

    torch.manual_seed(1234)
    modules = [SeedModule(20, 1), SeedModule(20, 1)]
    paths = []
    for index, (module, alpha) in enumerate(zip(modules, alphas, strict=True)):
        with torch.no_grad():
            module.activation.weight.fill_(alpha)
        paths.append(save_init(module, folder / f"init{index}.pt"))
    return modules, paths


def poptrain_command(*args, cwd, env=None, timeout=300):
    """``python -m poptrain ARGS`` as a user runs it in ``cwd`` (no MLFLOW_TRACKING_URI from this
    environment): the finished process, its output captured."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "poptrain", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


# -- runs with faults: a member or a driver killed mid-run (tests/test_failures.py and others) ----

# A run long enough that a member killed between steps 40 and STEPS - 100 is killed mid-run, and
# the uninterrupted twin its result is compared with.
KILLED_STEPS, KILLED_CHECKPOINT_EVERY = 300, 20


def logged_steps(tracking_uri: str, run_id: str, key: str = "loss") -> list[int]:
    """The steps at which an MLflow run logged ``key``, sorted (repeats kept: a step logged twice shows twice)."""
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key))


def run_killing_m2_once(config, steps, restarted=("m2",), from_step=40, until_step=None):
    """Run ``config``, SIGKILLing m2's process once between step ``from_step`` and ``until_step``
    (``steps - 100`` unless given). Returns (result, {pid, step, time} of the kill).
    ``restarted``: the members that process carries."""
    import signal
    import time

    import poptrain

    killed = {}
    until_step = steps - 100 if until_step is None else until_step

    def kill_m2_once(snapshot):
        step = snapshot["members"].get("m2", {}).get("step", 0)
        if not killed and from_step <= step < until_step:
            killed["pid"], killed["step"], killed["time_ms"] = snapshot["placement"]["m2"]["pid"], step, time.time() * 1000
            os.kill(killed["pid"], signal.SIGKILL)

    result = poptrain.run(config, progress=kill_m2_once, poll_s=0.1)
    assert killed, "the member was killed mid-run"
    assert result.restarts == dict.fromkeys(restarted, 1)
    assert result.placement["m2"]["pid"] != killed["pid"], "a new process took over"
    return result, killed


def driver_env() -> dict:
    """This environment for a `poptrain` process of its own: the repository importable, no Ray to join."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return env


def run_killing_the_driver(config, folder, after_step):
    """Start ``config`` (a dict) as a real ``poptrain run`` process in ``folder`` and SIGKILL it with
    the Ray it started once the latest complete checkpoint is at ``after_step`` or later. Returns
    (its run folder, that checkpoint's step, from which it resumes)."""
    import signal
    import time

    import psutil
    import yaml

    import poptrain
    from poptrain.storage.checkpoint import latest_complete_step

    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # as written: the order of pbt.hyperparameters is the order explore draws in
    run_dir = Path(config["output_dir"]) / config["name"]
    members = poptrain.load_config(config).member_names  # entries with `copies` make several
    # Its own session and process group: the driver and the Ray it started, which the kill takes at
    # once, like losing the machine.
    driver = subprocess.Popen(
        [sys.executable, "-m", "poptrain", "run", str(path)],
        cwd=folder,
        env=driver_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes = []
    try:
        deadline = time.monotonic() + 240
        while (latest_complete_step(run_dir, members) or 0) < after_step:
            assert driver.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
    finally:
        # Ray's workers (the members, the coordinator) have process groups of their own: killed by
        # the group alone, they would train on, and write checkpoints, for seconds after the driver.
        processes = psutil.Process(driver.pid).children(recursive=True)
        os.killpg(driver.pid, signal.SIGKILL)
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        driver.wait()
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"processes of the killed run still alive: {alive}"
    step = latest_complete_step(run_dir, members)
    assert step < config["steps"], "the driver was killed mid-run"
    return run_dir, step


def resume_in_a_process(run_dir, folder):
    """``poptrain resume run_dir`` as a real process in ``folder``; it must succeed."""
    resumed = subprocess.run(
        [sys.executable, "-m", "poptrain", "resume", str(run_dir)], cwd=folder, env=driver_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch):
    """Run in an empty working directory (to see what a command leaves behind)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
