"""The exchange path: latency of one round of scalars, and the bandwidth of averaging large models.

**Exchange latency** drives poptrain's own :class:`poptrain.coordinator.actor.CoordinatorActor` (built
from a real config: N small PReLU members and seed 000's separation coupling, so every round
carries one scalar per member and the coordinator evaluates and logs the coupling as in a run)
with N tiny caller actors. Each caller does what a member's ``_exchange`` does, back to back:
``ray.get(coordinator.exchange.remote("param", step, name, {slope: array}))``. A round's time is
the time between two consecutive round completions seen by a caller (all callers are in lockstep
behind the barrier); the figure uses the median over rounds and callers. The baseline, in the
same run and from the same kind of caller actor, is one plain Ray actor method round trip
(``ray.get(actor.ping.remote())`` on a plain, non-async actor), median over calls. Coupling
metrics stay in the coordinator's outbox (no driver takes them here), so MLflow writes do not
compete for the cores.

**Averaging bandwidth** runs ``poptrain.run`` on a population of ``avg_sources`` source members
and one target, each an MLP of ``avg_params`` float32 parameters, with the ``average`` coupling
``into`` the target every step (every member ``trainable: false``, so a step is the exchange plus
a batch-of-one forward pass). Per round, the useful traffic is (sources + 1) x parameters x 4
bytes (every source read once, the target written once); bandwidth = those bytes x rounds per
second, the rounds timed like training steps (the target's ``loss`` timestamps in MLflow, after
``avg_warmup`` rounds). The baseline, in the same process tree and run, is a single-process
``torch`` copy (``dst.copy_(src)``) moving the same number of bytes (half read, half written),
best of five. Checkpoints are off for this run: see ``details.note``.

The same population without the target, with each method of the averaging family in place of
``average`` (issue 26: PAPA, WASH, DiLoCo, gossip; ``BANDWIDTH_METHODS``) rewriting the sources
themselves at every round, gives one more row each, against the same copy baseline. Each takes its
shipped config's knobs (``benchmarks.averaging_methods.method_knobs``) with a round at every
exchange (``every: 1``) and ``include_frozen`` (the members are not trained). Its useful traffic
is 2 x sources x parameters x 4 bytes a round: every member's parameters read once and written
once, whatever the method computes in between (DiLoCo also keeps the global weights and the outer
momentum; WASH changes only a ``fraction`` of the positions, but writes each parameter whole).
``--smoke`` leaves these runs out.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.averaging_methods import LABELS, method_knobs
from benchmarks.common import Context, CpuSampler, cpu_seconds, metric_times, quiet_tracking, row, steady_rate, unavailable

# --------------------------------------------------------------------------------------------
# Actors (plain classes, made remote where used, so importing this module needs no Ray)


class Pong:
    """A plain actor: the baseline's other end."""

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()


def _pid_of(actor) -> int | None:
    """The process id of any actor (``__ray_call__`` runs a function on it)."""
    import ray

    try:
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    except Exception:
        return None


class Caller:
    """A tiny stand-in for a member: only the exchange calls, nothing else."""

    def ready(self) -> int:
        return os.getpid()

    def ping_loop(self, target, calls: int, warmup: int) -> dict[str, Any]:
        """Times of ``calls`` plain round trips, and this process's CPU seconds over them."""
        import ray

        out = []
        for index in range(warmup + calls):
            if index == warmup:
                cpu = time.process_time()
            start = time.perf_counter()
            ray.get(target.ping.remote())
            if index >= warmup:
                out.append(time.perf_counter() - start)
        return {"times": out, "cpu_s": time.process_time() - cpu}

    def exchange_loop(self, coordinator, wire, name: str, key: str, rounds: int, warmup: int, value: float, method: str = "exchange") -> dict[str, Any]:
        """``warmup + rounds`` parameter rounds back to back: the times between consecutive round ends,
        and this process's CPU seconds over the timed rounds. ``method``: ``exchange`` (sync barrier)
        or ``publish`` (async mode). Values are packed and results unpacked with ``wire`` (the
        population's :class:`poptrain.coordinator.coordinator.Wire`), as a member does."""
        import ray

        from poptrain.couplings import Quantity
        from poptrain.exchange.channel import CoordinatorClient

        client = CoordinatorClient(coordinator, ray.get(coordinator.channel.remote()))  # as a member reaches it
        quantity = Quantity(name, "param", key)
        ends = []
        cpu = time.process_time()
        for step in range(warmup + rounds):
            if step == warmup:
                cpu = time.process_time()
            values = {quantity: np.array([value + 1e-3 * step], dtype=np.float32)}
            result = client.call(method, "param", step, (name,), wire.pack(values))()
            if isinstance(result, list):  # a large result comes as one shared reference, as members read it
                result = ray.get(result[0])
            wire.unpack_reply(result)
            ends.append(time.perf_counter())
        client.close()
        return {"times": [b - a for a, b in itertools.pairwise(ends[warmup:])], "cpu_s": time.process_time() - cpu}


