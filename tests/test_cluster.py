"""Clusters (issue 6): the definitions in cluster/ are well-formed and pinned to this project's Ray,
and a population submitted with `ray job submit` to a real two-node Ray cluster with token
authentication runs across both nodes.

The integration tests check one work started in the background as the session starts
(:func:`cluster_work`, tests/conftest.py EARLY): their own cluster started with
cluster/local_cluster.sh (free ports, a state folder of their own, token auth on), separate from
the in-process Ray of tests/conftest.py, the jobs submitted to it, and the cluster stopped (its
processes only, never `ray stop --force`) whatever happened.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

CLUSTER = REPO / "cluster"
SCRIPT = CLUSTER / "local_cluster.sh"
RAY_VERSION = importlib.metadata.version("ray")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>\d)(?P<minor>\d+)(?:-(?P<variant>cpu|gpu|cu\d+))?$")
SHIPPED_CONFIG = "configs/prelu_separation.yaml"
# The headline command of the documentation's Clusters page and of cluster/README.md, run as written.
README_COMMAND = f"ray job submit --working-dir . -- poptrain run {SHIPPED_CONFIG}"


# --------------------------------------------------------------------------------------------
# The cluster definitions


def load_docs(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc]


def images_in(node) -> list[str]:
    """Every ``image:`` value anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [i for v in node.values() for i in images_in(v)]
    if isinstance(node, list):
        return [i for v in node for i in images_in(v)]
    return []


def requirement_set(specs) -> set[tuple[str, str]]:
    out = set()
    for spec in specs:
        req = Requirement(spec)
        out.add((canonicalize_name(req.name), str(req.specifier)))
    return out


def poptrain_dependencies_without_ray() -> set[tuple[str, str]]:
    """pyproject's dependencies, less ray (the Ray images bring it, pinned)."""
    return {r for r in requirement_set(PYPROJECT["project"]["dependencies"]) if r[0] != "ray"}


def pip_install_args(command: str) -> list[str]:
    """The requirement arguments of the first ``pip install`` in a shell command line."""
    words = shlex.split(command)
    start = next(i for i in range(len(words) - 1) if words[i] == "pip" and words[i + 1] == "install") + 2
    out = []
    for word in words[start:]:
        if word in ("&&", ";", "||") or word.endswith(";"):
            break
        if not word.startswith("-"):
            out.append(word)
    return out


def check_image(image: str) -> None:
    match = IMAGE.match(image)
    assert match, f"{image!r} is not an official rayproject/ray:<version>-py<XY>[-gpu] image"
    assert match["ray"] == RAY_VERSION, f"{image} runs Ray {match['ray']}, but this project is tested with Ray {RAY_VERSION}"
    python = f"{match['major']}.{match['minor']}"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python), f"{image}: Python {python} is outside requires-python"


def test_installed_ray_satisfies_pyproject():
    ray_req = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if canonicalize_name(Requirement(d).name) == "ray")
    assert "default" in ray_req.extras, "job submission and the dashboard need ray[default]"
    assert ray_req.specifier.contains(RAY_VERSION), f"installed ray {RAY_VERSION} does not satisfy pyproject's {ray_req}"


def test_every_cluster_definition_uses_one_ray_image_matching_the_installed_ray():
    images = set()
    for name in ("cluster-launcher.yaml", "kuberay-rayjob.yaml", "kuberay-raycluster.yaml"):
        found = [i for doc in load_docs(name) for i in images_in(doc)]
        assert found, f"{name} names no image"
        for image in found:
            check_image(image)
        images.update(found)
    assert len(images) == 1, f"the cluster definitions disagree on the image: {sorted(images)}"
    assert images.pop() in (CLUSTER / "README.md").read_text(), "cluster/README.md names the image the definitions use"


def test_cluster_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_docs("cluster-launcher.yaml")
    assert len(raw) == 1
    config = prepare_config(raw[0])  # what `ray up` does: merge the provider's defaults...
    validate_config(config)  # ...and check against ray/autoscaler/ray-schema.json
    assert config["provider"]["type"] in ("aws", "gcp", "azure")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [
        name
        for name, t in types.items()
        if name != config["head_node_type"]
        and (t.get("resources", {}).get("GPU", 0) >= 1 or re.match(r"^(g|p)\d", str(t["node_config"].get("InstanceType", ""))))
    ]
    assert gpu_types, "a GPU worker node type"
    members = len(yaml.safe_load((REPO / SHIPPED_CONFIG).read_text())["members"])
    assert sum(types[t]["min_workers"] for t in gpu_types) >= members, "enough GPU workers up for a shipped config (one GPU per member)"
    # poptrain on every node, from the repository synced to it
    assert config["file_mounts"].get("~/poptrain") == "."
    assert any(re.search(r"pip install .*(-e )?~/poptrain", c) for c in config["setup_commands"])
    # token authentication on every node, with the submitting client's token
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key


