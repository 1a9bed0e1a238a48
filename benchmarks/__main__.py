"""``python -m benchmarks [--smoke | --full] [--only NAME] [--out DIR] [--keep]``: run the figures, print
the table, write the JSON (``<out>/<UTC time>-<mode>.json`` and ``<out>/latest-<mode>.json``).
``python -m benchmarks --gpu [--dry-run] [--out DIR]``: the prepared check on a CUDA machine
(``benchmarks/gpu.py``) instead of the figures."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import FIGURES

RESULTS = Path(__file__).resolve().parent / "results"


def _runner(name: str):
    if name == "startup":
        from benchmarks.startup import startup

        return startup
    if name in ("coupling_overhead", "vs_single_process", "memory"):
        from benchmarks import training

        return getattr(training, name)
    if name in ("packed_vs_processes", "packed_throughput", "packing_memory", "startup_at_scale"):
        from benchmarks import packing

        return getattr(packing, name)
    if name == "thousand_end_to_end":
        from benchmarks.end_to_end import thousand_end_to_end

        return thousand_end_to_end
    if name in ("averaging_methods", "averaging_at_scale"):
        from benchmarks import averaging_methods

        return getattr(averaging_methods, name)
    if name == "pbt_vs_tune":
        from benchmarks.pbt_tune import pbt_vs_tune

        return pbt_vs_tune
    from benchmarks import exchange

    return getattr(exchange, name)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds, no thresholds (what CI runs)")
    size.add_argument("--full", action="store_true", help="larger sizes and more repeats")
    parser.add_argument("--only", choices=FIGURES, action="append", metavar="NAME", help=f"run only this figure (repeatable): {', '.join(FIGURES)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (default: benchmarks/results)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (runs, MLflow store) and print its path")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="instead of the figures, the GPU check (benchmarks/gpu.py): gpu tests, the quick start "
        "on the GPU, warm handover memory, 2 members sharing the GPU vs one process, 100 and 1,000 stacked "
        "members vs a torch.func loop, host-device synchronisations per stacked step",
    )
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: the same check on the CPU at tiny sizes (no GPU needed)")
    args = parser.parse_args(argv)
    if args.dry_run and not args.gpu:
        parser.error("--dry-run goes with --gpu")
    if args.gpu and (args.smoke or args.full or args.only):
        parser.error("--gpu runs its own check: leave out --smoke, --full and --only")
    return args


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def table(rows: list[dict[str, Any]]) -> str:
    header = ["figure", "row", "measured", "baseline", "ratio", "target", "result"]
    lines = []
    for r in rows:
        base = r.get("baseline") or {}
        target = r.get("target")
        verdict = "ERROR" if r.get("error") else "n/a" if not r["available"] else {True: "meets", False: "MISSES", None: "-"}[r["pass"]]
        lines.append(
            [
                r["figure"],
                r["row"],
                _fmt(r["value"], r["unit"]) if r["available"] else (r.get("note") or "not available"),
                _fmt(base.get("value"), base.get("unit", "")) if base else "-",
                f"{r['ratio']:.3f}" if isinstance(r.get("ratio"), (int, float)) else "-",
                f"{target['op']} {target['value']:g}" if target else "-",
                verdict,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.gpu:
        from benchmarks.gpu import check

        return check(args.out, args.dry_run)
    from benchmarks.common import SIZES, Context, as_dict, crashed, machine, now_utc, start_ray

    mode = "smoke" if args.smoke else "full" if args.full else "default"
    sizes = SIZES[mode]
    selected = [f for f in FIGURES if not args.only or f in args.only]
    workdir = Path(tempfile.mkdtemp(prefix="poptrain-bench-"))
    ctx = Context(sizes=sizes, workdir=workdir, uri=f"sqlite:///{workdir / 'mlflow.db'}")
    ctx.shared["selected"] = selected
    report: dict[str, Any] = {"date": now_utc(), "mode": mode, "sizes": as_dict(sizes), "figures_run": selected, "rows": []}
    started = time.perf_counter()
    started_ray = False
    failed = False
    try:
        for name in selected:
            # Start-up runs first, in its own process, before this process starts Ray.
            if not started_ray and not (name == "startup" and sizes.startup_child):
                started_ray = start_ray()
            print(f"[{time.perf_counter() - started:6.1f} s] {name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                rows = _runner(name)(ctx)
            except Exception as exc:  # a broken benchmark is reported, and the others still run
                failed = True
                traceback.print_exc()
                rows = [crashed(name, exc)]
            for r in rows:
                r.setdefault("details", {})["benchmark_seconds"] = time.perf_counter() - t0
            report["rows"].extend(rows)
        report["machine"] = machine()
    finally:
        report["seconds"] = time.perf_counter() - started
        if started_ray:
            import ray

            ray.shutdown()
        if args.keep:
            print(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if "async" in ctx.shared:
        report["async_mode"] = {"available": ctx.shared["async"][0], "detail": ctx.shared["async"][1]}

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    text = json.dumps(report, indent=2, default=str)
    path = args.out / f"{stamp}-{mode}.json"
    path.write_text(text)
    (args.out / f"latest-{mode}.json").write_text(text)
    print()
    print(f"poptrain benchmarks ({mode}, {report['date']}, {report['seconds']:.0f} s)")
    print(table(report["rows"]))
    print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