def _latency_config(ctx: Context, members: int, steps: int, mode: str = "sync") -> dict[str, Any]:
    member = lambda i: {  # noqa: E731
        "name": f"m{i}",
        "model": {"name": "mlp", "kwargs": {"in_features": 4, "out_features": 1, "hidden": 4, "activation": "prelu"}},
        "data": {"name": "synthetic_regression", "kwargs": {"n": 8, "in_features": 4}, "batch_size": 4},
        "loss": "mse",
    }
    return {
        "name": f"bench-latency-{members}",
        "steps": steps,
        **({"exchange": {"mode": mode}} if mode != "sync" else {}),
        "output_dir": str(ctx.workdir / "runs"),
        "tracking": quiet_tracking(ctx.uri, "benchmarks"),
        "members": [member(i) for i in range(members)],
        "couplings": [{"type": "separation", "param": "activation.weight", "margin": 2.0}],
    }


def exchange_latency(ctx: Context) -> list[dict[str, Any]]:
    import ray

    import poptrain
    from poptrain.coordinator.actor import CoordinatorActor, start_coordinator
    from poptrain.couplings import build_couplings
    from poptrain.driver.checks import inspect_population
    from poptrain.exchange.wire import ExchangePlan, Wire

    sizes = ctx.sizes
    most = max(sizes.latency_members)
    remote = lambda cls: ray.remote(cls).options(num_cpus=0)  # noqa: E731
    callers = [remote(Caller).remote() for _ in range(most)]
    pong = remote(Pong).remote()
    actors = [*callers, pong]
    try:
        started = time.perf_counter()
        ray.get([c.ready.remote() for c in callers] + [pong.ping.remote()])
        actors_ready_s = time.perf_counter() - started
        pong_pid = ray.get(pong.pid.remote())

        ping_calls = max(sizes.latency_rounds, 50)
        has_async = hasattr(CoordinatorActor, "publish")
        rows = []
        for mode in [m for m in sizes.latency_modes if m == "sync" or has_async]:
            for n in sizes.latency_members:
                steps = sizes.latency_warmup + sizes.latency_rounds + 10
                cfg = poptrain.load_config(_latency_config(ctx, n, steps, mode))
                population = inspect_population(cfg)
                coordinator = start_coordinator(cfg, population)
                wire = Wire(ExchangePlan(build_couplings(cfg.couplings, population), population))
                actors.append(coordinator)
                ray.get(coordinator.ping.remote())
                coordinator_pid = _pid_of(coordinator)
                # Baseline right before and after the rounds, from the same kind of caller.
                pong_cpu0 = cpu_seconds(pong_pid) if pong_pid else None
                first = ray.get(callers[0].ping_loop.remote(pong, ping_calls, 20))
                pong_cpu = cpu_seconds(pong_pid) - pong_cpu0 if pong_cpu0 is not None else None
                method = "exchange" if mode == "sync" else "publish"
                coord_cpu0 = cpu_seconds(coordinator_pid) if coordinator_pid else None
                per_caller = ray.get(
                    [
                        callers[i].exchange_loop.remote(
                            coordinator, wire, f"m{i}", "activation.weight", sizes.latency_rounds, sizes.latency_warmup, float(i), method
                        )
                        for i in range(n)
                    ]
                )
                coord_cpu = cpu_seconds(coordinator_pid) - coord_cpu0 if coord_cpu0 is not None else None
                second = ray.get(callers[0].ping_loop.remote(pong, ping_calls, 20))
                ray.kill(coordinator)
                actors.remove(coordinator)
                pings = first["times"] + second["times"]
                rounds = [t for out in per_caller for t in out["times"]]
                timed_rounds = len(per_caller[0]["times"]) + 1
                cpu = {
                    # CPU milliseconds per round (per call for the baseline), by process; the coordinator's
                    # includes its warm-up rounds, which are few.
                    "coordinator_ms_per_round": 1000 * coord_cpu / (timed_rounds + sizes.latency_warmup) if coord_cpu is not None else None,
                    "callers_ms_per_round": 1000 * sum(out["cpu_s"] for out in per_caller) / timed_rounds,
                    "ping_caller_ms_per_call": 1000 * first["cpu_s"] / ping_calls,
                    "ping_callee_ms_per_call": 1000 * pong_cpu / (ping_calls + 20) if pong_cpu is not None else None,
                }
                round_ms, ping_ms = 1000 * statistics.median(rounds), 1000 * statistics.median(pings)
                mean_round_ms, mean_ping_ms = 1000 * statistics.fmean(rounds), 1000 * statistics.fmean(pings)
                target = None if mode == "async" else 2.0 if n <= 2 else 4.0 if n <= 8 else None
                complete_ms = complete_time_ms(cfg, population, n) if mode == "sync" else None
                name = (
                    f"N = {n} members, one round of scalars"
                    if mode == "sync"
                    else f"N = {n}, async publish (max_staleness {cfg.exchange.max_staleness}), per call"
                )
                rows.append(
                    row(
                        "exchange_latency",
                        name,
                        value=round_ms,
                        unit="ms",
                        ratio=round_ms / ping_ms,
                        target=("<=", target) if target else None,
                        baseline={"name": "one plain Ray actor method round trip (median)", "value": ping_ms, "unit": "ms"},
                        sizes=sizes,
                        details={
                            "mode": mode,
                            "coordinator_method": method,
                            "round_ms_median": round_ms,
                            "round_ms_mean": mean_round_ms,
                            "round_ms_p90": 1000 * _quantile(rounds, 0.9),
                            "ping_ms_median": ping_ms,
                            "ping_ms_mean": mean_ping_ms,
                            "ratio_of_means": mean_round_ms / mean_ping_ms,
                            "rounds_timed": len(rounds),
                            "pings_timed": len(pings),
                            "callers": n,
                            "coordinator_complete_ms_in_process": complete_ms,
                            "cpu": cpu,
                            "caller_actors_ready_s": actors_ready_s,
                        },
                    )
                )
        return rows
    finally:
        for actor in actors:
            ray.kill(actor)


