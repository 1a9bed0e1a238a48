"""Files that must survive faults: atomic writes, checksummed checkpoints, finding the latest complete one.

Layout under the run folder::

    config.yaml                         the resolved config
    run.json                            the MLflow run ids (resume continues into the same runs)
    checkpoints/<member>/step-000000100.pt       a member's full state at the start of step 100
    checkpoints/<member>/step-000000100.sha256   its checksum, written after it (absent: incomplete)
    checkpoints/_couplings/step-000000100.pt     the couplings' state for step 100 (and its .sha256)
    members/<member>/model.pt           final weights (a plain state_dict)

A checkpoint at step ``s`` is *complete* when every member has a valid file for ``s``. Files are
loaded with ``torch.load(..., weights_only=True)`` after their checksum matches, so a checkpoint
never unpickles arbitrary objects and a truncated or altered file is refused, never half-loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

STEP_FILE = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (missing, truncated, altered) or a run that cannot resume."""


def save_atomic(data: bytes | str | Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path`` (and fsync the
    folder): a reader sees the old file or the new one, never a partial one. Objects other than
    bytes/str are written with ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            if isinstance(data, str):
                stream.write(data.encode("utf-8"))
            elif isinstance(data, bytes):
                stream.write(data)
            else:
                torch.save(data, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic_many(items: Sequence[tuple[bytes | str, Path]]) -> None:
    """:func:`save_atomic` of every (data, path) in ``items``, made durable together: all written to
    temporary files, one sync, all renamed, one more sync. A host writing a thousand members'
    checkpoints then waits for the disk twice instead of four thousand times (a file and its
    folder per file); each file is still the old one or the new one, never a partial one."""
    if len(items) <= 1:
        for data, path in items:
            save_atomic(data, path)
        return
    written: list[tuple[str, Path]] = []
    try:
        for data, path in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            written.append((tmp, path))
            with os.fdopen(fd, "wb") as stream:
                stream.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.sync()  # every file's contents on disk before any rename makes one visible
        while written:
            tmp, path = written[0]
            os.replace(tmp, path)
            written.pop(0)
    except BaseException:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    os.sync()  # the renames


def member_dir(run_dir: Path, member: str) -> Path:
    return Path(run_dir) / "checkpoints" / member


def checkpoint_path(run_dir: Path, member: str, step: int) -> Path:
    return member_dir(run_dir, member) / f"step-{step:09d}.pt"


def save_checkpoint(state: dict, run_dir: Path, member: str, step: int, keep: int) -> Path:
    """Write one member's state for ``step`` (checksum last), then drop all but its ``keep`` newest."""
    return save_checkpoints([(member, state)], run_dir, step, keep)[member]


CHECKPOINT_BATCH_BYTES = 64 << 20  # written together up to this size: a few syncs, and little memory held


def save_checkpoints(states: Iterable[tuple[str, dict]], run_dir: Path, step: int, keep: int) -> dict[str, Path]:
    """Write each member's state ((member, state) pairs, made as they are taken) for ``step``, in
    batches of up to :data:`CHECKPOINT_BATCH_BYTES`: every file, then every checksum
    (:func:`save_atomic_many`; a checkpoint counts only once its checksum is there); then drop all
    but each member's ``keep`` newest. Member -> its checkpoint's path."""
    paths: dict[str, Path] = {}
    batch: list[tuple[bytes, Path]] = []
    batch_bytes = 0

    def write() -> None:
        save_atomic_many(batch)
        save_atomic_many([(hashlib.sha256(payload).hexdigest(), path.with_suffix(".sha256")) for payload, path in batch])
        batch.clear()

    for member, state in states:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        paths[member] = checkpoint_path(run_dir, member, step)
        batch.append((buffer.getvalue(), paths[member]))
        batch_bytes += len(batch[-1][0])
        if batch_bytes >= CHECKPOINT_BATCH_BYTES:
            write()
            batch_bytes = 0
    if batch:
        write()
    for member in paths:
        for old in steps_of(run_dir, member)[:-keep]:
            remove_checkpoint(run_dir, member, old)
    return paths


def remove_checkpoint(run_dir: Path, member: str, step: int) -> None:
    path = checkpoint_path(run_dir, member, step)
    for file in (path.with_suffix(".sha256"), path):  # checksum first: the step stops counting at once
        file.unlink(missing_ok=True)


def steps_of(run_dir: Path, member: str) -> list[int]:
    """Steps for which ``member`` has a checkpoint with its checksum (ascending)."""
    folder = member_dir(run_dir, member)
    if not folder.is_dir():
        return []
    steps = []
    for name in os.listdir(folder):
        match = STEP_FILE.match(name)
        if match and (folder / name).with_suffix(".sha256").exists():
            steps.append(int(match.group(1)))
    return sorted(steps)


def load_checkpoint(path: Path) -> dict:
    """Verify the checksum, then ``torch.load(weights_only=True)``; raises :class:`CheckpointError`."""
    path = Path(path)
    try:
        payload = path.read_bytes()
        expected = path.with_suffix(".sha256").read_text().strip()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CheckpointError(f"checkpoint {path} does not match its checksum: it is truncated or was altered; refusing to load it")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"checkpoint {path} holds something other than tensors and plain data: {exc}") from None


def latest_complete_step(run_dir: Path, members: list[str]) -> int | None:
    """The newest step that every member has a checkpoint for (checksum present), or None."""
    common: set[int] | None = None
    for member in members:
        steps = set(steps_of(run_dir, member))
        common = steps if common is None else common & steps
    return max(common) if common else None


# The couplings' state (Coupling.state_dict) is checkpointed as if by a member of this name, which
# no member can have (member names start with a letter or a digit).
COUPLING_STATE = "_couplings"


def save_coupling_state(run_dir: Path, step: int, states: dict[str, dict], keep: int) -> None:
    """The couplings' ``states`` (coupling name -> its state_dict) as they are before ``step``."""
    save_checkpoint(states, run_dir, COUPLING_STATE, step, keep)


def load_coupling_state(run_dir: Path, step: int, names: list[str]) -> dict[str, dict]:
    """The couplings' state saved for ``step``; raises :class:`CheckpointError` when it is missing,
    damaged, or lacks one of the couplings ``names`` (those that keep state)."""
    path = checkpoint_path(run_dir, COUPLING_STATE, step)
    if step not in steps_of(run_dir, COUPLING_STATE):
        raise CheckpointError(f"the run cannot resume from step {step}: couplings {names} keep state between rounds, and none was saved for that step ({path})")
    states = load_checkpoint(path)
    missing = [n for n in names if n not in states]
    if missing:
        raise CheckpointError(f"the run cannot resume from step {step}: {path} holds no state for couplings {missing}")
    return states


def discard_after(run_dir: Path, members: list[str], step: int | None) -> None:
    """Remove every checkpoint newer than ``step`` (all of them for None), the couplings' state
    included: a run (re)starts from ``step``."""
    for member in [*members, COUPLING_STATE]:
        for found in steps_of(run_dir, member):
            if step is None or found > step:
                remove_checkpoint(run_dir, member, found)
        folder = member_dir(run_dir, member)
        if step is None and folder.is_dir():
            for leftover in folder.iterdir():  # half-written files of an earlier run
                leftover.unlink(missing_ok=True)
    if step is None:
        coordinator_metrics_path(run_dir).unlink(missing_ok=True)
        pbt_events_path(run_dir).unlink(missing_ok=True)


def coordinator_metrics_path(run_dir: Path) -> Path:
    """The coupling metrics the coordinator had not seen written at its latest checkpoint step."""
    return Path(run_dir) / "checkpoints" / "coordinator-metrics.pt"


def pbt_events_path(run_dir: Path) -> Path:
    """Every population-based-training exploit decided so far (JSON), rewritten at each round: a
    complete checkpoint at step c implies every round before c is in it (each member passed them)."""
    return Path(run_dir) / "checkpoints" / "pbt-events.json"


def load_pbt_events(run_dir: Path, before: int | None) -> list[dict]:
    """The exploits decided before step ``before`` (the step a resumed run continues from; None: none)."""
    try:
        events = json.loads(pbt_events_path(run_dir).read_text()) if before is not None else []
    except (OSError, ValueError):
        return []
    return [e for e in events if e["step"] < before]


def load_coordinator_metrics(run_dir: Path) -> list:
    """Those metrics (``[]`` when there are none or the file is unreadable: they are only metrics)."""
    path = coordinator_metrics_path(run_dir)
    try:
        items = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return []
    except Exception as exc:
        print(f"poptrain: warning: ignoring {path}: {type(exc).__name__}: {exc}", flush=True)
        return []
    return [tuple(item) for item in items] if isinstance(items, list) else []


def write_run_record(run_dir: Path, record: dict) -> None:
    save_atomic(json.dumps(record, indent=2, sort_keys=True), Path(run_dir) / "run.json")


def read_run_record(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{run_dir} is not a poptrain run folder that can resume ({path}: {exc})") from None
