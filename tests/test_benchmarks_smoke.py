"""The benchmark suite's smoke pass: every figure runs at tiny sizes and reports a numeric ratio.

Benchmarks are not tests: no threshold is checked here (``--smoke`` judges nothing). This only
proves that ``python -m benchmarks`` still works end to end against the current poptrain, and
that its JSON has every figure. It runs in its own process with its own local Ray: four short
``poptrain.run`` calls (no coupling, sync coupling, averaging, population-based training), six
tiny ones of the averaging family against independent training (2 members, 10 steps), a
single-process loop, a few exchange rounds, a small Ray Tune PBT experiment, and one
``poptrain run configs/thousand.yaml`` of 20 members x 20 steps in a process of its own (its own
Ray) against a torch.func process, so one to a few minutes on 2 cores depending on other load
(2026-12-04, load average about 2: 42 s before that last figure, 60 s with it, of which it took
18 s; with the machine loaded 10-20 deep, 3-4.5 min).

A figure in ``benchmarks.NEEDS_BENCH_EXTRA`` may have no measured row only where the module it
needs does not import in this interpreter (the ``bench`` extra is not installed): then every row
of it must say so.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks import FIGURES, NEEDS_BENCH_EXTRA
from tests.conftest import REPO, InBackground, started


def imports(module: str, env: dict[str, str]) -> bool:
    """Whether ``module`` imports in a fresh interpreter with ``env`` (as in the benchmark's process)."""
    return subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, env=env, capture_output=True, timeout=120).returncode == 0


def smoke_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    return env


def smoke_pass(folder, uri):
    """``python -m benchmarks --smoke`` in a process of its own (its own Ray), writing into
    ``folder``: its exit code and output."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(folder / "results")],
        cwd=REPO,
        env=smoke_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    return done.returncode, done.stdout


def start_smoke_pass() -> InBackground:
    """:func:`smoke_pass`, started by tests/conftest.py as the session starts when this test is
    selected, so its minute of mostly waiting (its Ray, its fresh processes) runs beside the rest
    of the suite instead of after it."""
    return InBackground(smoke_pass, "poptrain-smoke-")


@pytest.mark.slow
def test_smoke_pass_writes_every_figure_with_a_numeric_ratio(request):
    work = started(request, start_smoke_pass)
    (returncode, stdout), tmp_path = work.result(), work.folder / "results"
    assert returncode == 0, f"output:\n{stdout[-8000:]}"

    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert "latest-smoke.json" in written and len(written) == 2, written
    report = json.loads((tmp_path / "latest-smoke.json").read_text())
    assert report["mode"] == "smoke"
    assert report["machine"]["cpu_count"] >= 1

    rows = report["rows"]
    assert not [r for r in rows if r.get("error")], [r["note"] for r in rows if r.get("error")]
    for figure in FIGURES:
        measured = [r for r in rows if r["figure"] == figure and r["available"]]
        if not measured and figure in NEEDS_BENCH_EXTRA and not imports(NEEDS_BENCH_EXTRA[figure], smoke_env()):
            own = [r for r in rows if r["figure"] == figure]
            assert own and all("pip install -e .[bench]" in r["note"] for r in own), own
            continue
        assert measured, f"figure {figure!r} has no measured row"
        for r in measured:
            assert isinstance(r["ratio"], (int, float)) and math.isfinite(r["ratio"]) and r["ratio"] > 0, r
            assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), r
            assert r["pass"] is None, "the smoke pass must not judge thresholds"
    for r in rows:
        if not r["available"]:
            assert r["note"].startswith("not available"), r

    # The table is printed, one line per row.
    assert "poptrain benchmarks (smoke" in stdout
    for figure in FIGURES:
        assert figure in stdout
    shutil.rmtree(work.folder, ignore_errors=True)
