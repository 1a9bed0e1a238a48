"""Shared pieces of the benchmarks: sizes, result rows, Ray, poptrain configs, rates from MLflow, memory."""

from __future__ import annotations

import copy
import datetime
import itertools
import os
import platform
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Sizes:
    """Everything a benchmark's size depends on; ``--smoke``, default and ``--full`` differ only here."""

    mode: str
    # The training population (coupling overhead, vs single process, memory): an MLP per member.
    in_features: int = 512
    hidden: tuple[int, ...] = (1024, 512)
    classes: int = 10
    samples: int = 4096
    batch: int = 256
    steps: int = 220  # steps of each timed poptrain run
    warmup: int = 30  # first steps left out of the rate (start-up, first exchanges, allocator warm-up)
    repeats: int = 2  # the configurations in ``repeated`` run this many times, interleaved; the best run counts
    repeated: tuple[str, ...] = ("none", "sync1", "async1", "single")  # the others run once
    runs: tuple[str, ...] | None = None  # only these training configurations (None: every one the figures need)
    single_steps: int = 150  # timed steps of the single-process baseline (after ``warmup``)
    # Exchange latency.
    latency_members: tuple[int, ...] = (2, 8)
    latency_rounds: int = 200
    latency_warmup: int = 20
    latency_modes: tuple[str, ...] = ("sync", "async")
    # Averaging bandwidth: sources x parameters averaged into a target.
    avg_sources: int = 4
    avg_params: int = 25_000_000
    avg_rounds: int = 40
    avg_warmup: int = 3
    avg_log_every: int = 10  # the figure's run logs (and computes) coupling metrics every k rounds
    # The averaging family against independent training (issue 26): one run per seed, dataset and method.
    methods_seeds: tuple[int, ...] = (0, 1, 2)
    methods_datasets: tuple[str, ...] = ("digits", "regression")
    methods_members: int = 4
    methods_steps: int = 1000
    methods_batch: int = 64
    # Packing (issue 15): seed-000 members, few (one per process vs packed) and many (packed vs torch.func).
    packing_small: int = 16
    packing_large: int = 1000
    # Steps 50 to 159 (as issue 22 measured: past step 50), the checkpoint at step 100 in them, as in
    # a run; a window of steps 20 to 59 was too short to be steady here (0.79 to 1.16 in one hour).
    packing_steps: int = 160
    packing_warmup: int = 50
    # Start-up.
    startup_steps: int = 3
    startup_child: bool = True  # time start-up in a fresh process; smoke: reuse a timed run instead (Ray already up)
    # PBT against Ray Tune (configs/pbt.yaml both ways): its first `pbt_members` members, `pbt_steps`
    # steps, ranked every `pbt_every` steps, once per seed on each side.
    pbt_members: int = 8
    pbt_steps: int = 600
    pbt_every: int = 50
    pbt_seeds: tuple[int, ...] = (0, 1, 2)
    pbt_without_checkpoints: bool = True  # also one poptrain run with checkpoint.every: 0 (exploits need no checkpoint)
    pbt_tune_without_actor_reuse: bool = False  # also one Tune run with TuneConfig's default reuse_actors=False (~15 min here)
    pbt_whole_processes: bool = True  # also each seed as whole processes, each starting its own Ray (`poptrain run` vs a Tune script)
    # `poptrain run configs/thousand.yaml` as a process against a torch.func loop's process: members and
    # steps (None: the config's 1,000 and 300), and how many poptrain runs (the loop runs before and after each).
    e2e_members: int | None = None
    e2e_steps: int | None = None
    e2e_repeats: int = 1
    e2e_loop_before: bool = True  # a torch.func process before the first poptrain run too (--smoke: only after, to stay short)
    # Issue 26's methods at scale (averaging_at_scale): configs/thousand.yaml's members with each method's coupling.
    scale_members: int = 1000
    scale_steps: int = 100
    scale_warmup: int = 30
    scale_methods: tuple[str, ...] = ("papa", "wash", "diloco", "gossip")
    scale_bracket: bool = True  # independent training after the methods too (smoke: before only)
    thresholds: bool = True  # smoke: report, never judge

    @property
    def mlp_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.classes, "hidden": list(self.hidden), "activation": "prelu"}

    def params_per_member(self) -> int:
        widths = [self.in_features, *self.hidden, self.classes]
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True)) + len(self.hidden)


