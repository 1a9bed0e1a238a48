"""Issue 15's figures: many small members packed into a few host processes.

The population is seed 000's member (Linear 20 -> 40, PReLU, Linear 40 -> 1, batch 64, Adam) with
``configs/thousand.yaml``'s separation coupling (PReLU slopes, margin 0.01, weight 0.01) over all
pairs, exchanging every 10 steps. Rates are member-steps per second, read
from the step times members log to MLflow (:func:`benchmarks.common.steady_rate`, steps 50 to 159:
the checkpoint at step 100 is in them, as in a run) and summed over members; memory is the
resident memory of the host processes, sampled while they train.

* ``packed_vs_processes``: ``packing_small`` members packed (``members_per_host: auto``: one host
  per core) against the same members one per host (one process each).
* ``packed_throughput``: ``packing_large`` members packed against the torch.func yardstick in this
  process: the same modules stacked (``stack_module_state``), ``vmap(grad)`` of their loss, one
  ``Adam(foreach=True)`` over the stacked tensors, 2 torch threads; once with poptrain's separation
  term (each member's slope live against the others' exchanged every 10 steps, at every step: the
  coupled row, issue 22's target) and once with no coupling. Both sides are repeated alike, the
  poptrain run twice and each yardstick three times, interleaved, and the best of each counts.
* ``packing_memory``: (RSS of the hosts with ``packing_large`` members - with 2) / (the difference
  in members), minus each member's parameters, gradients and Adam state.
* ``startup_at_scale``: from the API call to every member's first step, ``packing_large`` members
  against 2 (Ray already up in both).
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from typing import Any

from benchmarks.common import REPO, Context, metric_times, process_memory, quiet_tracking, row, steady_rate

SEED_MODEL = {"name": "mlp", "kwargs": {"in_features": 20, "out_features": 1, "hidden": 40, "activation": "prelu"}}
BATCH = 64
THOUSAND = REPO / "configs" / "thousand.yaml"
EXCHANGE_EVERY = 10


@functools.lru_cache(maxsize=1)
def thousand_separation() -> dict[str, Any]:
    """``configs/thousand.yaml``'s separation coupling (param, margin, weight): the packed runs and
    the coupled torch.func yardstick both use it."""
    import yaml

    (coupling,) = [c for c in yaml.safe_load(THOUSAND.read_text())["couplings"] if c["type"] == "separation"]
    return {"type": "separation", "param": coupling["param"], "margin": float(coupling["margin"]), "weight": float(coupling.get("weight", 1.0))}


def population(ctx: Context, name: str, members: int, per_host: int | str = "auto") -> dict[str, Any]:
    """``members`` seed-000 members kept apart over all pairs, exchanging every 10 steps."""
    member = {
        "model": SEED_MODEL,
        "data": {"name": "synthetic_regression", "kwargs": {"n": 1024, "in_features": 20}, "batch_size": BATCH},
        "loss": "mse",
        "optimizer": {"name": "adam", "lr": 0.01},
    }
    return {
        "name": name,
        "seed": 0,
        "steps": ctx.sizes.packing_steps,
        "output_dir": str(ctx.workdir / "runs"),
        "exchange": {"every": EXCHANGE_EVERY},
        # Checkpoints and layer norms as a user would leave them; metrics every 5 steps: a rate needs step times.
        "tracking": {**quiet_tracking(ctx.uri, "benchmarks-packing"), "log_every": 5},
        "placement": {"members_per_host": per_host},
        "members": [{"name": f"m{i:04d}", **member} for i in range(members)],
        "couplings": [dict(thousand_separation())],
    }


class HostMemory:
    """A ``progress=`` callback: the peak RSS of each distinct host process (MiB)."""

    def __init__(self):
        self.peak: dict[int, float] = {}

    def __call__(self, snapshot: dict[str, Any]) -> None:
        for pid in {info["pid"] for info in (snapshot.get("placement") or {}).values() if info.get("pid")}:
            mem = process_memory(int(pid), full=False)
            if mem:
                self.peak[pid] = max(self.peak.get(pid, 0.0), mem["rss_mib"])


def timed_population(ctx: Context, name: str, members: int, per_host: int | str = "auto") -> dict[str, Any]:
    """One ``poptrain.run``: member-steps/s after the warm-up, time to every member's first step, host memory."""
    import poptrain

    config = population(ctx, name, members, per_host)
    memory = HostMemory()
    called = time.time()
    result = poptrain.run(config, progress=memory, keep_warm_s=0)
    rates, first_steps, medians = [], [], []
    for run_id in result.member_run_ids.values():
        points = metric_times(result.tracking_uri, run_id)
        steady = steady_rate(points, ctx.sizes.packing_warmup)
        rates.append(steady["steps_per_s"])
        medians.append(steady["step_ms_median"])
        first_steps.append(points[0][1])
    step_ms = statistics.median(medians)
    return {
        "members": members,
        "hosts": len({p["pid"] for p in result.placement.values()}),
        "member_steps_per_s": sum(rates),
        # The window's rate counts the checkpoint (and layer norms) due in it, as a run pays them;
        # at the median step's time, the rate of training alone between them.
        "step_ms_median": step_ms,
        "member_steps_per_s_at_median_step": members * 1000 / step_ms,
        "first_step_s": max(first_steps) - called,
        "hosts_rss_mib": sum(memory.peak.values()),
        "host_rss_mib": memory.peak,
        "run_seconds": result.seconds,
    }


