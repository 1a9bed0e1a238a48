"""Issue 22: ``poptrain run configs/thousand.yaml`` as a user runs it, against a torch.func loop's whole process.

* **poptrain**: a fresh ``python -m poptrain run configs/thousand.yaml output_dir=... tracking.uri=...``
  (and, in ``--smoke``, fewer members and steps) from the repository root. It starts its own local
  Ray, and every member keeps its own MLflow run, checkpoints and held-out evaluation, as the config
  says. Timed from just before the process starts until the summary's last line (``outputs in
  ...``) is printed; the process's exit is in ``details`` too.
* **torch.func**: a fresh ``python -m benchmarks.end_to_end --torch-func ...`` that imports torch,
  builds the same 1,000 modules (seed 000's MLP) and data, and runs the same steps with
  ``stack_module_state``, ``vmap(grad)``, one ``Adam(foreach=True)`` and the config's separation
  over all pairs every ``exchange.every`` steps (:func:`benchmarks.packing.torch_func_yardstick`),
  2 torch threads. Timed from just before the process starts until it has exited.

The loop runs before and after each poptrain run (loop, poptrain, loop, ...; ``--smoke``: only
after); the fastest of each counts, every repeat is in ``details``.
"""

from __future__ import annotations

import time

_PROCESS_START = time.time()  # the torch.func child reports its parts from here

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.common import REPO, Context, row, timed_process  # noqa: E402

FIGURE = "thousand_end_to_end"
THOUSAND = REPO / "configs" / "thousand.yaml"
TARGET = 3.0  # poptrain's process / the torch.func loop's process
SUMMARY_END = "outputs in "  # the last line `poptrain run` prints (cli.print_summary)


def task(ctx: Context) -> dict[str, Any]:
    """What both sides train, from ``configs/thousand.yaml`` with the sizes' members and steps."""
    import yaml

    config = yaml.safe_load(THOUSAND.read_text())
    (entry,) = config["members"]
    (coupling,) = config["couplings"]
    return {
        "members": ctx.sizes.e2e_members or int(entry["copies"]),
        "steps": ctx.sizes.e2e_steps or int(config["steps"]),
        "config_steps": int(config["steps"]),
        "intervals": {"checkpoint.every": int(config["checkpoint"]["every"]), "evaluation.every": int(config["evaluation"]["every"])},
        "member_entry": entry["name"],
        "model": entry["model"]["kwargs"],
        "data": entry["data"]["kwargs"],
        "batch": int(entry["data"]["batch_size"]),
        "lr": float(entry["optimizer"]["lr"]),
        "separation": {
            "param": coupling["param"],
            "margin": float(coupling["margin"]),
            "weight": float(coupling.get("weight", 1.0)),
            "every": int(config["exchange"]["every"]),
        },
    }


def poptrain_process(ctx: Context, work: dict[str, Any], index: int) -> dict[str, Any]:
    """One ``python -m poptrain run configs/thousand.yaml`` with only the output folder, the MLflow
    store and (when the sizes say so) the members and steps overridden."""
    output_dir = ctx.workdir / f"thousand-{index}"
    overrides = [f"output_dir={output_dir}", f"tracking.uri={ctx.uri}"]
    if ctx.sizes.e2e_members:
        overrides.append(f"members.{work['member_entry']}.copies={work['members']}")
    if ctx.sizes.e2e_steps:
        # A shorter run checkpoints and evaluates about as often for its length as the config's, at
        # exchange steps (checkpoints must fall on them): --smoke's 20 steps, every 10.
        overrides.append(f"steps={work['steps']}")
        exchange = work["separation"]["every"]
        overrides += [f"{key}={exchange * max(1, round(every * work['steps'] / work['config_steps'] / exchange))}" for key, every in work["intervals"].items()]
    argv = [sys.executable, "-m", "poptrain", "run", str(THOUSAND.relative_to(REPO)), *overrides]
    timed = timed_process(argv, ctx.workdir / f"thousand-{index}.log", marker=SUMMARY_END)
    if timed["marker_s"] is None:
        raise RuntimeError(f"`poptrain run` printed no summary line starting {SUMMARY_END!r}:\n{timed['output_tail']}")
    # What the run kept per member (after the clock): checkpoint folders and the members' MLflow runs with a held-out metric.
    run_dirs = [p for p in output_dir.iterdir() if p.is_dir()]
    checkpointed = sum(1 for d in run_dirs for p in (d / "checkpoints").glob("*") if p.is_dir() and any(p.glob("step-*.pt")))
    run_id = next((line.split()[2] for line in timed["output_tail"].splitlines() if line.startswith("MLflow run ")), None)
    evaluated = None
    if run_id:
        from mlflow.tracking import MlflowClient

        from poptrain.tracking.compare import population_runs

        _, members = population_runs(MlflowClient(tracking_uri=ctx.uri), run_id)
        evaluated = sum(1 for r in members.values() if any(k.startswith("eval/") for k in r.data.metrics))
    return {
        "command": " ".join(["python", *argv[1:]]),
        "summary_s": timed["marker_s"],
        "exit_s": timed["exit_s"],
        "run_id": run_id,
        "members_with_checkpoints": checkpointed,
        "members_with_held_out_metrics": evaluated,
        "log": timed["log"],
    }