SIZES = {
    "smoke": Sizes(
        mode="smoke",
        in_features=32,
        hidden=(64,),
        classes=4,
        samples=512,
        batch=32,
        steps=30,
        warmup=5,
        repeats=1,
        runs=("none", "sync1", "single"),
        single_steps=20,
        latency_members=(2,),
        latency_rounds=30,
        latency_warmup=5,
        latency_modes=("sync",),
        avg_sources=2,
        avg_params=100_000,
        avg_rounds=4,
        avg_warmup=1,
        avg_log_every=2,
        startup_steps=2,
        startup_child=False,
        pbt_members=2,
        pbt_steps=40,
        pbt_every=10,
        pbt_seeds=(0,),
        pbt_without_checkpoints=False,
        thresholds=False,
        packing_small=2,
        packing_large=3,
        packing_steps=25,
        packing_warmup=10,
        pbt_whole_processes=False,
        e2e_members=20,
        e2e_steps=20,
        e2e_loop_before=False,
        methods_seeds=(0,),
        methods_datasets=("digits",),
        methods_members=2,
        methods_steps=10,
        scale_members=4,
        scale_steps=30,
        scale_warmup=10,
        scale_methods=("papa",),
        scale_bracket=False,
    ),
    "default": Sizes(mode="default"),
    "full": Sizes(
        mode="full",
        steps=1500,
        warmup=100,
        repeats=3,
        repeated=("none", "sync1", "single", "sync10", "async1", "async10"),
        single_steps=800,
        latency_members=(2, 8, 16),
        latency_rounds=2000,
        latency_warmup=100,
        avg_rounds=100,
        avg_warmup=3,
        pbt_tune_without_actor_reuse=True,
        e2e_repeats=3,
    ),
}


# --------------------------------------------------------------------------------------------
# Result rows


def row(
    figure: str,
    name: str,
    *,
    value: float | None,
    unit: str,
    ratio: float | None,
    target: tuple[str, float] | None,
    baseline: dict[str, Any] | None = None,
    sizes: Sizes | None = None,
    details: dict[str, Any] | None = None,
    available: bool = True,
    note: str | None = None,
) -> dict[str, Any]:
    """One line of a figure: the measured value, its baseline, the ratio and the target the ratio is held to.

    ``ratio`` is measured / baseline for figures with a baseline. Start-up and memory have none: their
    ratio is measured / limit (the fraction of the issue's budget used), so ``<= 1`` meets the target.
    """
    passed = None
    if available and ratio is not None and target is not None and (sizes is None or sizes.thresholds):
        op, bound = target
        passed = ratio >= bound if op == ">=" else ratio <= bound
    return {
        "figure": figure,
        "row": name,
        "available": available,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "target": {"op": target[0], "value": target[1]} if target else None,
        "pass": passed,
        "note": note,
        "details": details or {},
    }


def unavailable(figure: str, name: str, target: tuple[str, float] | None, reason: str) -> dict[str, Any]:
    return row(figure, name, value=None, unit="", ratio=None, target=target, available=False, note=f"not available: {reason}")


def crashed(figure: str, exc: BaseException) -> dict[str, Any]:
    """The row of a figure whose benchmark raised ``exc`` (called where it is caught): the error and
    its traceback, so that the other figures of the run are still reported."""
    import traceback

    out = row(figure, "(crashed)", value=None, unit="", ratio=None, target=None, available=False, note=f"{type(exc).__name__}: {exc}")
    out["error"] = traceback.format_exc()
    return out


# --------------------------------------------------------------------------------------------
# The machine


def machine() -> dict[str, Any]:
    import numpy
    import ray
    import torch

    try:
        import mlflow

        mlflow_version = mlflow.__version__
    except Exception:  # pragma: no cover - mlflow is a dependency
        mlflow_version = None
    memory = None
    try:
        with open("/proc/meminfo") as fh:
            memory = int(fh.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "mlflow": mlflow_version,
        "numpy": numpy.__version__,
    }


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# Ray


