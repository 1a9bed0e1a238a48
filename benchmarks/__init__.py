"""poptrain's benchmark suite (issue 7): every figure is a ratio against a baseline measured in the same run.

Run ``python -m benchmarks`` (default sizes, a few minutes on 2 CPU cores), ``--smoke`` (tiny
sizes, seconds, no thresholds), ``--full`` (larger), ``--only NAME`` (one figure), ``--out DIR``
(where the JSON goes; default ``benchmarks/results/``). ``benchmarks/README.md`` explains each
figure, its baseline, its method and its target, and holds the latest numbers.

Benchmarks are not tests: they report, they do not fail on a missed target (the exit code is 0
unless a benchmark itself crashed). CI runs only the smoke pass (``tests/test_benchmarks_smoke.py``).
"""

from __future__ import annotations

# Figure names, in the order they run and print (``--only`` takes one of these).
FIGURES = (
    "startup",
    "coupling_overhead",
    "vs_single_process",
    "memory",
    "exchange_latency",
    "averaging_bandwidth",
    "averaging_methods",
    "averaging_at_scale",
    "packed_vs_processes",
    "packed_throughput",
    "packing_memory",
    "startup_at_scale",
    "thousand_end_to_end",
    "pbt_vs_tune",
)

# Figures that need a package of the benchmark-only extra (`pip install -e .[bench]`), by the
# module they import. Where it does not import, such a figure reports its rows as not available
# and says how to install it.
NEEDS_BENCH_EXTRA = {"pbt_vs_tune": "ray.tune.schedulers"}