def complete_time_ms(cfg, population, members: int, repeats: int = 200) -> float:
    """Median time of the coordinator's own work for one round of scalars (``CouplingEvaluator``'s
    ``complete_round`` and ``coupling_metrics``: merge, coupling value and metrics), in this process:
    the part of a round that is not transport."""
    from poptrain.coordinator.coordinator import CouplingEvaluator
    from poptrain.couplings import Quantity

    logic = CouplingEvaluator(cfg, population)
    times = []
    for step in range(repeats):
        values = {f"m{i}": {Quantity(f"m{i}", "param", "activation.weight"): np.array([i + 1e-3 * step], dtype=np.float32)} for i in range(members)}
        start = time.perf_counter()
        logic.complete_round("param", step, values)
        logic.coupling_metrics("param", step)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


# --------------------------------------------------------------------------------------------
# Averaging bandwidth


def _avg_model(params: int) -> tuple[dict[str, Any], int]:
    """A square lookup table (benchmarks.models.LookupTable) of about ``params`` parameters, and its exact count."""
    side = max(2, int(round(math.sqrt(params))))
    return {"name": "benchmarks.models:LookupTable", "kwargs": {"rows": side, "dim": side}}, side * side


def _avg_config(ctx: Context, model: dict[str, Any], steps: int, coupling: dict[str, Any] | None = None) -> dict[str, Any]:
    """``avg_sources`` untrained members of ``model`` averaged into a target every step; with
    ``coupling`` (one of the averaging family), that coupling rewriting the sources themselves
    instead, and no target (``include_frozen``: the members are not trained, their parameters frozen)."""
    sources = [f"s{i + 1}" for i in range(ctx.sizes.avg_sources)]
    member = lambda name: {  # noqa: E731
        "name": name,
        "model": model,
        "data": {"name": "benchmarks.models:row_indices", "kwargs": {"n": 4, "rows": model["kwargs"]["rows"]}, "batch_size": 1},
        "loss": "mse",
        "trainable": False,
    }
    return {
        "name": "bench-averaging",
        "steps": steps,
        "output_dir": str(ctx.workdir / "runs"),
        "tracking": quiet_tracking(ctx.uri, "benchmarks"),
        # Off: the coordinator keeps every round's result for 2 x checkpoint.every + 1 rounds (for
        # replay after a restart), which for 100 MB members pins tens of GB in memory.
        "checkpoint": {"every": 0},
        "members": [member(name) for name in (sources if coupling else [*sources, "target"])],
        "couplings": [
            {**coupling, "members": sources, "include_frozen": True}
            if coupling
            else {"type": "average", "name": "mean_into_target", "members": sources, "into": "target"}
        ],
    }