def start_ray(gpus: bool = False) -> bool:
    """A local Ray for the benchmarks (unless one is already up, e.g. pytest's session Ray).

    Without ``gpus``, no GPU even on a GPU machine: the figures compare against CPU baselines
    measured in this process (a single-process loop, the torch.func yardstick on CPU threads), and
    `num_gpus: auto` would otherwise move the members, not the baselines, to the GPU. ``--gpu``
    (benchmarks/gpu.py) starts Ray with the GPUs.

    ``address="local"`` always starts a fresh local instance: a bare ``ray.init()`` would join a
    cluster that ``ray start`` left recorded in /tmp/ray/ray_current_cluster.
    Returns whether this call started Ray (and so must stop it).
    """
    import ray

    if ray.is_initialized():
        return False
    # Actors import benchmarks.*: a local Ray's processes inherit this environment. Not a job
    # runtime_env, which would leave the workers Ray starts ahead of time unused.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        **({} if gpus else {"num_gpus": 0}),  # with gpus: Ray counts them itself
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        log_to_driver=False,
    )
    return True


# --------------------------------------------------------------------------------------------
# poptrain configs


def tracking_fields() -> set[str]:
    from poptrain.config import TrackingConfig

    return set(TrackingConfig.model_fields)


def quiet_tracking(uri: str, experiment: str) -> dict[str, Any]:
    """Tracking settings for a benchmark run: the shared sqlite store; end-of-run extras (model
    logging, plots) off where the schema has them, since no figure measures them."""
    tracking: dict[str, Any] = {"uri": uri, "experiment": experiment}
    fields = tracking_fields()
    for key in ("log_models", "plots"):
        if key in fields:
            tracking[key] = False
    return tracking


def mlp_member(name: str, sizes: Sizes, **changes) -> dict[str, Any]:
    member = {
        "name": name,
        "model": {"name": "mlp", "kwargs": sizes.mlp_kwargs},
        "data": {
            "name": "synthetic_classification",
            "kwargs": {"n": sizes.samples, "in_features": sizes.in_features, "num_classes": sizes.classes},
            "batch_size": sizes.batch,
        },
        "loss": "cross_entropy",
        "optimizer": {"name": "adam", "lr": 1e-3},
        "resources": {"num_cpus": 1},
    }
    member.update(copy.deepcopy(changes))
    return member


SEPARATION = {"type": "separation", "param": "activation.weight", "margin": 2.0}


def population_config(
    name: str, sizes: Sizes, workdir: Path, uri: str, *, coupled: bool, every: int = 1, mode: str | None = None, steps: int | None = None
) -> dict[str, Any]:
    """Two members (the small MLP, batch ``sizes.batch``, one CPU each), with or without the separation coupling."""
    exchange: dict[str, Any] = {"every": every}
    if mode is not None:
        exchange["mode"] = mode
    return {
        "name": name,
        "seed": 0,
        "steps": steps or sizes.steps,
        "output_dir": str(workdir / "runs"),
        "exchange": exchange,
        "tracking": quiet_tracking(uri, "benchmarks"),
        "members": [mlp_member("m1", sizes), mlp_member("m2", sizes)],
        "couplings": [dict(SEPARATION)] if coupled else [],
    }


def async_mode_available(sizes: Sizes, workdir: Path, uri: str) -> tuple[bool, str]:
    """Whether this poptrain accepts ``exchange.mode: async`` (issue 7 adds it)."""
    import poptrain

    try:
        cfg = poptrain.load_config(population_config("probe", sizes, workdir, uri, coupled=True, mode="async"))
    except poptrain.ConfigError as exc:
        return False, f"poptrain.load_config refuses exchange.mode=async ({str(exc).splitlines()[0][:200]})"
    return True, f"exchange = {cfg.exchange.model_dump(mode='json')}"


# --------------------------------------------------------------------------------------------
# Whole processes, each starting its own Ray