def torch_func_yardstick(
    members: int,
    steps: int,
    warmup: int,
    threads: int = 2,
    device: str = "cpu",
    separation: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    lr: float = 0.01,
    batch: int = BATCH,
) -> dict[str, Any]:
    """The same modules stacked with torch.func, one ``vmap(grad)`` and one ``Adam(foreach=True)``
    per step, on ``device`` (the data there too): member-steps/s.

    ``separation`` (``param``, ``margin``, ``weight``, ``every``): what poptrain computes for a member
    whose peers' slopes come from an exchange every ``every`` steps: at every step, each member i's
    loss also has ``weight * sum over j != i of relu(margin - |a_i - s_j|)`` (L1 over ``param``'s
    elements), its own slope ``a_i`` live and the others' ``s_j`` as of the last ``every``-th step
    (step 0 included), the gradient with respect to ``a_i`` added to its own. Without it, no coupling.
    ``data``: ``synthetic_regression``'s arguments (default ``n=1024, in_features=20``);
    ``model``: the MLP's (default seed 000's). Builds modules and data with poptrain's built-in
    functions only (no config, no pydantic): a process that runs just this imports torch and them."""
    import torch
    from torch.func import functional_call, grad, stack_module_state, vmap

    from poptrain.builtins.data import synthetic_regression
    from poptrain.builtins.models import MLP

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        modules = [MLP(**(model or SEED_MODEL["kwargs"])) for _ in range(members)]
        params, buffers = stack_module_state([m.to(device) for m in modules])
        skeleton = copy.deepcopy(modules[0]).to("meta")
        x, y = (t.to(device) for t in synthetic_regression(**(data or {"n": 1024, "in_features": 20})).tensors)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)  # CUDA steps are asynchronous

        def loss(p, b, inputs, targets):
            return torch.nn.functional.mse_loss(functional_call(skeleton, (p, b), (inputs,)), targets)

        gradients = vmap(grad(loss), in_dims=(0, 0, None, None))
        optimizer = torch.optim.Adam(list(params.values()), lr=lr, foreach=True)
        if separation:
            key, margin, weight, every = separation["param"], separation["margin"], separation["weight"], separation["every"]
            # Every (member, other member) row: member i's slope live against j's exchanged one.
            rows = torch.arange(members, device=device).repeat_interleave(members - 1)
            others = torch.arange(members, device=device).repeat(members, 1)[~torch.eye(members, dtype=torch.bool, device=device)]
            exchanged = {}

            def separation_gradient(step: int) -> torch.Tensor:
                slopes = params[key].detach().reshape(members, -1)
                if step % every == 0:
                    exchanged["slopes"] = slopes.clone()
                live = slopes.clone().requires_grad_()
                penalty = weight * torch.relu(margin - (live[rows] - exchanged["slopes"][others]).abs().sum(-1)).sum()
                return torch.autograd.grad(penalty, live)[0].reshape(params[key].shape)

        started, coupled_steps = None, 0
        for step in range(warmup + steps):
            if step == warmup:
                sync()
                started = time.perf_counter()
            i = (step * batch) % (len(x) - batch)
            grads = gradients(params, buffers, x[i : i + batch], y[i : i + batch])
            if separation:
                grads[key] = grads[key] + separation_gradient(step)
                coupled_steps += step >= warmup
            for name, value in params.items():
                value.grad = grads[name]
            optimizer.step()
        sync()
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(before)
    return {
        "member_steps_per_s": members * steps / seconds,
        "step_ms": 1000 * seconds / steps,
        "threads": threads,
        "device": device,
        "separation": separation,
        "coupled_steps_timed": coupled_steps,
        "steps_timed": steps,
    }


