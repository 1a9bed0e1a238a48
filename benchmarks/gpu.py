"""``python -m benchmarks --gpu [--dry-run]``: the prepared check of poptrain on a CUDA machine.

No GPU has been lent to this project yet: this is the one script to run when one is, in one go,
and it writes one JSON (``<out>/<UTC time>-gpu.json`` and ``<out>/latest-gpu.json``) and a table:

* ``gpu_tests``: the ``gpu``-marked tests (``tests/test_gpu.py``: each member's device, stacked
  members on CUDA against one by one, packed against alone and a killed member against an
  uninterrupted run bitwise, PBT between GPU members, a warm process's GPU memory once parked,
  a batch's copy not waiting for the GPU), passed / run.
* ``quick_start``: ``configs/prelu_separation.yaml`` on the GPU, each member's device read back
  from its placement.
* ``warm_handover``: GPU memory in use (``nvidia-smi``) before the quick start, after it (its
  processes parked, kept warm) and after a second run took them over.
* ``two_members_vs_single_process``: the CPU figure ``vs_single_process``'s two members
  (``benchmarks.training``: an MLP each, seed 000's separation of their PReLU slopes, exchange every
  step), ``members_per_host: auto`` and ``num_gpus: auto``: both share the GPU, on one host, against
  the seeds' single process on the same GPU (both models in this process, one Adam over
  ``itertools.chain``, the joint loss with the separation penalty:
  :func:`benchmarks.training.single_process`), population samples/s over single-process samples/s.
* ``stacked_vs_torch_func``: 100 and 1,000 seed-000 members (``configs/thousand.yaml``'s member,
  ``members_per_host: auto``: one host per GPU, stacked) against a hand-written torch.func loop over
  the same modules on that GPU (``benchmarks.packing.torch_func_yardstick``), member-steps/s,
  target >= 1.0.
* ``stacked_syncs_per_step``: host-device synchronisations per step of 100 seed-000 members stacked
  in one :class:`~poptrain.training.stacked.StackedGroup` on the GPU, counted with the torch profiler
  (:func:`stacked_step_syncs`), target <= 1 (issue 22, item 6).

``--dry-run`` runs the same code on the CPU at tiny sizes (2 and 4 members, a few steps, no
pytest, no ``nvidia-smi``; the stacked steps under the profiler, though a CPU has no
synchronisation to count), says that it found no GPU, and exits 0: it keeps the plumbing from
rotting between GPU loans (``tests/test_gpu_check.py``). Without ``--dry-run`` and without a GPU it
measures nothing and exits 2. A section that raises is reported as a ``(crashed)`` row with its
traceback and the others still run (exit code 1): a GPU loan is short.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, SIZES, Context, Sizes, crashed, machine, now_utc, row, start_ray, unavailable

QUICK_START = REPO / "configs" / "prelu_separation.yaml"


@dataclasses.dataclass(frozen=True)
class GpuSizes:
    quick_start_steps: int
    stacked_members: tuple[int, ...]
    stacked_steps: int
    stacked_warmup: int
    run_tests: bool
    two_members: Sizes  # the two members against the single process (model, batch, steps, warm-up)
    sync_members: int  # members of the stacked group whose synchronisations are counted
    sync_warmup: int  # steps before the profiled ones (lazy set-up, the first exchange): a multiple of the exchange period
    sync_steps: int  # profiled steps: whole exchange periods (every 10)


# The CPU figure's two members at default sizes (MLP 512 -> 1024 -> 512 -> 10, batch 256), more steps:
# a GPU step takes milliseconds, and the rate comes from logged step times (ms resolution).
TWO_MEMBERS_GPU = dataclasses.replace(SIZES["default"], mode="gpu", steps=600, warmup=100, single_steps=500, repeats=1)
GPU = GpuSizes(
    quick_start_steps=300,
    stacked_members=(100, 1000),
    stacked_steps=120,
    stacked_warmup=40,
    run_tests=True,
    two_members=TWO_MEMBERS_GPU,
    sync_members=100,
    sync_warmup=10,
    sync_steps=20,
)
DRY_RUN = GpuSizes(
    quick_start_steps=4,
    stacked_members=(4,),
    stacked_steps=12,
    stacked_warmup=2,
    run_tests=False,
    two_members=SIZES["smoke"],
    sync_members=4,
    sync_warmup=10,
    sync_steps=10,
)
# CUDA runtime calls that block the host until the GPU is done. A read from the device (``.item()``,
# ``.tolist()``, ``.cpu()``) is a cudaMemcpyAsync and then one cudaStreamSynchronize: one wait.
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"})
STEP_MARK = "poptrain stacked step "


def gpu_memory_mib() -> list[float] | None:
    """Memory in use on each GPU (MiB), as ``nvidia-smi`` reports it; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60)
    return [float(line) for line in done.stdout.split()] if done.returncode == 0 else None