def torch_func_process(ctx: Context, work: dict[str, Any], index: int) -> dict[str, Any]:
    """One ``python -m benchmarks.end_to_end --torch-func TASK OUT``: its whole process's wall time."""
    task_path, out_path = ctx.workdir / "thousand-task.json", ctx.workdir / f"torch-func-{index}.json"
    task_path.write_text(json.dumps(work))
    timed = timed_process(
        [sys.executable, "-m", "benchmarks.end_to_end", "--torch-func", str(task_path), str(out_path)], ctx.workdir / f"torch-func-{index}.log"
    )
    inside = json.loads(out_path.read_text())
    return {"exit_s": timed["exit_s"], **inside}


def child(task_path: str, out_path: str) -> None:
    """The torch.func side's process: the loop over the task's steps, no warm-up left out (the
    parent times the whole process); writes how long its parts took from the interpreter's start."""
    from benchmarks.packing import torch_func_yardstick

    work = json.loads(Path(task_path).read_text())
    loop = torch_func_yardstick(
        work["members"], work["steps"], 0, separation=work["separation"], data=work["data"], model=work["model"], lr=work["lr"], batch=work["batch"]
    )
    Path(out_path).write_text(json.dumps({"loop": loop, "process_s": time.time() - _PROCESS_START}))


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "max": max(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def thousand_end_to_end(ctx: Context) -> list[dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=ctx.uri).search_experiments()  # the sqlite store exists before any clock runs, as after a user's first run
    work = task(ctx)
    loops, runs = [torch_func_process(ctx, work, 0)] if ctx.sizes.e2e_loop_before else [], []
    for i in range(ctx.sizes.e2e_repeats):  # loop, poptrain, loop, poptrain, ..., loop (--smoke: no first loop)
        print(f"    poptrain run configs/thousand.yaml ({work['members']} members, {work['steps']} steps) ...", flush=True)
        runs.append(poptrain_process(ctx, work, i))
        loops.append(torch_func_process(ctx, work, i + 1))
    ours, theirs = min(r["summary_s"] for r in runs), min(r["exit_s"] for r in loops)
    return [
        row(
            FIGURE,
            f"`poptrain run configs/thousand.yaml`, {work['members']} members x {work['steps']} steps, command to summary",
            value=ours,
            unit="s",
            ratio=ours / theirs,
            target=("<=", TARGET),
            sizes=ctx.sizes,
            baseline={
                "value": theirs,
                "unit": "s",
                "what": "a Python process: import torch, build the same modules, the same steps with torch.func "
                f"and the separation every {work['separation']['every']} steps",
            },
            details={
                "task": work,
                "poptrain": runs,
                "torch_func": loops,
                "poptrain_summary_s_spread": _spread([r["summary_s"] for r in runs]),
                "torch_func_s_spread": _spread([r["exit_s"] for r in loops]),
            },
        )
    ]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--torch-func":
        child(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m benchmarks.end_to_end --torch-func TASK_JSON OUT_JSON")
