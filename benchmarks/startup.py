"""Start-up: ``poptrain.run`` of 2 members, from the API call until the first step has completed,
against the stack's own floor (:func:`bare_child`: a bare Ray started the same way and two bare
actors that import torch and take one Adam step, in a fresh process too).

Measured in a fresh Python process (``python -m benchmarks.startup CONFIG OUT``) in which
nothing has started Ray yet, so the time includes what a user's first call pays: importing
poptrain's modules (torch, pydantic, ...), ``ray.init`` of a local Ray, checks, the placement
group, the coordinator and member actors, MLflow runs (written by the driver), and the first training step
with its exchanges. ``import ray`` is done before the clock starts, so that ``ray.init`` can be
wrapped to time it; that import is reported separately (``import_ray_s``).

The first step's completion time is the wall-clock timestamp that each member logs with its
step-0 ``loss`` metric (taken right after the step), read back from MLflow; the figure takes the
later of the two members. The sqlite MLflow store already exists (the parent creates it), as it
does for every run but a machine's very first. The child gets a Ray temp folder of its own
(``RAY_TMPDIR``) and no ``RAY_ADDRESS``, so it always starts a local Ray as on a fresh machine.

``--smoke`` starts no child (a fresh Ray and three more actor processes would double its time): it
reports the API call to first step of its first timed ``sync1`` run, with Ray already up.
"""

from __future__ import annotations

import time

_PROCESS_START = time.time()

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

LIMIT_S = 10.0  # --smoke (no fresh process, so no bare baseline either): the old absolute limit