def fresh_process_env(ray_tmp: str) -> dict[str, str]:
    """The environment of a child process that starts its own local Ray as on a fresh machine: this
    checkout first on ``PYTHONPATH``, no ``RAY_ADDRESS``, a Ray temp folder of its own (a bare
    ``ray.init()`` would otherwise join a cluster ``ray start`` recorded in /tmp/ray), no GPU (the
    figures are CPU figures)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), RAY_TMPDIR=ray_tmp, CUDA_VISIBLE_DEVICES="")
    env.pop("RAY_ADDRESS", None)
    return env


def timed_process(argv: list[str], log_path: Path, marker: str | None = None, timeout_s: float = 3600) -> dict[str, Any]:
    """Run ``argv`` (from the repository root, in :func:`fresh_process_env`) and time it from just
    before the process is started: ``exit_s`` when it has exited, and with ``marker``, ``marker_s``
    when the first output line starting with it arrived (``None`` if none did). Its output (stdout
    and stderr) goes to ``log_path``; the last lines come back as ``output_tail``. Raises
    ``RuntimeError`` when it fails."""
    import shutil
    import subprocess
    import tempfile
    import threading

    ray_tmp = tempfile.mkdtemp(prefix="prb-", dir="/tmp" if os.path.isdir("/tmp") else None)
    marker_at: list[float] = []
    lines: list[str] = []
    try:
        with open(log_path, "w") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=REPO, env=fresh_process_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

            def read() -> None:
                for line in proc.stdout:
                    if marker and not marker_at and line.startswith(marker):
                        marker_at.append(time.perf_counter())
                    lines.append(line)
                    log.write(line)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                returncode = proc.wait()
            exited = time.perf_counter()
            reader.join(timeout=10)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:4])} ... exited with {returncode}:\n{''.join(lines)[-3000:]}")
    return {"exit_s": exited - started, "marker_s": marker_at[0] - started if marker_at else None, "output_tail": "".join(lines[-12:]), "log": str(log_path)}


# --------------------------------------------------------------------------------------------
# Rates from MLflow


def metric_times(uri: str, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    """(step, wall-clock seconds) of every logged value of ``key``: members log each step's metrics
    with ``time.time()`` taken right after the step, so these are step-completion times."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((m.step, m.timestamp / 1000.0) for m in history)


def steady_rate(points: list[tuple[int, float]], warmup: int) -> dict[str, Any]:
    """Steps per second over the steps after ``warmup``: (last step - first step) / (their time apart).

    Also the median and the 90th percentile of the per-step times (ms resolution).
    """
    kept = [(s, t) for s, t in points if s >= warmup]
    if len(kept) < 2:
        raise RuntimeError(f"too few logged steps after warm-up ({len(kept)} of {len(points)}); raise `steps`")
    (s0, t0), (s1, t1) = kept[0], kept[-1]
    span = max(t1 - t0, 1e-3)
    gaps = [(b[1] - a[1]) / max(b[0] - a[0], 1) for a, b in itertools.pairwise(kept)]
    gaps.sort()
    return {
        "steps_per_s": (s1 - s0) / span,
        "window_steps": s1 - s0,
        "window_s": span,
        "step_ms_median": 1000 * statistics.median(gaps),
        "step_ms_p90": 1000 * gaps[int(0.9 * (len(gaps) - 1))],
    }


# --------------------------------------------------------------------------------------------
# Memory of a process


