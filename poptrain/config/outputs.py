"""Where a run writes: its output folder's permissions, and the paths of a run submitted as a Ray job
(``ray job submit``), anchored where every node can reach them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from poptrain.config.errors import ConfigError
from poptrain.config.schema import RunConfig


def output_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Problems with the run's output folder ``<output_dir>/<name>/`` on this machine, before anything starts.

    Every file a run writes is inside that folder: the run name and member names are single
    path components (no `/`, no `..`), so no output can land outside it.
    """
    target = os.path.abspath(cfg.run_dir)
    existing = target
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [("output_dir", f"{existing} is not a directory, so the outputs cannot go to {target}")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [("output_dir", f"{existing} is not writable, so the outputs cannot go to {target}")]
    return []


# Inside a submitted Ray job the working directory is Ray's unpacked copy of `--working-dir`, a
# temporary folder that Ray deletes (and that a second node on the same machine unpacks again at
# the same path, deleting what the driver wrote there). Relative output paths resolve against a
# lasting folder instead.
HOME_ENV = "POPTRAIN_HOME"
DEFAULT_JOB_HOME = "~/poptrain-jobs"


def ray_job() -> dict[str, Any] | None:
    """The submitted Ray job this process is the entrypoint of (``submission_id``, ``working_dir``),
    from the environment Ray's job supervisor gives it; None outside a job."""
    text = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    runtime_env, metadata = data.get("runtime_env"), data.get("metadata")
    runtime_env = runtime_env if isinstance(runtime_env, dict) else {}
    metadata = metadata if isinstance(metadata, dict) else {}
    return {"submission_id": metadata.get("job_submission_id"), "working_dir": runtime_env.get("working_dir")}


def job_home() -> Path | None:
    """Inside a submitted Ray job: the folder relative outputs and the default MLflow store resolve
    against (``$POPTRAIN_HOME``, else ``~/poptrain-jobs``), created if missing; None outside a job."""
    if ray_job() is None:
        return None
    home = Path(os.path.expanduser(os.environ.get(HOME_ENV) or DEFAULT_JOB_HOME)).resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError([("output_dir", f"inside a Ray job, relative outputs go to ${HOME_ENV} ({home}), which cannot be created: {exc}")]) from None
    return home


def anchor_outputs(cfg: RunConfig) -> Path | None:
    """Inside a submitted Ray job, make a relative ``output_dir`` absolute under :func:`job_home`
    (so that it outlives the job's temporary working directory) and return that folder, against
    which relative tracking paths resolve too; None (nothing changed) outside a job."""
    home = job_home()
    if home is not None and not Path(cfg.output_dir).is_absolute():
        cfg.output_dir = str(home / cfg.output_dir)
    return home


def job_artifact_root(tracking_uri: str) -> str | None:
    """Inside a submitted Ray job with a local MLflow store: where the artifacts of experiments it
    creates go (``<job home>/mlruns``). MLflow's default, ``./mlruns``, would be in the job's
    temporary working directory. None elsewhere (a server keeps its own artifact root)."""
    home = job_home()
    local = tracking_uri.startswith("sqlite:") or "://" not in tracking_uri
    return str(home / "mlruns") if home is not None and local else None


def job_storage_problems(cfg: RunConfig, tracking_uri: str) -> list[tuple[str, str]]:
    """Inside a Ray job with a ``working_dir``: outputs or a local MLflow store given by an absolute
    path inside the job's working directory, which would be deleted with it."""
    job = ray_job()
    if job is None or not job["working_dir"]:
        return []
    try:
        scratch = Path(os.getcwd()).resolve()
    except FileNotFoundError:  # already deleted under us
        return []
    local = tracking_uri[len("sqlite:///") :] if tracking_uri.startswith("sqlite:///") else None if "://" in tracking_uri else tracking_uri
    problems = []
    for key, path in (("output_dir", cfg.run_dir), ("tracking.uri", local)):
        if path is not None and Path(path).resolve().is_relative_to(scratch):
            problems.append(
                (
                    key,
                    f"{path} is inside the Ray job's working directory {scratch}, a temporary copy that Ray deletes: "
                    f"give a relative path (inside a job it resolves against ${HOME_ENV}, default {DEFAULT_JOB_HOME}) "
                    "or an absolute path outside it",
                )
            )
    return problems
