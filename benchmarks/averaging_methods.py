"""The averaging family against independent training (issue 26, item 6): held-out quality, measured.

For each dataset (scikit-learn's digits, with the built-in data's fixed held-out 20%; the built-in
``synthetic_regression`` with its held-out 20%), each seed of ``methods_seeds`` and each way of
training (``independent``, plain ``average``, PAPA, WASH, DiLoCo, gossip), one ``poptrain.run`` of
the same ``methods_members`` members: one architecture, the same steps, batch, optimizer and
learning rate, each its own sample order (``data.seed``), initialised from the run's seed as
poptrain does (so a seed's runs start from the same weights whatever the method), packed on one
host and stacked. Only the coupling (and its exchange period) differs. ``independent`` has no
coupling: it is the baseline, measured in the same benchmark run. Each method's knobs are its shipped
config's (``configs/papa.yaml``, ``wash.yaml``, ``diloco.yaml``, ``gossip.yaml``: the coupling that
rewrites the members and ``exchange.every``); plain ``average`` is PAPA's coupling and period with
``rate: 1`` (every member replaced by the mean every 10 steps: local SGD).

Three models per run, each on the same held-out samples, read back from the run: the **best
member** (``RunResult.best_member``, ranked by the reported metric at the end, and its
``eval/<metric>``), the **averaged model** (``evaluation.population_average: true``: the mean of
the members' final weights, ``population_average/<metric>``) and the **ensemble**
(``evaluation.ensemble``: the mean of the members' predicted probabilities, or outputs for
regression, ``ensemble/<metric>`` on the parent run).

A row is (dataset, method, model): the mean over seeds, its baseline independent training's same
model, and their ratio (accuracy: higher is better; mse: lower is better). No target: the issue
asks for the numbers, not a bound. ``details`` has every seed's values, the spread, the per-seed
differences against independent training and against plain ``average``, every member's metric and
the knobs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import yaml

from benchmarks.common import REPO, Context, quiet_tracking, row

FIGURE = "averaging_methods"
CONFIGS = REPO / "configs"

# Each dataset: the member every method trains, the held-out metric reported and whether higher is better.
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {
        "model": {"name": "encoder_classifier", "kwargs": {"in_features": 64, "num_classes": 10, "num_nodes": 64}},
        "data": {"name": "digits", "kwargs": {"view": "full", "split": "train"}},
        "loss": "cross_entropy",
        "metric": "accuracy",
        "higher_is_better": True,
    },
    "regression": {
        "model": {"name": "mlp", "kwargs": {"in_features": 20, "out_features": 1, "hidden": [64]}},
        "data": {"name": "synthetic_regression", "kwargs": {"n": 1024, "in_features": 20, "seed": 0, "split": "train"}},
        "loss": "mse",
        "metric": "mse",
        "higher_is_better": False,
    },
}

# Method -> (its shipped config, the coupling type in it, changes to that coupling's knobs).
METHODS: dict[str, tuple[str, str, dict[str, Any]] | None] = {
    "independent": None,
    "average": ("papa.yaml", "average", {"rate": 1.0}),
    "papa": ("papa.yaml", "average", {}),
    "wash": ("wash.yaml", "wash", {}),
    "diloco": ("diloco.yaml", "diloco", {}),
    "gossip": ("gossip.yaml", "gossip", {}),
}
LABELS = {"independent": "independent", "average": "plain average (rate 1)", "papa": "PAPA", "wash": "WASH", "diloco": "DiLoCo", "gossip": "gossip"}
MODELS = {"best": "best member", "averaged": "averaged model", "ensemble": "ensemble"}


def method_knobs(method: str) -> tuple[int, dict[str, Any] | None]:
    """(``exchange.every``, the coupling) of ``method``, from its shipped config: the coupling of
    its type that rewrites the members (not one ``into`` a target), without its member list (the
    benchmark's members are all of them)."""
    spec = METHODS[method]
    if spec is None:
        return 1, None
    file, kind, changes = spec
    config = yaml.safe_load((CONFIGS / file).read_text())
    (coupling,) = [c for c in config["couplings"] if c["type"] == kind and "into" not in c]
    coupling = {k: v for k, v in coupling.items() if k not in ("members", "name")}
    return int(config.get("exchange", {}).get("every", 1)), {**coupling, **changes, "name": method}


def method_config(ctx: Context, dataset: str, method: str, seed: int) -> dict[str, Any]:
    sizes, spec = ctx.sizes, DATASETS[dataset]
    members = sizes.methods_members
    every, coupling = method_knobs(method)
    member = {
        "name": "m",
        "copies": members,
        "vary": {"data.seed": [1000 * seed + i for i in range(members)]},  # each member its own sample order, per seed
        "model": spec["model"],
        "data": {**spec["data"], "batch_size": sizes.methods_batch},
        "loss": spec["loss"],
        "optimizer": {"name": "adam", "lr": 1e-3},
    }
    return {
        "name": f"bench-{dataset}-{method}-s{seed}",
        "seed": seed,
        "steps": sizes.methods_steps,
        "output_dir": str(ctx.workdir / "runs"),
        "exchange": {"every": every},
        # At the end only; the averaged model for independent training too (the mean of unrelated weights).
        "evaluation": {"every": 0, "metrics": [spec["metric"]], "population_average": True},
        "tracking": {**quiet_tracking(ctx.uri, "benchmarks-averaging-methods"), "log_every": 50},
        "checkpoint": {"every": 0},
        "placement": {"members_per_host": members},  # one host, the members stacked: cheap on 2 cores
        "members": [member],
        "couplings": [coupling] if coupling else [],
    }


def measure(ctx: Context, dataset: str, method: str, seed: int) -> dict[str, Any]:
    """One run: the best member's, the averaged model's and the ensemble's held-out metric."""
    from mlflow.tracking import MlflowClient

    import poptrain

    metric = DATASETS[dataset]["metric"]
    started = time.perf_counter()
    result = poptrain.run(method_config(ctx, dataset, method, seed))  # warm processes taken over from the run before
    parent = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id).data.metrics
    members = {name: m[f"eval/{metric}"] for name, m in result.metrics.items()}
    return {
        "best": members[result.best_member],
        "averaged": result.population_average[f"population_average/{metric}"],
        "ensemble": parent[f"ensemble/{metric}"],
        "best_member": result.best_member,
        "members": members,
        "wall_s": time.perf_counter() - started,
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def averaging_methods(ctx: Context) -> list[dict[str, Any]]:
    from poptrain.driver.pool import release_warm_members

    sizes = ctx.sizes
    results: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    try:
        for seed in sizes.methods_seeds:  # seed by seed, so a drift of the machine touches every method alike
            for dataset in sizes.methods_datasets:
                for method in METHODS:
                    results.setdefault((dataset, method), {})[seed] = measure(ctx, dataset, method, seed)
    finally:
        release_warm_members()  # the next figure starts from no parked processes
    budget = {
        "members": sizes.methods_members,
        "steps": sizes.methods_steps,
        "batch": sizes.methods_batch,
        "optimizer": "adam, lr 1e-3",
        "seeds": list(sizes.methods_seeds),
        "placement": "one host, stacked",
    }
    rows = []
    for dataset in sizes.methods_datasets:
        metric, higher = DATASETS[dataset]["metric"], DATASETS[dataset]["higher_is_better"]
        independent, plain = results[(dataset, "independent")], results[(dataset, "average")]
        for method in METHODS:
            if method == "independent":
                continue
            runs = results[(dataset, method)]
            every, coupling = method_knobs(method)
            for model, label in MODELS.items():
                values = {s: r[model] for s, r in runs.items()}
                base = {s: r[model] for s, r in independent.items()}
                measured, baseline = spread(list(values.values())), spread(list(base.values()))
                details = {
                    "per_seed": values,
                    "spread": measured,
                    "independent_per_seed": base,
                    "independent_spread": baseline,
                    "minus_independent_per_seed": {s: values[s] - base[s] for s in values},
                    "higher_is_better": higher,
                    "knobs": {"exchange_every": every, "coupling": coupling},
                    "budget": budget,
                    "members_per_seed": {s: r["members"] for s, r in runs.items()},
                    "best_member_per_seed": {s: r["best_member"] for s, r in runs.items()},
                    "independent_members_per_seed": {s: r["members"] for s, r in independent.items()},
                    "run_wall_s": {s: r["wall_s"] for s, r in runs.items()},
                }
                if method != "average":
                    details["minus_plain_average_per_seed"] = {s: values[s] - plain[s][model] for s in values}
                rows.append(
                    row(
                        FIGURE,
                        f"{dataset}: {LABELS[method]}, {label}, held-out {metric} ({'higher' if higher else 'lower'} is better)",
                        value=measured["mean"],
                        unit=metric,
                        ratio=measured["mean"] / baseline["mean"],
                        target=None,
                        sizes=sizes,
                        baseline={
                            "name": f"independent training, same members, steps and optimizer, no coupling: {label}",
                            "value": baseline["mean"],
                            "unit": metric,
                        },
                        details=details,
                    )
                )
    return rows


SCALE_FIGURE = "averaging_at_scale"


def scale_config(ctx: Context, method: str) -> dict[str, Any]:
    """``configs/thousand.yaml`` (seed 000's members, packed and stacked on one host per core) with
    ``method``'s coupling and exchange period from its shipped config instead of the separation, at
    ``scale_members`` members and ``scale_steps`` steps, each member its own sample order; the
    parent logs each round's distances."""
    sizes = ctx.sizes
    config = yaml.safe_load((CONFIGS / "thousand.yaml").read_text())
    every, coupling = method_knobs(method)
    (member,) = config["members"]
    return {
        **config,
        "name": f"bench-scale-{method}",
        "steps": sizes.scale_steps,
        "output_dir": str(ctx.workdir / "runs"),
        "exchange": {"every": every},
        "tracking": {**config["tracking"], **quiet_tracking(ctx.uri, "benchmarks-averaging-at-scale")},
        "checkpoint": {"every": 0},
        "evaluation": {"every": 0, "metrics": ["mse"]},
        # Each member its own sample order, as averaging_methods: with one shared stream the members
        # of a method that restarts them from one model (DiLoCo) stay identical, and there is nothing to average.
        "members": [{**member, "copies": sizes.scale_members, "vary": {"data.seed": list(range(sizes.scale_members))}}],
        "couplings": [coupling] if coupling else [],
    }


def averaging_at_scale(ctx: Context) -> list[dict[str, Any]]:
    """Each method at ``scale_members`` stacked members (issue 26, item 4): the steady rate of one
    member's steps against the same population trained independently (no coupling) in the same
    benchmark run, how many members each trained stacked with, and the rounds the parent logged."""
    from mlflow.tracking import MlflowClient

    import poptrain
    from benchmarks.common import metric_times, steady_rate
    from poptrain.driver.pool import release_warm_members

    sizes, measured = ctx.sizes, {}
    try:
        # Independent training before and after the methods: the machine's drift shows as their spread.
        for run, method in enumerate(("independent", *sizes.scale_methods, *(("independent",) if sizes.scale_bracket else ()))):
            config = scale_config(ctx, method)
            print(f"    {method}: {sizes.scale_members} members x {sizes.scale_steps} steps ...", flush=True)
            started = time.perf_counter()
            # Fresh processes for each run (its wall time a user's), but for --smoke, which only
            # keeps the figure from rotting: it takes over the warm ones of the run before.
            result = poptrain.run(config, **({} if sizes.mode == "smoke" else {"keep_warm_s": 0}))
            wall = time.perf_counter() - started
            client = MlflowClient(tracking_uri=result.tracking_uri)
            timed = sorted(result.member_run_ids)[0]
            # The rounds' spread of distances to the mean, before and after each (none without a coupling).
            spreads = (
                {
                    f"{side}/{stat}": [(m.step, m.value) for m in client.get_metric_history(result.run_id, f"coupling/{method}/distance/{side}/{stat}")]
                    for side in ("before", "after")
                    for stat in ("min", "median", "max")
                }
                if method != "independent"
                else {}
            )
            measured[method if run <= len(sizes.scale_methods) else "independent after"] = {
                "wall_s": wall,
                "rate": steady_rate(metric_times(result.tracking_uri, result.member_run_ids[timed]), sizes.scale_warmup),
                "stacked_with": sorted({p.get("stacked_with", 1) for p in result.placement.values()}),
                "hosts": len({p.get("pid") for p in result.placement.values()}),
                "logged_rounds": len(spreads.get("after/median", [])),
                "distance_to_mean": spreads,
                "knobs": {"exchange_every": config["exchange"]["every"], "couplings": config["couplings"]},
            }
    finally:
        release_warm_members()
    independent = [measured[k]["rate"]["steps_per_s"] for k in ("independent", "independent after") if k in measured]
    base = statistics.fmean(independent)
    rows = []
    for method in sizes.scale_methods:
        mine = measured[method]
        rate = mine["rate"]["steps_per_s"]
        rows.append(
            row(
                SCALE_FIGURE,
                f"{LABELS[method]} at {sizes.scale_members} members (stacked {mine['stacked_with']}), {sizes.scale_steps} steps: steady member-steps/s",
                value=rate * sizes.scale_members,
                unit="member-steps/s",
                ratio=rate / base,
                target=None,
                sizes=sizes,
                baseline={
                    "name": "the same population trained independently (no coupling), before and after the methods, mean",
                    "value": base * sizes.scale_members,
                    "unit": "member-steps/s",
                },
                details={
                    **mine,
                    "independent": measured["independent"],
                    "independent_after": measured.get("independent after"),
                    "independent_member_steps_per_s": [r * sizes.scale_members for r in independent],
                },
            )
        )
    return rows