def kuberay_cluster_checks(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == RAY_VERSION, f"{where}: rayVersion {spec['rayVersion']} != installed ray {RAY_VERSION}"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token authentication on"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    check_image(head["image"])
    assert {p["containerPort"] for p in head.get("ports", [])} >= {6379, 8265}
    gpu_groups = [g for g in spec["workerGroupSpecs"] if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, f"{where}: a GPU worker group"
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group), group.get("groupName")
        check_image(group["template"]["spec"]["containers"][0]["image"])


def test_kuberay_raycluster_manifest():
    docs = load_docs("kuberay-raycluster.yaml")
    (cluster,) = [d for d in docs if d.get("kind") == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    kuberay_cluster_checks(cluster["spec"], "RayCluster")
    # The containers install poptrain's dependencies (pyproject's, ray aside) before KubeRay's ray start.
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = cluster["spec"]
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for container in containers:
        command = " ".join(container["args"])
        assert "$KUBERAY_GEN_RAY_START_CMD" in command
        assert requirement_set(pip_install_args(command)) == poptrain_dependencies_without_ray(), container["name"]


def test_kuberay_rayjob_manifest_runs_a_shipped_config():
    from poptrain.config import load_config
    from poptrain.driver.checks import inspect_population

    docs = load_docs("kuberay-rayjob.yaml")
    (job,) = [d for d in docs if d.get("kind") == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    kuberay_cluster_checks(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
    assert spec["shutdownAfterJobFinishes"] is True

    words = shlex.split(spec["entrypoint"])
    assert words[:4] == ["python", "-m", "poptrain", "run"] or words[:2] == ["poptrain", "run"], spec["entrypoint"]
    config, overrides = (words[4], words[5:]) if words[0] == "python" else (words[2], words[3:])
    assert (REPO / config).is_file() and config.startswith("configs/"), f"{config} is a shipped config"
    cfg = load_config(REPO / config, overrides)  # the entrypoint's config and overrides are valid
    inspect_population(cfg)

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert re.match(r"^(s3|gs|https?)://.+\.zip$", runtime_env["working_dir"]), "the code comes as a zip Ray downloads"
    assert requirement_set(runtime_env["pip"]) == poptrain_dependencies_without_ray()
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http"), "an MLflow server, not a pod-local sqlite file"

    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert gpus >= len(cfg.members), f"{gpus} GPUs for {len(cfg.members)} members (`num_gpus: auto` gives each one GPU)"


def test_local_cluster_script_is_valid_bash():
    assert os.access(SCRIPT, os.X_OK), "cluster/local_cluster.sh is executable"
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], check=True)
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert usage.returncode == 2 and "start|stop" in usage.stderr


def test_cluster_readme_gives_the_whole_recipe():
    text = (CLUSTER / "README.md").read_text()
    for needed in (
        "RAY_AUTH_MODE=token",
        "RAY_AUTH_TOKEN",
        "ray get-auth-token --generate",
        "cluster/local_cluster.sh start",
        "cluster/local_cluster.sh stop",
        "ray job submit",
        "--working-dir .",
        "--runtime-env-json",
        "poptrain run configs/",
        "placement.strategy=SPREAD",
        "resources.num_gpus",
        "CUDA_VISIBLE_DEVICES",
        "MLFLOW_TRACKING_URI",
        "mlflow server",
        "kuberay-rayjob.yaml",
        "kuberay-raycluster.yaml",
        "cluster-launcher.yaml",
    ):
        assert needed in text, f"cluster/README.md mentions {needed!r}"


# --------------------------------------------------------------------------------------------
# A real two-node cluster on loopback


MARKER = "POPTRAIN_LOCAL_CLUSTER"


@dataclass
class LocalCluster:
    state: Path
    env: dict[str, str]  # a submitting client's environment: addresses and token
    token: str
    start_s: float
    home: Path  # $POPTRAIN_HOME of the cluster's processes: where a job's relative outputs go


def base_env() -> dict[str, str]:
    """This interpreter's environment, without anything that would point Ray or MLflow elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `poptrain`, `ray`
    env["PYTHON"] = sys.executable
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ray_cli(*args: str, env: dict, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def processes_of(state: Path) -> list[str]:
    """Processes still carrying the cluster's marker, or naming its folder on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{MARKER}={state}".encode() in environ or str(state) in cmdline:
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


@dataclass
class Job:
    done: subprocess.CompletedProcess
    seconds: float
    folder: Path
    tracking_uri: str


@dataclass
class ClusterWork:
    """What the cluster's integration work saw (:func:`cluster_work`): the tests check it."""

    skipped: str | None = None  # why the work could not run here
    cluster: LocalCluster | None = None
    spread_job: Job | None = None
    nodes: dict | None = None  # node id -> total resources while the jobs ran (Ray's state API)
    readme_job: subprocess.CompletedProcess | None = None
    failing: tuple | None = None  # (submission id, its `ray job submit`, the API's status code and answer about it)
    token_checks: dict[str, int] | None = None  # HTTP status of /api/jobs/ with the token, a wrong one, none
    stopped: tuple | None = None  # (the stop, processes left after it, a second stop)


def cluster_work(folder: Path, uri: str) -> ClusterWork:
    """A head and a worker raylet on 127.0.0.1 (1 CPU, node_a / node_b each), token auth on, started
    by cluster/local_cluster.sh; the jobs the tests check submitted to it one after another; then
    the cluster stopped, its processes only, whatever happened. Run beside the suite from its
    start (tests/conftest.py EARLY): it mostly waits for its own processes."""
    if not sys.platform.startswith("linux") or not shutil.which("setsid"):
        return ClusterWork(skipped="the local cluster script needs Linux (setsid, /proc)")
    # Short: Ray puts Unix sockets under it (107-byte path limit).
    state = Path(tempfile.mkdtemp(prefix="ptc-", dir="/tmp"))
    token = secrets.token_hex(32)
    home = folder / "home"  # not the default ~/poptrain-jobs: the tests keep to their own folders
    env = {**base_env(), "POPTRAIN_CLUSTER_DIR": str(state), "RAY_AUTH_TOKEN": token, "WORKERS": "1", "CPUS_PER_NODE": "1", "POPTRAIN_HOME": str(home)}
    work = ClusterWork()
    started = time.monotonic()
    try:
        done = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"local_cluster.sh start failed:\n{done.stdout}\n{done.stderr}"
        client = base_env()
        for line in (state / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            client[key] = value
        assert client["RAY_AUTH_MODE"] == "token" and client["RAY_AUTH_TOKEN"] == token
        assert client["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
        assert client["RAY_API_SERVER_ADDRESS"] in done.stdout, "start prints the address for `ray job submit`"
        work.cluster = cluster = LocalCluster(state, client, token, time.monotonic() - started, home)
        work.spread_job = submit_spread_job(cluster, folder / "spread_job")
        work.nodes = cluster_nodes(cluster)
        work.readme_job = submit_readme_job(cluster)
        work.failing = submit_failing_job(cluster)
        work.token_checks = {
            "token": api(cluster, "/api/jobs/")[0],
            "wrong token": api(cluster, "/api/jobs/", token=secrets.token_hex(32))[0],
            "no token": unauthenticated_status(cluster),
        }
        return work
    finally:
        stop = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=60)
        left = processes_of(state)
        again = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)
        work.stopped = (stop, left, again)


CLUSTER_WORK: list = []  # the one background work every integration test of the cluster checks


def start_cluster_work():
    from tests.conftest import InBackground

    if not CLUSTER_WORK:
        CLUSTER_WORK.append(InBackground(cluster_work, "poptrain-cluster-"))
    return CLUSTER_WORK[0]


@pytest.fixture
def cluster_run(request) -> ClusterWork:
    """The cluster's work, started with the session (or now), once it has ended: skipped where it cannot run."""
    from tests.conftest import started

    work = started(request, start_cluster_work).result()
    if work.skipped:
        pytest.skip(work.skipped)
    return work


def api(cluster: LocalCluster, path: str, token: str | None = None) -> tuple[int, dict]:
    """GET on the cluster's dashboard HTTP API with a bearer token (the cluster's, by default)."""
    request = urllib.request.Request(cluster.env["RAY_API_SERVER_ADDRESS"] + path)
    request.add_header("Authorization", f"Bearer {cluster.token if token is None else token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def unauthenticated_status(cluster: LocalCluster) -> int:
    """The HTTP status of /api/jobs/ asked without any token."""
    try:
        with urllib.request.urlopen(urllib.request.Request(cluster.env["RAY_API_SERVER_ADDRESS"] + "/api/jobs/"), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def cluster_nodes(cluster: LocalCluster) -> dict[str, dict[str, float]]:
    """node id -> total resources, of the cluster's alive nodes (Ray's state API)."""
    code, body = api(cluster, "/api/v0/nodes")
    assert code == 200, code
    return {n["node_id"]: n["resources_total"] for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"}


def submit_spread_job(cluster: LocalCluster, folder: Path) -> Job:
    """A shipped config submitted the README's way: 2 members, a few steps, SPREAD, MLflow in an
    sqlite file given by absolute path, outputs in a temporary folder. Both members read their
    data through an import path of the uploaded working dir (tests.helpers), so it must reach
    both nodes."""
    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"  # four slashes: an absolute path
    started = time.monotonic()
    done = ray_cli(
        "job",
        "submit",
        "--submission-id",
        f"poptrain-spread-{secrets.token_hex(4)}",
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps({"excludes": ["runs/", "mlruns/", "*.db", ".benchmarks/"]}),
        "--",
        "poptrain",
        "run",
        SHIPPED_CONFIG,
        "steps=8",
        "placement.strategy=SPREAD",
        f"tracking.uri={uri}",
        f"output_dir={folder / 'runs'}",
        "members.m1.data.name=tests.helpers:tiny_data",
        "members.m2.data.name=tests.helpers:tiny_data",
        env=cluster.env,
        timeout=300,
    )
    return Job(done, time.monotonic() - started, folder, uri)


def submit_readme_job(cluster: LocalCluster) -> subprocess.CompletedProcess:
    """The READMEs' headline command exactly as written: the shipped config, its default relative
    `output_dir` and the default MLflow store (issue 14: a second node unpacking the job's working
    dir again deleted the driver's outputs there, and the finished run failed with a traceback)."""
    words = shlex.split(README_COMMAND)
    assert words[:2] == ["ray", "job"]
    return ray_cli(*words[1:], env=cluster.env, timeout=400)


def submit_failing_job(cluster: LocalCluster) -> tuple:
    """The shipped config with a key that does not exist, which poptrain refuses (exit code 2):
    (submission id, its `ray job submit`, the API's status code and answer about the job)."""
    submission = f"poptrain-invalid-{secrets.token_hex(4)}"
    done = ray_cli(
        "job",
        "submit",
        "--submission-id",
        submission,
        "--working-dir",
        ".",
        "--",
        "poptrain",
        "run",
        SHIPPED_CONFIG,
        "no_such_key=1",
        env=cluster.env,
        timeout=180,
    )
    return (submission, done, *api(cluster, f"/api/jobs/{submission}"))


@pytest.mark.slow
def test_population_submitted_with_ray_job_submit_runs_on_both_nodes(cluster_run):
    from mlflow.tracking import MlflowClient

    spread_job = cluster_run.spread_job
    done = spread_job.done
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"ray job submit exited {done.returncode}:\n{log[-6000:]}"
    assert re.search(r"Job '[^']+' succeeded", log)
    # poptrain's plain output in the job log: the start, progress lines (at least the first one;
    # the next come every 5 s), the summary
    assert "poptrain: run 'prelu_separation' starting" in log
    assert re.search(r"(?m)^\[\s*\d+\.\d+s\] \S", log), log[-3000:]
    assert "finished in" in log, log[-3000:]
    summary = log[log.rindex("finished in") :]
    assert re.search(r"\bm1\b", summary) and re.search(r"\bm2\b", summary), log[-3000:]

    client = MlflowClient(spread_job.tracking_uri)
    experiment = client.get_experiment_by_name("poptrain")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("poptrain.role") == "population"]
    members = {r.data.tags["poptrain.member"]: r for r in runs if r.data.tags.get("poptrain.role") == "member"}
    assert len(parents) == 1 and sorted(members) == ["m1", "m2"]
    for run in [*parents, *members.values()]:
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
    for name, run in members.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["poptrain.placement.device"] == "cpu"
        assert run.data.tags["poptrain.placement.hostname"]
        assert run.data.params["data.name"] == "tests.helpers:tiny_data"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        assert steps == list(range(8)), f"{name}: every step's loss logged once"
        assert "objective" in run.data.metrics
    assert "coupling/separation" in parents[0].data.metrics
    assert parents[0].data.params["placement.strategy"] == "SPREAD"

    # One member per node: each on one of the cluster's two nodes, node_a's and node_b's.
    nodes = cluster_run.nodes
    assert len(nodes) == 2
    placed = {name: run.data.tags["poptrain.placement.node_id"] for name, run in members.items()}
    assert len(set(placed.values())) == 2, f"both members on one node: {placed}"
    assert set(placed.values()) == set(nodes), f"members on {placed}, cluster nodes {sorted(nodes)}"
    custom = sorted(k for node in placed.values() for k in nodes[node] if re.fullmatch(r"node_[a-z]", k))
    assert custom == ["node_a", "node_b"], custom

    # The driver wrote the outputs where the config said.
    for name in ("m1", "m2"):
        assert (spread_job.folder / "runs" / "prelu_separation" / "members" / name / "model.pt").is_file()


@pytest.mark.slow
def test_the_readme_command_keeps_its_outputs_where_the_log_says(cluster_run):
    import torch
    from mlflow.tracking import MlflowClient

    for doc in (REPO / "README.md", REPO / "docs" / "clusters.md", CLUSTER / "README.md"):
        assert README_COMMAND in doc.read_text(), f"{doc.name} gives the command this test ran"
    readme_job = cluster_run.readme_job
    log = readme_job.stdout + readme_job.stderr
    assert readme_job.returncode == 0, f"ray job submit exited {readme_job.returncode}:\n{log[-6000:]}"
    assert re.search(r"Job '[^']+' succeeded", log)
    assert "Traceback" not in log and "could not log" not in log, log[-6000:]
    said = re.search(r"poptrain: inside Ray job \S+: outputs go to (\S+), MLflow tracking to (\S+) \(", log)
    assert said, log[-6000:]
    run_dir, uri = Path(said[1]), said[2]
    home = cluster_run.cluster.home.resolve()
    assert run_dir == home / "runs" / "prelu_separation", "a relative output_dir resolves against $POPTRAIN_HOME"
    assert uri == f"sqlite:///{home / 'mlflow.db'}", "so does the default MLflow store"
    assert f"outputs in {run_dir}" in log

    assert (run_dir / "config.yaml").is_file()
    for name in ("m1", "m2"):
        state = torch.load(run_dir / "members" / name / "model.pt", weights_only=True)
        assert state["activation.weight"].numel() == 1
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("poptrain").experiment_id], "tags.`poptrain.role` = 'population'")
    (parent,) = [r for r in runs if r.data.params.get("output_dir") == str(run_dir.parent)]
    assert parent.info.status == "FINISHED"
    assert "config.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    artifacts = Path(parent.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(home / "mlruns"), f"artifacts at {artifacts}, outside the job's working dir"
    assert (artifacts / "config.yaml").is_file()


@pytest.mark.slow
def test_a_multi_node_run_with_a_local_sqlite_store_warns(cluster_run):
    """The embedded sqlite store only makes sense on one machine: a run on a multi-node cluster
    with a local sqlite URI must say so in its log (and still run)."""
    done = cluster_run.spread_job.done
    log = done.stdout + done.stderr
    assert done.returncode == 0
    assert re.search(r"(?i)warn.*sqlite", log), "no warning about a local sqlite tracking store on a multi-node cluster"


@pytest.mark.slow
def test_a_failing_job_has_a_failed_status(cluster_run):
    submission, done, code, job = cluster_run.failing
    log = done.stdout + done.stderr
    assert done.returncode == 1, f"ray job submit exited {done.returncode}:\n{log[-4000:]}"
    assert "no_such_key: unknown key" in log, "poptrain's own message is in the job log"
    assert re.search(rf"Job '{submission}' failed", log)
    assert code == 200, code
    assert job["status"] == "FAILED"
    assert "exit code 2" in job["message"], "the job's status carries poptrain's exit code (2: invalid input)"


@pytest.mark.slow
def test_the_cluster_refuses_a_client_without_its_token(cluster_run):
    checks = cluster_run.token_checks
    assert checks["token"] == 200
    assert checks["wrong token"] in (401, 403) and checks["no token"] in (401, 403), checks


@pytest.mark.slow
def test_the_cluster_script_stops_its_own_processes_and_a_second_stop_finds_none(cluster_run):
    stop, left, again = cluster_run.stopped
    assert stop.returncode == 0, f"local_cluster.sh stop failed:\n{stop.stdout}\n{stop.stderr}"
    assert not left, f"processes left after stop: {left}"
    assert again.returncode == 0 and "no process" in again.stdout, "a second stop finds nothing to stop"