def copy_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, Any]:
    """Single-process torch copy moving ``nbytes`` (half read, half written): best of ``repeats``."""
    import torch

    floats = max(1, nbytes // 2 // 4)
    src = torch.rand(floats)
    dst = torch.empty_like(src)
    dst.copy_(src)  # page in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"gb_per_s": 2 * floats * 4 / best / 1e9, "seconds": best, "bytes": 2 * floats * 4, "threads": torch.get_num_threads()}


def torch_average(sources: int, params: int, repeats: int = 3) -> dict[str, Any]:
    """Single-process reference: average ``sources`` tensors into a preallocated target."""
    import torch

    tensors = [torch.rand(params) for _ in range(sources)]
    target = torch.empty(params)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.add(tensors[0], tensors[1], out=target)
        for t in tensors[2:]:
            target.add_(t)
        target.div_(sources)
        times.append(time.perf_counter() - start)
    best = min(times[1:])
    return {"gb_per_s": (sources + 1) * params * 4 / best / 1e9, "seconds": best}


def coordinator_breakdown(ctx: Context, cfg, population, useful: int) -> dict[str, Any]:
    """Where one averaging round's coordinator time goes, timed in this process (no Ray, no
    members): ``CouplingEvaluator.complete_round`` on parameters in mapped memory (poptrain's path on one
    node), with and without the coupling metrics (the divergences), and on copies (the path of a
    member on a GPU or another node, whose sends and replies also cross Ray's object store)."""
    import torch

    from poptrain.coordinator.coordinator import CouplingEvaluator
    from poptrain.couplings import Quantity

    sources = [m for m in cfg.member_names if m != "target"]
    shapes = population.param_shapes[sources[0]]
    tensors = {m: {n: torch.rand(*shape) for n, shape in shapes.items()} for m in cfg.member_names}
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    quiet = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"log_every": 10**9})})
    for label, run in (("with_metrics", cfg), ("without_metrics", quiet)):
        # The couplings learn from the population when metrics are logged (a round takes the distances before it then).
        logic = CouplingEvaluator(run, dataclasses.replace(population, log_every=run.tracking.log_every))
        for member, views in tensors.items():
            logic.attach(member, views)
        logic.complete_round("param", 0, {m: {} for m in cfg.member_names})  # warm
        _, out[f"shared_release_{label}_s"] = _time(logic.complete_round, "param", 1, {m: {} for m in cfg.member_names})
    arrays = {m: {Quantity(m, "param", n): t.numpy() for n, t in tensors[m].items()} for m in sources}
    copies = CouplingEvaluator(cfg, population)
    _, out["copies_complete_with_metrics_s"] = _time(lambda: (copies.complete_round("param", 0, arrays), copies.coupling_metrics("param", 0)))
    out["useful_bytes"] = useful
    return out


def _bandwidth_run(ctx: Context, config: dict[str, Any], log_every: int, timed_member: str, useful: int) -> dict[str, Any]:
    """One ``poptrain.run`` of an averaging population (:func:`_avg_config`), coupling metrics
    logged every ``log_every`` rounds: ``useful`` bytes a round over the seconds a round takes
    (``timed_member``'s logged steps after ``avg_warmup``), in GB/s, and where the cores went."""
    import poptrain

    sizes = ctx.sizes
    config["tracking"]["log_every"] = log_every
    cpu = CpuSampler()
    started = time.perf_counter()
    result = poptrain.run(config, progress=cpu, keep_warm_s=0)  # new processes each time, as a `poptrain run` has
    wall = time.perf_counter() - started
    rate = steady_rate(metric_times(result.tracking_uri, result.member_run_ids[timed_member]), sizes.avg_warmup)
    return {
        "gb_per_s": useful * rate["steps_per_s"] / 1e9,
        "useful_bytes_per_round": useful,
        "round_s": 1 / rate["steps_per_s"],
        "rate": rate,
        "run_wall_s": wall,
        "cores_busy": cpu.cores_busy(sizes.avg_warmup, config["steps"]),
        "shared_params": result.placement[timed_member].get("shared_params"),
    }