def child(config_path: str, out_path: str) -> None:
    started_import = time.time()
    import ray

    import_ray_s = time.time() - started_import
    timing: dict[str, float] = {}
    original = ray.init

    def timed_init(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            timing["ray_init_start"] = start
            timing["ray_init_s"] = time.time() - start

    ray.init = timed_init
    config = json.loads(Path(config_path).read_text())

    api_call = time.time()
    import poptrain

    result = poptrain.run(config)
    returned = time.time()
    Path(out_path).write_text(
        json.dumps(
            {
                "process_start": _PROCESS_START,
                "import_ray_s": import_ray_s,
                "api_call": api_call,
                "returned": returned,
                "run_seconds": result.seconds,
                "tracking_uri": result.tracking_uri,
                "run_id": result.run_id,
                "member_run_ids": result.member_run_ids,
                **timing,
            }
        )
    )


def launch(ctx) -> dict[str, Any]:
    """Start the child process (returns at once); :func:`collect` waits for it and makes the row."""
    from mlflow.tracking import MlflowClient

    from benchmarks.common import REPO, population_config

    config = population_config("bench-startup", ctx.sizes, ctx.workdir, ctx.uri, coupled=True, steps=ctx.sizes.startup_steps)
    config_path = ctx.workdir / "startup-config.json"
    out_path = ctx.workdir / "startup-out.json"
    config_path.write_text(json.dumps(config))
    MlflowClient(tracking_uri=ctx.uri).search_experiments()  # creates the sqlite store (schema migrations) before the clock runs

    # A Ray temp root of its own: a bare ray.init() (what poptrain calls) would otherwise join a
    # cluster that `ray start` recorded in /tmp/ray/ray_current_cluster, e.g. another test's.
    ray_tmp = tempfile.mkdtemp(prefix="prb-", dir="/tmp" if os.path.isdir("/tmp") else None)
    # No GPU for the child (poptrain's own ray.init counts them): the figure is CPU start-up, as the others are CPU figures.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), RAY_TMPDIR=ray_tmp, CUDA_VISIBLE_DEVICES="")
    env.pop("RAY_ADDRESS", None)
    log = open(ctx.workdir / "startup-child.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.startup", str(config_path), str(out_path)], cwd=ctx.workdir, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return {"proc": proc, "log": log, "ray_tmp": ray_tmp, "out_path": out_path}


def collect(ctx, handle: dict[str, Any]) -> list[dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    from benchmarks.common import metric_times, row

    sizes = ctx.sizes
    proc, log = handle["proc"], handle["log"]
    try:
        returncode = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        returncode = proc.wait()
    finally:
        shutil.rmtree(handle["ray_tmp"], ignore_errors=True)
    log.seek(0)
    output = log.read()
    log.close()
    if returncode != 0:
        raise RuntimeError(f"start-up child failed ({returncode}): {output[-2000:]}")
    timing = json.loads(handle["out_path"].read_text())
    firsts = {}
    for name, run_id in timing["member_run_ids"].items():
        points = metric_times(timing["tracking_uri"], run_id)
        firsts[name] = next(t for s, t in points if s == 0)
    first_step = max(firsts.values())
    parent_created = MlflowClient(tracking_uri=ctx.uri).get_run(timing["run_id"]).info.start_time / 1000.0
    seconds = first_step - timing["api_call"]
    ray_up = timing["ray_init_start"] + timing["ray_init_s"] if "ray_init_s" in timing else None
    details = {
        "from_api_call_s": seconds,
        "api_call_to_ray_init_s": timing["ray_init_start"] - timing["api_call"] if ray_up else None,
        "ray_init_s": timing.get("ray_init_s"),
        "ray_init_share": timing["ray_init_s"] / seconds if ray_up else None,
        "ray_up_to_mlflow_parent_run_s": parent_created - ray_up if ray_up else None,
        "mlflow_parent_run_to_first_step_s": first_step - parent_created,
        "first_step_per_member_s": {n: t - timing["api_call"] for n, t in firsts.items()},
        "import_ray_s_not_counted": timing["import_ray_s"],
        "from_process_start_s": first_step - timing["process_start"],
        "whole_run_s": timing["returned"] - timing["api_call"],
        "steps": sizes.startup_steps,
    }
    note = None if ray_up else "ray.init was not called by the run (Ray already up?)"
    bare = bare_baseline(ctx)
    details["bare_stack"] = bare
    return [
        row(
            "startup",
            "poptrain.run of 2 members until the first step completes",
            value=seconds,
            unit="s",
            ratio=seconds / bare["seconds"],
            target=("<=", 1.25),
            baseline={"name": "a bare Ray and 2 bare actors importing torch, one Adam step", "value": bare["seconds"], "unit": "s"},
            sizes=sizes,
            details=details,
            note=note,
        )
    ]


def startup(ctx) -> list[dict[str, Any]]:
    if ctx.sizes.startup_child:
        return collect(ctx, launch(ctx))
    return reused(ctx)


def reused(ctx) -> list[dict[str, Any]]:
    """``--smoke``: no child process (it would cost a fresh Ray and four more actor processes); the
    API call to first step of the first timed ``sync1`` run, with this process's Ray already up."""
    from benchmarks.common import row
    from benchmarks.training import ensure_runs

    run = ensure_runs(ctx, ["memory"])["sync1"]["all"][0]
    seconds = run["first_step_s"]
    return [
        row(
            "startup",
            "poptrain.run of 2 members until the first step completes",
            value=seconds,
            unit="s",
            ratio=seconds / LIMIT_S,
            target=("<=", 1.0),
            baseline={"name": "the issue's limit", "value": LIMIT_S, "unit": "s"},
            sizes=ctx.sizes,
            details={"from_api_call_s": seconds, "ray_init_s": 0.0, "child_process": False},
            note=f"--{ctx.sizes.mode}: taken from a timed run with Ray already up, not from a fresh process",
        )
    ]


def bare_child(out_path: str, in_features: int, hidden: list[int], classes: int, batch: int) -> None:
    """The stack's own floor, in a fresh process: a local Ray started as poptrain starts it, and two
    bare actors (one CPU each) that import torch, build the benchmark's MLP and take one Adam
    step. Writes the seconds from ``ray.init`` to both steps done and each actor's RSS."""
    import ray

    started = time.time()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)

    @ray.remote(num_cpus=1)
    class Bare:
        def step(self) -> float:
            import psutil
            import torch

            from poptrain.builtins.models import MLP

            model = MLP(in_features=in_features, out_features=classes, hidden=hidden, activation="prelu")
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            loss = torch.nn.functional.cross_entropy(model(torch.randn(batch, in_features)), torch.randint(0, classes, (batch,)))
            loss.backward()
            optimizer.step()
            return psutil.Process().memory_info().rss / 2**20

    actors = [Bare.remote() for _ in range(2)]
    rss = ray.get([a.step.remote() for a in actors])
    seconds = time.time() - started
    ray.shutdown()
    Path(out_path).write_text(json.dumps({"seconds": seconds, "rss_mib": rss}))


def bare_baseline(ctx) -> dict[str, Any]:
    """:func:`bare_child`'s figures (run once per benchmark run, in a fresh process with a Ray temp
    folder of its own); cached in ``ctx.shared``."""
    from benchmarks.common import REPO

    if "bare" in ctx.shared:
        return ctx.shared["bare"]
    sizes = ctx.sizes
    out_path = ctx.workdir / "bare-out.json"
    ray_tmp = tempfile.mkdtemp(prefix="prb-", dir="/tmp" if os.path.isdir("/tmp") else None)
    # No GPU for the child (poptrain's own ray.init counts them): the figure is CPU start-up, as the others are CPU figures.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), RAY_TMPDIR=ray_tmp, CUDA_VISIBLE_DEVICES="")
    env.pop("RAY_ADDRESS", None)
    args = [str(out_path), str(sizes.in_features), json.dumps(list(sizes.hidden)), str(sizes.classes), str(sizes.batch)]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.startup", "--bare", *args], cwd=ctx.workdir, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"the bare-stack baseline failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    ctx.shared["bare"] = json.loads(out_path.read_text())
    return ctx.shared["bare"]


if __name__ == "__main__":
    if sys.argv[1] == "--bare":
        bare_child(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        child(sys.argv[1], sys.argv[2])