def yardsticks(ctx: Context, rounds: int, coupled_first: bool) -> list[dict[str, Any]]:
    """``rounds`` pairs of torch.func yardstick runs over ``packing_large`` modules, coupled and uncoupled
    alternating (coupled first or second, so that runs before and after a poptrain run mirror each other)."""
    sizes = ctx.sizes
    separation = {**thousand_separation(), "every": EXCHANGE_EVERY}
    out = []
    for _ in range(rounds):
        for coupled in (True, False) if coupled_first else (False, True):
            result = torch_func_yardstick(
                sizes.packing_large, sizes.packing_steps - sizes.packing_warmup, sizes.packing_warmup, separation=separation if coupled else None
            )
            out.append({"coupled": coupled, **result})
    return out


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs, a yardstick's or poptrain's (other work on the machine only
    slows a run down), with every repeat's rate and their spread."""
    rates = [r["member_steps_per_s"] for r in runs]
    best = max(runs, key=lambda r: r["member_steps_per_s"])
    return {**best, "repeats": rates, "spread": {"min": min(rates), "max": max(rates), "stdev": statistics.stdev(rates) if len(rates) > 1 else 0.0}}


def _member_state_mib() -> float:
    """One seed-000 member's parameters, gradients and Adam's two moments (float32), in MiB."""
    params = 20 * 40 + 40 + 40 + 40 * 1 + 1
    return 4 * params * 4 / 2**20


def _runs(ctx: Context) -> dict[str, Any]:
    """Every run these figures need, interleaved with the yardstick, made once for all four."""
    if "packing" in ctx.shared:
        return ctx.shared["packing"]
    import os

    small, large = ctx.sizes.packing_small, ctx.sizes.packing_large
    # `auto` packs only beyond one member per core: a population that small is packed onto one host.
    packed = "auto" if small > (os.cpu_count() or 1) else small
    runs = {
        "small_packed": timed_population(ctx, "pack-small", small, per_host=packed),
        "small_processes": timed_population(ctx, "pack-small-alone", small, per_host=1),
    }
    # --smoke: its 2 members one per host are the 2-member run (each run costs starting its processes).
    runs["two"] = runs["small_processes"] if small == 2 else timed_population(ctx, "pack-two", 2)
    # The yardsticks bracket the large runs (coupled, uncoupled | run | uncoupled, coupled | run | coupled,
    # uncoupled); the best of each side counts, each side repeated alike (other work only slows a run down).
    # Memory and start-up at scale are the first large run's.
    loops = yardsticks(ctx, 1, coupled_first=True)
    runs["large_packed"] = runs["small_packed"] if large == small else timed_population(ctx, "pack-large", large)
    loops += yardsticks(ctx, 1, coupled_first=False)
    repeats = [runs["large_packed"]]
    if large != small:  # --smoke: one run (its large population is its small one)
        repeats.append(timed_population(ctx, "pack-large-again", large))
        loops += yardsticks(ctx, 1, coupled_first=True)
    runs["large_packed_best"] = best_of(repeats)
    runs["yardstick"] = best_of([r for r in loops if not r["coupled"]])
    runs["yardstick_coupled"] = best_of([r for r in loops if r["coupled"]])
    ctx.shared["packing"] = runs
    return runs


