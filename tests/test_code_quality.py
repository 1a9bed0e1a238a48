"""The habits of a maintained project, checked like any other guarantee: ruff finds nothing and
would reformat nothing, and mypy finds nothing in the package. Their settings are in
pyproject.toml; .pre-commit-config.yaml runs the same before a commit."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import REPO, started


def _tool(*args: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` in the repository: the versions the `test` extra installs."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    result = _tool("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_would_change_nothing():
    result = _tool("ruff", "format", "--check", "--no-cache", ".")
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout}{result.stderr}"


class Mypy:
    """mypy on the package in a process of its own, with a cache of its own (cold: about 13 s of
    CPU, most of it reading torch's types; Ray's and MLflow's are skipped, see pyproject.toml)."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="poptrain-mypy-"))
        self.output = self.folder / "output.txt"
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mypy", "--cache-dir", str(self.folder / "cache")], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
            )

    def result(self) -> tuple[int, str]:
        try:
            returncode = self.process.wait(timeout=600)
            return returncode, self.output.read_text()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def start_mypy() -> Mypy:
    """Started by tests/conftest.py as the session starts when the test is selected, so that it
    runs beside the suite instead of after it."""
    return Mypy()


def test_mypy_finds_nothing_in_the_package(request):
    returncode, output = started(request, start_mypy).result()
    assert returncode == 0, output
