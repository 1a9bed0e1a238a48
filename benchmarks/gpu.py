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
* ``stacked_vs_torch_func``: 100 and 1,000 seed-000 members (``configs/thousand.yaml``'s member,
  ``members_per_host: auto``: one host per GPU, stacked) against a hand-written torch.func loop over
  the same modules on that GPU (``benchmarks.packing.torch_func_yardstick``), member-steps/s.

``--dry-run`` runs the same code on the CPU at tiny sizes (2 and 4 members, a few steps, no
pytest, no ``nvidia-smi``), says that it found no GPU, and exits 0: it keeps the plumbing from
rotting between GPU loans (``tests/test_gpu_check.py``). Without ``--dry-run`` and without a GPU it
measures nothing and exits 2.
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
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, SIZES, Context, machine, now_utc, row, start_ray, unavailable

QUICK_START = REPO / "configs" / "prelu_separation.yaml"


@dataclasses.dataclass(frozen=True)
class GpuSizes:
    quick_start_steps: int
    stacked_members: tuple[int, ...]
    stacked_steps: int
    stacked_warmup: int
    run_tests: bool


GPU = GpuSizes(quick_start_steps=300, stacked_members=(100, 1000), stacked_steps=120, stacked_warmup=40, run_tests=True)
DRY_RUN = GpuSizes(quick_start_steps=4, stacked_members=(4,), stacked_steps=12, stacked_warmup=2, run_tests=False)


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
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "tests/test_gpu.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {word: int(n) for n, word in (part.split()[:2] for part in summary.strip("= ").split(" in ")[0].split(", ") if part[:1].isdigit())}
    return {"returncode": done.returncode, "summary": summary, "counts": counts, "tail": done.stdout[-4000:]}


def quick_start(ctx: Context, steps: int, keep_warm_s: float) -> Any:
    """``configs/prelu_separation.yaml`` into this check's scratch folder and MLflow store."""
    import poptrain

    overrides = [f"steps={steps}", f"output_dir={ctx.workdir / 'runs'}", f"tracking.uri={ctx.uri}", "tracking.experiment=gpu-check",
                 "tracking.plots=false", "tracking.log_models=false"]
    return poptrain.run(str(QUICK_START), overrides, keep_warm_s=keep_warm_s)


def check(out: Path, dry_run: bool) -> int:
    import torch

    found = torch.cuda.is_available()
    if not found and not dry_run:
        print("poptrain GPU check: torch sees no CUDA device here; nothing measured. `--gpu --dry-run` exercises the check on the CPU.", file=sys.stderr)
        return 2
    sizes = DRY_RUN if dry_run else GPU
    device = "cuda" if found and not dry_run else "cpu"
    print(f"poptrain GPU check ({'dry run on the CPU' if dry_run else 'on ' + torch.cuda.get_device_name(0)}): "
          f"{'found no GPU' if not found else f'found {torch.cuda.device_count()} GPU(s)'}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="poptrain-gpu-check-"))
    packing_sizes = dataclasses.replace(SIZES["smoke"], packing_steps=sizes.stacked_steps, packing_warmup=sizes.stacked_warmup)
    ctx = Context(sizes=packing_sizes, workdir=workdir, uri=f"sqlite:///{workdir / 'mlflow.db'}")
    report: dict[str, Any] = {"date": now_utc(), "mode": "gpu-dry-run" if dry_run else "gpu", "gpu_found": found, "rows": []}
    rows = report["rows"]
    started = time.perf_counter()
    started_ray = False
    try:
        if sizes.run_tests:
            tests = gpu_tests()
            ran = sum(tests["counts"].values())
            rows.append(row("gpu_tests", "gpu-marked tests passed / run", value=tests["counts"].get("passed", 0), unit="tests", ratio=(tests["counts"].get("passed", 0) / ran) if ran else None,
                            target=(">=", 1.0), details=tests))
        else:
            rows.append(unavailable("gpu_tests", "gpu-marked tests passed / run", (">=", 1.0), "dry run: the gpu tests skip without CUDA"))

        started_ray = start_ray(gpus=not dry_run)
        memory = {"before": gpu_memory_mib()}
        first = quick_start(ctx, sizes.quick_start_steps, keep_warm_s=120)
        memory["parked"] = gpu_memory_mib()  # its processes wait, parked, for the next run
        devices = {name: info.get("device") for name, info in first.placement.items()}
        on_device = sum(1 for d in devices.values() if str(d).startswith(device))
        rows.append(row("quick_start", f"members on {device} (read back)", value=on_device, unit="members", ratio=on_device / len(devices), target=(">=", 1.0),
                        details={"devices": devices, "placement": first.placement, "seconds": first.seconds, "metrics": first.metrics}))
        second = quick_start(ctx, sizes.quick_start_steps, keep_warm_s=120)  # takes the parked processes over
        memory["after_handover"] = gpu_memory_mib()
        import poptrain

        poptrain.release_warm_members()
        memory["released"] = gpu_memory_mib()
        took_over = {p["pid"] for p in first.placement.values()} == {p["pid"] for p in second.placement.values()}
        if memory["before"] is None:
            rows.append(unavailable("warm_handover", "GPU memory parked - before", ("<=", 1.0), f"no nvidia-smi here; the second run {'took over' if took_over else 'did not take over'} the warm processes"))
        else:
            parked = sum(memory["parked"]) - sum(memory["before"])
            rows.append(row("warm_handover", "GPU memory parked - before", value=parked, unit="MiB", ratio=None, target=None,
                            details={"memory_mib": memory, "took_over_warm_processes": took_over}))

        from benchmarks.packing import timed_population, torch_func_yardstick

        for members in sizes.stacked_members:
            measured = timed_population(ctx, f"gpu-stacked-{members}", members)
            loop = torch_func_yardstick(members, sizes.stacked_steps - sizes.stacked_warmup, sizes.stacked_warmup, device=device)
            value, base = measured["member_steps_per_s"], loop["member_steps_per_s"]
            rows.append(row("stacked_vs_torch_func", f"{members} members stacked on {measured['hosts']} host(s) vs a torch.func loop on {device}", value=value,
                            unit="member-steps/s", ratio=value / base, target=(">=", 0.8), baseline={"value": base, "unit": "member-steps/s"},
                            sizes=None if not dry_run else dataclasses.replace(packing_sizes, thresholds=False), details={"stacked": measured, "torch_func": loop}))
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
    return 0