def process_memory(pid: int, full: bool = True) -> dict[str, float] | None:
    """Resident (RSS) memory of ``pid`` in MiB, and with ``full`` also unique (USS: pages only this
    process maps) and proportional (PSS) memory, which cost a read of /proc/PID/smaps (~9 ms for a
    torch process here, against ~0.1 ms for RSS alone).

    psutil when installed; otherwise /proc (Linux). None when the process is gone or unreadable.
    """
    try:
        import psutil

        proc = psutil.Process(pid)
        out = {"rss_mib": proc.memory_info().rss / 2**20}
        if not full:
            return out
        try:
            full = proc.memory_full_info()
            out["uss_mib"] = full.uss / 2**20
            if hasattr(full, "pss"):
                out["pss_mib"] = full.pss / 2**20
        except (psutil.AccessDenied, psutil.ZombieProcess):
            pass
        return out
    except ImportError:
        pass
    except Exception:
        return None
    try:
        out = {}
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    out["rss_mib"] = int(line.split()[1]) / 1024
        if not full:
            return out or None
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                fields = {line.split(":")[0]: int(line.split()[1]) for line in fh if line.rstrip().endswith("kB")}
            out["pss_mib"] = fields.get("Pss", 0) / 1024
            out["uss_mib"] = (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024
        except OSError:
            pass
        return out or None
    except OSError:
        return None


class MemorySampler:
    """A ``progress=`` callback for :func:`poptrain.run` that samples every member process's memory:
    RSS at every snapshot (every 0.5 s), USS and PSS at every ``full_every``-th one (they cost a read
    of smaps, which would otherwise take a few percent of a core from the run being timed)."""

    def __init__(self, full_every: int = 8):
        self.full_every = full_every
        self.calls = 0
        self.peak: dict[str, dict[str, float]] = {}
        self.last: dict[str, dict[str, float]] = {}
        self.pids: dict[str, int] = {}
        self.samples = 0

    def __call__(self, snapshot: dict[str, Any]) -> None:
        full = self.calls % self.full_every == self.full_every // 2  # not the very first snapshot: mid-run
        self.calls += 1
        for name, info in (snapshot.get("placement") or {}).items():
            pid = info.get("pid")
            if pid is None:
                continue
            self.pids[name] = pid
            mem = process_memory(int(pid), full=full)
            if not mem:
                continue
            self.samples += 1
            self.last[name] = mem
            peak = self.peak.setdefault(name, {})
            for key, value in mem.items():
                peak[key] = max(peak.get(key, 0.0), value)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (all its threads), from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def ray_processes_cpu() -> dict[tuple[str, int], float]:
    """CPU seconds of every Ray worker process on this machine, keyed by (role, pid); the role is the
    process title Ray sets (``ray::MemberHost``, ``ray::CoordinatorActor``, ...)
    without the method. Empty where /proc is missing."""
    out: dict[tuple[str, int], float] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                title = fh.read().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if not title.startswith("ray::"):
            continue
        role = title.split()[0].split(".")[0]
        seconds = cpu_seconds(pid)
        if seconds is not None:
            out[(role, pid)] = seconds
    return out


class CpuSampler:
    """Samples the CPU time of Ray's worker processes and of this (driver) process with each progress
    snapshot, so that :meth:`cores_busy` can say how many cores each role kept busy during the timed steps."""

    def __init__(self):
        self.series: list[tuple[float, int, dict[tuple[str, int], float]]] = []

    def __call__(self, snapshot: dict[str, Any]) -> None:
        steps = [int(m.get("step", 0)) for m in (snapshot.get("members") or {}).values()]
        cpu = ray_processes_cpu()
        mine = cpu_seconds(os.getpid())
        if mine is not None:
            cpu[("driver", os.getpid())] = mine
        self.series.append((time.time(), min(steps) if steps else 0, cpu))

    def cores_busy(self, first_step: int, last_step: int) -> dict[str, float] | None:
        """Cores each role kept busy (CPU seconds / wall seconds) between the first snapshot at or past
        ``first_step`` and the last one before ``last_step``; None with fewer than two such snapshots."""
        window = [s for s in self.series if first_step <= s[1] < last_step]
        if len(window) < 2:
            return None
        (t0, _, c0), (t1, _, c1) = window[0], window[-1]
        busy: dict[str, float] = {}
        for key, seconds in c1.items():
            if key in c0:
                busy[key[0]] = busy.get(key[0], 0.0) + (seconds - c0[key]) / (t1 - t0)
        busy = {k: round(v, 3) for k, v in sorted(busy.items(), key=lambda kv: -kv[1]) if v >= 0.005}
        busy["total"] = round(sum(busy.values()), 3)
        busy["window_s"] = round(t1 - t0, 2)
        return busy


class Samplers:
    """Several progress callbacks as one."""

    def __init__(self, *callbacks):
        self.callbacks = callbacks

    def __call__(self, snapshot: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback(snapshot)


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def as_dict(sizes: Sizes) -> dict[str, Any]:
    out = asdict(sizes)
    out["params_per_member"] = sizes.params_per_member()
    return out


@dataclass
class Context:
    """What every benchmark gets: sizes, a scratch folder, the shared MLflow store, the results so far."""

    sizes: Sizes
    workdir: Path
    uri: str
    shared: dict[str, Any] = field(default_factory=dict)  # runs one figure makes and another reuses
