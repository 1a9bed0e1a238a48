"""Training throughput and memory: coupling overhead, vs. single process, memory per member.

All three figures come from the same timed ``poptrain.run`` calls of one two-member population
(an MLP per member, batch ``sizes.batch``, one CPU each), in configurations:

* ``none``: no coupling (members never exchange);
* ``sync1`` / ``sync10``: the separation coupling (seed 000), ``exchange.every`` 1 / 10, ``sync``;
* ``async1`` / ``async10``: the same with ``exchange.mode: async`` (default ``max_staleness``), when
  poptrain has it (``async10`` with ``--full`` only);
* ``single``: the seeds' single-process loop (both models, one Adam over ``itertools.chain``,
  the joint loss ``CE1 + CE2 + relu(2 - |a1 - a2|.sum())``), as many torch threads as the
  population has CPUs in total.

The configurations the targets hinge on (``none``, ``sync1``, ``single``; all of them with ``--full``)
run ``sizes.repeats`` times, interleaved (A B C A B C), and the fastest run of each counts: on a
shared machine other work only ever slows a run down.

Steps per second of a run come from MLflow: every member logs its ``loss`` each step with the
wall-clock time right after the step, so the rate is (last step - first step) / (time between
them) over the steps after ``sizes.warmup``. Start-up and the end of the run are outside that
window. The population's rate is the mean of its members' rates (samples/s = sum over members
of rate x batch).
"""

from __future__ import annotations

import importlib
import itertools
import time
from typing import Any

from benchmarks.common import Context, CpuSampler, MemorySampler, Samplers, metric_times, population_config, row, steady_rate, unavailable

NEEDS = {
    "coupling_overhead": ["none", "sync1", "async1"],
    "vs_single_process": ["single", "sync10", "sync1", "async10", "async1"],
    "memory": ["sync1"],
    "startup": ["sync1"],  # only with --smoke, which times start-up on a sync1 run instead of a fresh process
}

RUN_SETTINGS = {
    "none": dict(coupled=False, every=1),
    "sync1": dict(coupled=True, every=1),
    "sync10": dict(coupled=True, every=10),
    "async1": dict(coupled=True, every=1, mode="async"),
    "async10": dict(coupled=True, every=10, mode="async"),
}


def population_cpus() -> int:
    return 2  # two members, ``resources.num_cpus: 1`` each


def run_population(ctx: Context, key: str, repeat: int, placement: dict[str, Any] | None = None) -> dict[str, Any]:
    """One timed ``poptrain.run`` (``placement``: the config's, else the default); its rates (from
    MLflow) and its members' memory."""
    import poptrain

    settings = RUN_SETTINGS[key]
    config = population_config(f"bench-{key}-r{repeat}", ctx.sizes, ctx.workdir, ctx.uri, **settings)
    if placement is not None:
        config["placement"] = placement
    sampler, cpu = MemorySampler(), CpuSampler()
    api_call = time.time()
    started = time.perf_counter()
    # New processes for every run (no poptrain.driver.pool reuse), as a `poptrain run` has: memory and start-up are a new process's.
    result = poptrain.run(config, progress=Samplers(sampler, cpu), keep_warm_s=0)
    wall = time.perf_counter() - started
    members, first_steps = {}, []
    for name, run_id in result.member_run_ids.items():
        points = metric_times(result.tracking_uri, run_id)
        members[name] = steady_rate(points, ctx.sizes.warmup)
        first_steps.append(next(t for s, t in points if s == 0))
    rate = sum(m["steps_per_s"] for m in members.values()) / len(members)
    return {
        "key": key,
        "repeat": repeat,
        "steps_per_s": rate,
        "samples_per_s": sum(m["steps_per_s"] * ctx.sizes.batch for m in members.values()),
        "members": members,
        # Cores each process role kept busy during the timed steps (members, coordinator, driver: the driver writes MLflow).
        "cores_busy": cpu.cores_busy(ctx.sizes.warmup, ctx.sizes.steps - 2),
        "memory_peak_mib": sampler.peak,
        "memory_samples": sampler.samples,
        "placement": {n: {k: v for k, v in p.items() if k in ("pid", "device", "torch_threads")} for n, p in result.placement.items()},
        "run_seconds": result.seconds,
        "first_step_s": max(first_steps) - api_call,  # from the API call, Ray already up
        "wall_s": wall,
        "exchange": config["exchange"],
    }