def _time(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


BANDWIDTH_METHODS = ("papa", "wash", "diloco", "gossip")  # issue 26: the averaging bandwidth of each method


def averaging_bandwidth(ctx: Context) -> list[dict[str, Any]]:
    import poptrain
    from poptrain.driver.checks import inspect_population

    sizes = ctx.sizes
    model, params = _avg_model(sizes.avg_params)
    steps = sizes.avg_warmup + sizes.avg_rounds
    useful = (sizes.avg_sources + 1) * params * 4

    baseline = copy_bandwidth(useful)
    reference = torch_average(sizes.avg_sources, params)
    runs = {}
    # The figure: coupling metrics (each source's distance to the mean: a second pass over every
    # member) every 10 rounds, as one would log them for 100 MB members; then every round. Rates
    # come from the logged steps, so from every 10th round in the first run.
    for log_every in (sizes.avg_log_every,) if sizes.mode == "smoke" else (sizes.avg_log_every, 1):
        runs[log_every] = _bandwidth_run(ctx, _avg_config(ctx, model, steps), log_every, "target", useful)
    # Each method of the averaging family rewriting the sources themselves at every round: each
    # member's parameters read once and written once, 2 x sources x parameters x 4 bytes a round.
    methods = {}
    for method in () if sizes.mode == "smoke" else BANDWIDTH_METHODS:  # smoke: each would be a run of new processes more
        coupling = {**method_knobs(method)[1], "every": 1}  # its shipped knobs, a round at every exchange
        useful_here = 2 * sizes.avg_sources * params * 4
        methods[method] = _bandwidth_run(ctx, _avg_config(ctx, model, steps, coupling), sizes.avg_log_every, "s1", useful_here)
        cfg = poptrain.load_config(_avg_config(ctx, model, steps, coupling))  # metrics every round: the breakdown times them
        methods[method].update(coupling=coupling, coordinator_breakdown=coordinator_breakdown(ctx, cfg, inspect_population(cfg), useful_here))

    cfg = poptrain.load_config(_avg_config(ctx, model, steps))
    breakdown = coordinator_breakdown(ctx, cfg, inspect_population(cfg), useful)
    after = copy_bandwidth(useful)
    base = max(baseline["gb_per_s"], after["gb_per_s"])
    common = {
        "useful_bytes_per_round": useful,
        "params_per_member": params,
        "copy_before": baseline,
        "copy_after": after,
        "single_process_torch_average": reference,
        "coordinator_breakdown": breakdown,
        "note": "checkpoint.every: 0 for this run (see the README: the coordinator's replay history would keep 2 x checkpoint.every + 1 copies of the target)",
    }
    baseline_row = {"name": "single-process torch copy of the same bytes (best of 5, before and after)", "value": base, "unit": "GB/s"}
    title = f"{sizes.avg_sources} members x {params / 1e6:.1f}M float32 averaged into a target"
    sparse = runs[sizes.avg_log_every]
    return [
        row(
            "averaging_bandwidth",
            f"{title}, divergence logged every {sizes.avg_log_every} rounds",
            value=sparse["gb_per_s"],
            unit="GB/s",
            ratio=sparse["gb_per_s"] / base,
            target=(">=", 0.3),
            baseline=baseline_row,
            sizes=sizes,
            details={**sparse, **common, "ratio_vs_torch_average": sparse["gb_per_s"] / reference["gb_per_s"]},
        ),
        row(
            "averaging_bandwidth",
            f"{title}, divergence logged every round",
            value=runs[1]["gb_per_s"],
            unit="GB/s",
            ratio=runs[1]["gb_per_s"] / base,
            target=None,
            baseline=baseline_row,
            sizes=sizes,
            details={**runs[1], "ratio_vs_torch_average": runs[1]["gb_per_s"] / reference["gb_per_s"]},
        )
        if 1 in runs
        else unavailable("averaging_bandwidth", f"{title}, divergence logged every round", None, "skipped with --smoke"),
    ] + [
        row(
            "averaging_bandwidth",
            f"{sizes.avg_sources} members x {params / 1e6:.1f}M float32, {LABELS[method]} into the members every round, "
            f"divergence logged every {sizes.avg_log_every} rounds",
            value=run["gb_per_s"],
            unit="GB/s",
            ratio=run["gb_per_s"] / base,
            target=(">=", 0.3),
            baseline=baseline_row,
            sizes=sizes,
            details=run,
        )
        if method in methods
        else unavailable("averaging_bandwidth", f"{LABELS[method]} into the members every round", (">=", 0.3), "skipped with --smoke")
        for method, run in ((m, methods.get(m)) for m in BANDWIDTH_METHODS)
    ]