def _rate_row(ctx: Context, figure: str, name: str, measured: dict, baseline: dict, target: float, details: dict) -> dict[str, Any]:
    """A figure whose value and baseline are member-steps/s."""
    value, base = measured["member_steps_per_s"], baseline["member_steps_per_s"]
    return row(
        figure,
        name,
        value=value,
        unit="member-steps/s",
        ratio=value / base,
        target=(">=", target),
        baseline={"value": base, "unit": "member-steps/s"},
        sizes=ctx.sizes,
        details=details,
    )


def packed_vs_processes(ctx: Context) -> list[dict[str, Any]]:
    runs = _runs(ctx)
    packed, alone = runs["small_packed"], runs["small_processes"]
    return [
        _rate_row(
            ctx,
            "packed_vs_processes",
            f"{packed['members']} members on {packed['hosts']} hosts vs one process each",
            packed,
            alone,
            5.0,
            {"packed": packed, "one_per_process": alone},
        )
    ]


def packed_throughput(ctx: Context) -> list[dict[str, Any]]:
    """Two rows: against the torch.func loop with the same separation exchanged every 10 steps
    (target 1.0): both sides add each member's term at every step, its slope live against the
    others' from the last exchange, so both do the same work (:func:`torch_func_yardstick`); and
    against the loop with no coupling (target 0.8)."""
    runs = _runs(ctx)
    packed, coupled, uncoupled = runs["large_packed_best"], runs["yardstick_coupled"], runs["yardstick"]
    n = packed["members"]
    return [
        _rate_row(
            ctx,
            "packed_throughput",
            f"{n} members packed vs torch.func, both with separation every 10 steps",
            packed,
            coupled,
            1.0,
            {"packed": packed, "torch_func": coupled, "torch_func_uncoupled": uncoupled},
        ),
        _rate_row(
            ctx,
            "packed_throughput",
            f"{n} members packed, separation every 10 vs torch.func uncoupled",
            packed,
            uncoupled,
            0.8,
            {"packed": packed, "torch_func": uncoupled},
        ),
    ]


def packing_memory(ctx: Context) -> list[dict[str, Any]]:
    runs = _runs(ctx)
    large, two = runs["large_packed"], runs["two"]
    extra = (large["hosts_rss_mib"] - two["hosts_rss_mib"]) / (large["members"] - two["members"]) - _member_state_mib()
    name, note = f"memory per extra member ({large['members']} vs 2)", None
    if not ctx.sizes.thresholds and extra <= 0:  # --smoke: one extra member is within the processes' noise
        extra, name = large["hosts_rss_mib"] / large["members"], f"RSS per member, {large['members']} members"
        note = "--smoke: too few members for the difference to rise above the noise; the larger run's RSS per member instead"
    return [
        row(
            "packing_memory",
            name,
            value=extra,
            unit="MiB",
            ratio=extra / 2.0,
            target=("<=", 1.0),
            sizes=ctx.sizes,
            note=note,
            details={"large": large, "two": two, "member_state_mib": _member_state_mib(), "limit_mib": 2.0},
        )
    ]


def startup_at_scale(ctx: Context) -> list[dict[str, Any]]:
    runs = _runs(ctx)
    large, two = runs["large_packed"], runs["two"]
    return [
        row(
            "startup_at_scale",
            f"to the first step, {large['members']} members vs 2",
            value=large["first_step_s"],
            unit="s",
            ratio=large["first_step_s"] / two["first_step_s"],
            target=("<=", 2.0),
            baseline={"value": two["first_step_s"], "unit": "s"},
            sizes=ctx.sizes,
            details={"large": large, "two": two},
        )
    ]