def single_process(ctx: Context, repeat: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    """The seeds' way: both models in this process, one Adam over ``itertools.chain``, one backward of
    the joint objective; the same data pipeline (poptrain's seeded batches, moved to ``device`` as a
    member moves them) and models as the members. On ``cuda`` the clock starts and stops once the
    work queued on the GPU is done (its steps are asynchronous)."""
    import torch
    import torch.nn.functional as F

    from poptrain.builtins.data import synthetic_classification
    from poptrain.builtins.models import MLP
    from poptrain.components.batches import BatchStream, to_device

    sizes = ctx.sizes
    on = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(on)) if on.type == "cuda" else (lambda: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model1, model2 = MLP(**sizes.mlp_kwargs).to(on), MLP(**sizes.mlp_kwargs).to(on)
        batches = BatchStream(synthetic_classification(n=sizes.samples, in_features=sizes.in_features, num_classes=sizes.classes), sizes.batch, True, 0)
        optimizer = torch.optim.Adam(itertools.chain(model1.parameters(), model2.parameters()), lr=1e-3)
        start = None
        for step in range(sizes.warmup + sizes.single_steps):
            if step == sizes.warmup:
                sync()
                start = time.perf_counter()
            inputs, targets = to_device(batches.next(), on)
            optimizer.zero_grad()
            loss1 = F.cross_entropy(model1(inputs), targets)
            loss2 = F.cross_entropy(model2(inputs), targets)
            total = loss1 + loss2 + F.relu(2.0 - torch.abs(model1.activation.weight - model2.activation.weight).sum())
            total.backward()
            optimizer.step()
        sync()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    rate = sizes.single_steps / seconds
    return {
        "key": "single",
        "repeat": repeat,
        "steps_per_s": rate,
        "samples_per_s": 2 * sizes.batch * rate,  # both models see one batch per step
        "step_ms": 1000 / rate,
        "threads": threads,
        "device": device,
        "timed_steps": sizes.single_steps,
    }


def ensure_runs(ctx: Context, figures: list[str]) -> dict[str, dict[str, Any]]:
    """Run (once per benchmark invocation) every configuration the selected figures need, interleaved,
    ``repeats`` times; keeps every run and the fastest per configuration."""
    runs = ctx.shared.setdefault("training_runs", {})
    selected = ctx.shared.get("selected", figures)
    wanted: list[str] = []
    for figure in selected:
        if figure == "startup" and ctx.sizes.startup_child:
            continue
        for key in NEEDS.get(figure, []):
            if key not in wanted:
                wanted.append(key)
    if "async" not in ctx.shared:
        from benchmarks.common import async_mode_available

        ctx.shared["async"] = async_mode_available(ctx.sizes, ctx.workdir, ctx.uri)
    if not ctx.shared["async"][0]:
        wanted = [k for k in wanted if not k.startswith("async")]
    if ctx.sizes.mode != "full":  # no target of its own; only --full spends a run on it
        wanted = [k for k in wanted if k != "async10"]
    if ctx.sizes.runs is not None:
        wanted = [k for k in wanted if k in ctx.sizes.runs]
    missing = [k for k in wanted if k not in runs]
    for repeat in range(ctx.sizes.repeats):
        for key in missing:
            if repeat and key not in ctx.sizes.repeated:
                continue
            if key == "single":
                out = single_process(ctx, repeat, population_cpus())
            else:
                out = run_population(ctx, key, repeat)
            runs.setdefault(key, {"all": []})["all"].append(out)
            print(f"    {key:8s} repeat {repeat}: {out['steps_per_s']:.2f} steps/s", flush=True)
    for key in missing:
        runs[key]["best"] = max(runs[key]["all"], key=lambda r: r["steps_per_s"])
    return runs


def _why_missing(ctx: Context, key: str) -> str:
    if key.startswith("async") and not ctx.shared["async"][0]:
        return ctx.shared["async"][1]
    if ctx.sizes.runs is not None and key not in ctx.sizes.runs:
        return f"skipped with --{ctx.sizes.mode}"
    return "measured with --full only (no target of its own)"


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    keep = ("steps_per_s", "samples_per_s", "members", "exchange", "cores_busy", "run_seconds", "step_ms", "threads")
    return {k: run[k] for k in keep if k in run}


def coupling_overhead(ctx: Context) -> list[dict[str, Any]]:
    runs = ensure_runs(ctx, ["coupling_overhead"])
    base = runs["none"]["best"]
    baseline = {"name": "the same population, no coupling", "value": base["steps_per_s"], "unit": "steps/s"}
    rows = []
    for key, name, target in (("sync1", "sync, exchange every step", 0.90), ("async1", "async, exchange every step", 0.97)):
        if key not in runs:
            rows.append(unavailable("coupling_overhead", name, (">=", target), _why_missing(ctx, key)))
            continue
        best = runs[key]["best"]
        rows.append(
            row(
                "coupling_overhead",
                name,
                value=best["steps_per_s"],
                unit="steps/s",
                ratio=best["steps_per_s"] / base["steps_per_s"],
                target=(">=", target),
                baseline=baseline,
                sizes=ctx.sizes,
                details={
                    "measured": _summary(best),
                    "baseline": _summary(base),
                    "all_runs_steps_per_s": {k: [r["steps_per_s"] for r in runs[k]["all"]] for k in (key, "none")},
                },
            )
        )
    return rows


def vs_single_process(ctx: Context) -> list[dict[str, Any]]:
    runs = ensure_runs(ctx, ["vs_single_process"])
    base = runs["single"]["best"]
    baseline = {
        "name": f"one process, both models, one Adam over itertools.chain, {base['threads']} torch threads",
        "value": base["samples_per_s"],
        "unit": "samples/s",
    }
    rows = []
    for key, name, target in (
        ("sync10", "sync, exchange every 10 steps", 0.95),
        ("sync1", "sync, exchange every step", 0.90),
        ("async10", "async, exchange every 10 steps", None),
        ("async1", "async, exchange every step", None),
    ):
        bound = (">=", target) if target is not None else None
        if key not in runs:
            rows.append(unavailable("vs_single_process", name, bound, _why_missing(ctx, key)))
            continue
        best = runs[key]["best"]
        rows.append(
            row(
                "vs_single_process",
                name,
                value=best["samples_per_s"],
                unit="samples/s",
                ratio=best["samples_per_s"] / base["samples_per_s"],
                target=bound,
                baseline=baseline,
                sizes=ctx.sizes,
                details={
                    "measured": _summary(best),
                    "baseline": _summary(base),
                    "all_runs_samples_per_s": {k: [r["samples_per_s"] for r in runs[k]["all"]] for k in (key, "single")},
                },
            )
        )
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rows.append(
        unavailable(
            "vs_single_process",
            "on N GPUs (goal >= 0.9 N)",
            None,
            "this machine has no GPU" if not gpus else f"{gpus} GPU(s) here, but this suite times CPU populations only",
        )
    )
    return rows


def memory(ctx: Context) -> list[dict[str, Any]]:
    """Peak RSS per member process against a bare actor's (:func:`benchmarks.startup.bare_child`)
    plus the issue's 30 MiB allowance; ``--smoke`` (no fresh process): against the old 350 MiB."""
    runs = ensure_runs(ctx, ["memory"])
    per_run = []
    for run in runs["sync1"]["all"]:
        if run["memory_peak_mib"]:
            per_run.append(run["memory_peak_mib"])
    if not per_run:
        raise RuntimeError("no memory sample was taken during the runs (the progress callback never saw a member pid)")
    # The largest resident size any member reached in any run (sampled every 0.5 s during training).
    rss = max(m["rss_mib"] for peaks in per_run for m in peaks.values())
    uss = max((m["uss_mib"] for peaks in per_run for m in peaks.values() if "uss_mib" in m), default=None)
    pss = max((m["pss_mib"] for peaks in per_run for m in peaks.values() if "pss_mib" in m), default=None)
    if ctx.sizes.startup_child:
        from benchmarks.startup import bare_baseline

        bare = max(bare_baseline(ctx)["rss_mib"])
        limit, baseline = bare + 30.0, {"name": "a bare actor that imported torch and took one Adam step, + 30 MiB", "value": bare, "unit": "MiB"}
    else:
        limit, baseline = 350.0, {"name": "the issue's old limit (--smoke starts no fresh process)", "value": 350.0, "unit": "MiB"}
    return [
        row(
            "memory",
            "resident memory per member actor (peak RSS)",
            value=rss,
            unit="MiB",
            ratio=rss / limit,
            target=("<=", 1.0),
            baseline=baseline,
            sizes=ctx.sizes,
            details={
                "peak_uss_mib": uss,
                "peak_pss_mib": pss,
                "per_run_peaks": per_run,
                "limit_mib": limit,
                "params_per_member": ctx.sizes.params_per_member(),
                "how": "psutil (or /proc) on each member's pid from the progress callback's placement: RSS every 0.5 s, USS/PSS every 4 s",
                "psutil": _has_psutil(),
            },
        )
    ]


def _has_psutil() -> bool:
    try:
        importlib.import_module("psutil")
        return True
    except ImportError:
        return False