def gpu_tests() -> dict[str, Any]:
    """Run the gpu-marked tests in a fresh pytest; their outcome counts."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "tests/test_gpu.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {word: int(n) for n, word in (part.split()[:2] for part in summary.strip("= ").split(" in ")[0].split(", ") if part[:1].isdigit())}
    return {"returncode": done.returncode, "summary": summary, "counts": counts, "tail": done.stdout[-4000:]}


def quick_start(ctx: Context, steps: int, keep_warm_s: float) -> Any:
    """``configs/prelu_separation.yaml`` into this check's scratch folder and MLflow store."""
    import poptrain

    overrides = [
        f"steps={steps}",
        f"output_dir={ctx.workdir / 'runs'}",
        f"tracking.uri={ctx.uri}",
        "tracking.experiment=gpu-check",
        "tracking.plots=false",
        "tracking.log_models=false",
    ]
    return poptrain.run(str(QUICK_START), overrides, keep_warm_s=keep_warm_s)


def stacked_step_syncs(ctx: Context, members: int, warmup: int, steps: int, device: str) -> dict[str, Any]:
    """Host-device synchronisations in each step of ``members`` seed-000 members
    (:func:`benchmarks.packing.population`: separation over all pairs, exchanged every 10 steps)
    stacked in one :class:`~poptrain.training.stacked.StackedGroup` on ``device``, driven in this process as a
    host drives it (the real coordinator, link and wire, in process: no Ray): ``warmup`` steps, then
    ``steps`` under the torch profiler, each step in a ``record_function`` of its own.

    On CUDA, a synchronisation is a runtime call that blocks the host until the GPU is done
    (:data:`SYNC_CALLS`) made during a step; the device-to-host copies the GPU ran are counted
    beside them (a read is one copy and one wait). As a cross-check, the same number of steps again
    under ``torch.cuda.set_sync_debug_mode("warn")``: the synchronising operations torch itself
    reports. On the CPU nothing synchronises: the steps run under the profiler all the same (the
    plumbing), and each step's ``aten::_local_scalar_dense`` (a scalar read from a tensor: a wait on
    a GPU; ``.tolist()`` reads without it, so a lower bound) is what is counted."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.packing import population
    from poptrain.config import load_config
    from poptrain.coordinator.actor import InProcessClient, calls_in_flight, in_process_coordinator
    from poptrain.driver.checks import inspect_population
    from poptrain.exchange.links import open_link
    from poptrain.training.lockstep import drive
    from poptrain.training.member import MemberTrainer
    from poptrain.training.stacked import StackedGroup, form_groups

    on = torch.device(device)
    cuda = on.type == "cuda"
    cfg = load_config({**population(ctx, f"gpu-syncs-{members}", members), "steps": warmup + 2 * steps})
    info = inspect_population(cfg)
    coordinator, wire = in_process_coordinator(cfg, info)
    link = open_link(cfg, coordinator.plan, InProcessClient(coordinator, wire, calls_in_flight(1)))
    debug_mode = None
    try:
        trainers = [MemberTrainer(cfg, name, info, on) for name in cfg.member_names]
        for trainer in trainers:
            trainer.connect(link)
        units = form_groups(trainers)
        if len(units) != 1 or not isinstance(units[0], StackedGroup):
            raise RuntimeError(f"the {members} members did not stack into one group: {sorted({str(t.stacking_problem) for t in trainers})}")
        group = units[0]

        def step() -> None:
            drive(units, [group.step_program()])

        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize(on)
        first = group.members[0].step
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as profiler:
            for index in range(first, first + steps):
                with record_function(f"{STEP_MARK}{index}"):
                    step()
            if cuda:
                torch.cuda.synchronize(on)
        if cuda:
            debug_mode = _sync_debug_mode_count(step, steps)
    finally:
        link.close()
    events = list(profiler.events())
    marks = sorted((e for e in events if e.name.startswith(STEP_MARK) and e.device_type == DeviceType.CPU), key=lambda e: e.time_range.start)

    def during(mark) -> list:
        return [e for e in events if mark.time_range.start <= e.time_range.start < mark.time_range.end]

    per_step = [during(mark) for mark in marks]
    numbers = [int(mark.name[len(STEP_MARK) :]) for mark in marks]
    out: dict[str, Any] = {
        "members": members,
        "device": device,
        "warmup_steps": warmup,
        "steps": numbers,
        "exchange_every": group.every,
        "profiled_events": len(events),
    }
    if not cuda:
        # The step's own thread: the in-process coordinator's threads run ops during the step too.
        own = [[e.name for e in inside if e.thread == mark.thread] for mark, inside in zip(marks, per_step, strict=True)]
        scalar_reads = [names.count("aten::_local_scalar_dense") for names in own]
        return {
            **out,
            "syncs_per_step": None,
            "cpu_scalar_reads_per_step": scalar_reads,
            "cpu_ops_per_step": [sum(name.startswith("aten::") for name in names) for names in own],
            "why_not": f"no CUDA synchronisation on the CPU: {len(marks)} stacked steps of {members} members ran under the profiler, "
            f"{max(scalar_reads, default=0)} scalar reads a step at most (each a wait on a GPU)",
        }
    runtime_calls = sum(e.name.startswith("cuda") for inside in per_step for e in inside)
    syncs = [sum(e.name in SYNC_CALLS for e in inside) for inside in per_step]
    calls = Counter(e.name for inside in per_step for e in inside if e.name in SYNC_CALLS)
    exchanging = [n % group.every == 0 for n in numbers]
    out.update(
        {
            "syncs_per_step": syncs,
            "sync_calls": dict(calls),
            "cuda_runtime_calls": runtime_calls,
            "dtoh_copies": sum("DtoH" in e.name for e in events if e.device_type == DeviceType.CUDA),
            "mean": sum(syncs) / len(syncs) if syncs else None,
            "max": max(syncs, default=None),
            "mean_exchange_steps": _mean([s for s, x in zip(syncs, exchanging, strict=True) if x]),
            "mean_other_steps": _mean([s for s, x in zip(syncs, exchanging, strict=True) if not x]),
            "sync_debug_mode_per_step": debug_mode,
        }
    )
    if not runtime_calls:  # no CUPTI: zero synchronisations would be read as a pass
        out.update(syncs_per_step=None, why_not="the profiler recorded no CUDA runtime call during the steps (CUPTI missing?)")
    return out


def _sync_debug_mode_count(step, steps: int) -> float | None:
    """Synchronising CUDA operations per step that torch reports in ``set_sync_debug_mode("warn")``
    over ``steps`` calls of ``step``; None where no warning came through (then nothing was counted)."""
    import warnings

    import torch

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reported = sum("synchronizing" in str(w.message) for w in caught)
    return reported / steps if reported else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# -- the sections of the check: each returns its rows ---------------------------------------


def tests_rows(sizes: GpuSizes) -> list[dict[str, Any]]:
    if not sizes.run_tests:
        return [unavailable("gpu_tests", "gpu-marked tests passed / run", (">=", 1.0), "dry run: the gpu tests skip without CUDA")]
    tests = gpu_tests()
    ran = sum(tests["counts"].values())
    return [
        row(
            "gpu_tests",
            "gpu-marked tests passed / run",
            value=tests["counts"].get("passed", 0),
            unit="tests",
            ratio=(tests["counts"].get("passed", 0) / ran) if ran else None,
            target=(">=", 1.0),
            details=tests,
        )
    ]


def quick_start_rows(ctx: Context, sizes: GpuSizes, device: str) -> list[dict[str, Any]]:
    """The quick start on the GPU (each member's device read back), and the GPU memory of its
    processes before, parked, after a second run took them over, and released."""
    import poptrain

    rows = []
    memory = {"before": gpu_memory_mib()}
    try:
        first = quick_start(ctx, sizes.quick_start_steps, keep_warm_s=120)
        memory["parked"] = gpu_memory_mib()  # its processes wait, parked, for the next run
        devices = {name: info.get("device") for name, info in first.placement.items()}
        on_device = sum(1 for d in devices.values() if str(d).startswith(device))
        rows.append(
            row(
                "quick_start",
                f"members on {device} (read back)",
                value=on_device,
                unit="members",
                ratio=on_device / len(devices),
                target=(">=", 1.0),
                details={"devices": devices, "placement": first.placement, "seconds": first.seconds, "metrics": first.metrics},
            )
        )
        second = quick_start(ctx, sizes.quick_start_steps, keep_warm_s=120)  # takes the parked processes over
        memory["after_handover"] = gpu_memory_mib()
    finally:
        poptrain.release_warm_members()
    memory["released"] = gpu_memory_mib()
    took_over = {p["pid"] for p in first.placement.values()} == {p["pid"] for p in second.placement.values()}
    if memory["before"] is None:
        rows.append(
            unavailable(
                "warm_handover",
                "GPU memory parked - before",
                ("<=", 1.0),
                f"no nvidia-smi here; the second run {'took over' if took_over else 'did not take over'} the warm processes",
            )
        )
    else:
        parked = sum(memory["parked"]) - sum(memory["before"])
        rows.append(
            row(
                "warm_handover",
                "GPU memory parked - before",
                value=parked,
                unit="MiB",
                ratio=None,
                target=None,
                details={"memory_mib": memory, "took_over_warm_processes": took_over},
            )
        )
    return rows


def two_members_rows(ctx: Context, sizes: GpuSizes, device: str, dry_run: bool) -> list[dict[str, Any]]:
    """The CPU figure ``vs_single_process``'s population (exchange every step) and its single-process
    baseline, both on ``device``: samples/s of the population over the single process's. The issue
    sets no target for it."""
    from benchmarks.training import population_cpus, run_population, single_process

    pair = Context(sizes=sizes.two_members, workdir=ctx.workdir, uri=ctx.uri)
    # On the GPU `auto` puts both on one host (one per GPU), stacked; on the CPU each gets a process
    # of its own, which the dry run takes over from the quick start's warm processes (poptrain.driver.pool:
    # the same two hosts) instead of starting new ones; the stacked rows exercise stacking.
    population = run_population(pair, "sync1", 0, placement={"members_per_host": "auto"})
    single = single_process(pair, 0, population_cpus(), device="cuda:0" if device == "cuda" else "cpu")
    devices = sorted({str(p["device"]) for p in population["placement"].values()})
    hosts = len({p["pid"] for p in population["placement"].values()})
    baseline = {
        "name": f"one process on {single['device']}, both models, one Adam over itertools.chain, the joint loss with the separation penalty",
        "value": single["samples_per_s"],
        "unit": "samples/s",
    }
    return [
        row(
            "two_members_vs_single_process",
            f"2 members sharing {'/'.join(devices)} on {hosts} host(s), exchange every step, vs one process",
            value=population["samples_per_s"],
            unit="samples/s",
            ratio=population["samples_per_s"] / single["samples_per_s"],
            target=None,
            baseline=baseline,
            sizes=sizes.two_members,
            details={"population": population, "single_process": single, "devices": devices, "hosts": hosts},
        )
    ]


def stacked_rows(ctx: Context, sizes: GpuSizes, device: str, dry_run: bool) -> list[dict[str, Any]]:
    from benchmarks.packing import timed_population, torch_func_yardstick

    rows = []
    for members in sizes.stacked_members:
        measured = timed_population(ctx, f"gpu-stacked-{members}", members)
        loop = torch_func_yardstick(members, sizes.stacked_steps - sizes.stacked_warmup, sizes.stacked_warmup, device=device)
        value, base = measured["member_steps_per_s"], loop["member_steps_per_s"]
        rows.append(
            row(
                "stacked_vs_torch_func",
                f"{members} members stacked on {measured['hosts']} host(s) vs a torch.func loop on {device}",
                value=value,
                unit="member-steps/s",
                ratio=value / base,
                target=(">=", 1.0),
                baseline={"value": base, "unit": "member-steps/s"},
                sizes=None if not dry_run else dataclasses.replace(ctx.sizes, thresholds=False),
                details={"stacked": measured, "torch_func": loop},
            )
        )
    return rows


def sync_rows(ctx: Context, sizes: GpuSizes, device: str, dry_run: bool) -> list[dict[str, Any]]:
    counted = stacked_step_syncs(ctx, sizes.sync_members, sizes.sync_warmup, sizes.sync_steps, "cuda:0" if device == "cuda" else "cpu")
    name = f"host-device synchronisations per stacked step, {sizes.sync_members} members on {device}"
    if counted["syncs_per_step"] is None:
        return [
            row(
                "stacked_syncs_per_step",
                name,
                value=None,
                unit="syncs/step",
                ratio=None,
                target=("<=", 1.0),
                available=False,
                note=f"not available: {counted['why_not']}",
                details=counted,
            )
        ]
    mean = counted["mean"]
    return [
        row(
            "stacked_syncs_per_step",
            name,
            value=mean,
            unit="syncs/step",
            ratio=mean,
            target=("<=", 1.0),
            baseline={"name": "issue 22, item 6: one read from the device a step at most", "value": 1.0, "unit": "syncs/step"},
            sizes=None if not dry_run else dataclasses.replace(ctx.sizes, thresholds=False),
            details=counted,
        )
    ]


def check(out: Path, dry_run: bool) -> int:
    import torch

    found = torch.cuda.is_available()
    if not found and not dry_run:
        print("poptrain GPU check: torch sees no CUDA device here; nothing measured. `--gpu --dry-run` exercises the check on the CPU.", file=sys.stderr)
        return 2
    sizes = DRY_RUN if dry_run else GPU
    device = "cuda" if found and not dry_run else "cpu"
    print(
        f"poptrain GPU check ({'dry run on the CPU' if dry_run else 'on ' + torch.cuda.get_device_name(0)}): "
        f"{'found no GPU' if not found else f'found {torch.cuda.device_count()} GPU(s)'}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="poptrain-gpu-check-"))
    packing_sizes = dataclasses.replace(SIZES["smoke"], packing_steps=sizes.stacked_steps, packing_warmup=sizes.stacked_warmup)
    ctx = Context(sizes=packing_sizes, workdir=workdir, uri=f"sqlite:///{workdir / 'mlflow.db'}")
    report: dict[str, Any] = {"date": now_utc(), "mode": "gpu-dry-run" if dry_run else "gpu", "gpu_found": found, "rows": []}
    rows = report["rows"]
    # In this order: the tests before this process starts Ray; the memory figures before this
    # process's own CUDA work (the single process, the torch.func loop, the profiled steps).
    sections = [
        ("gpu_tests", lambda: tests_rows(sizes)),
        ("quick_start", lambda: quick_start_rows(ctx, sizes, device)),
        ("two_members_vs_single_process", lambda: two_members_rows(ctx, sizes, device, dry_run)),
        ("stacked_vs_torch_func", lambda: stacked_rows(ctx, sizes, device, dry_run)),
        ("stacked_syncs_per_step", lambda: sync_rows(ctx, sizes, device, dry_run)),
    ]
    started = time.perf_counter()
    started_ray = failed = False
    try:
        for figure, section in sections:
            if figure != "gpu_tests" and not started_ray:
                started_ray = start_ray(gpus=not dry_run)
            print(f"[{time.perf_counter() - started:6.1f} s] {figure} ...", flush=True)
            t0 = time.perf_counter()
            try:
                made = section()
            except Exception as exc:  # reported, and the other sections still run: a GPU loan is short
                failed = True
                traceback.print_exc()
                made = [crashed(figure, exc)]
            for r in made:
                r["details"]["section_seconds"] = time.perf_counter() - t0
            rows.extend(made)
        report["machine"] = machine()
    finally:
        report["seconds"] = time.perf_counter() - started
        if started_ray:
            import ray

            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=str)
    path = out / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{report['mode']}.json"
    path.write_text(text)
    (out / f"latest-{report['mode']}.json").write_text(text)
    from benchmarks.__main__ import table

    print()
    print(f"poptrain GPU check ({report['mode']}, {report['date']}, {report['seconds']:.0f} s){': no GPU found, plumbing only' if not found else ''}")
    print(table(rows))
    print(f"\nwrote {path}")
    return 1 if failed else 0
