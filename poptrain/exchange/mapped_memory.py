"""Parameters in memory mapped by member and coordinator (/dev/shm): the coordinator reads and writes a member's parameters in place.

Averaging or sharing whole parameters moves more bytes than any other exchange. When a member
trains on the CPU of the coordinator's node, it keeps the parameters that only the coordinator
reads or writes (averaging sources and targets, shared modules) in one file in ``/dev/shm``
that both processes map. Sending them costs nothing, and receiving a replacement costs nothing:
the coordinator averages straight from the sources' pages into the target's.
A member on a GPU or on another node, or one that finds no room in ``/dev/shm``, exchanges
copies as before (``exchange.shared_memory: false`` forces that).

Why no one reads a half-written parameter: in ``sync`` mode a member does not touch its
parameters between sending them and receiving the round's result (its optimizer steps after
that). The coordinator reads and writes them only before it releases the round, and it also
computes, before the release, the metrics of the couplings that read them. ``async`` mode allows
no coupling that replaces parameters, and parameters that peers read go by copy.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

SHM_DIR = "/dev/shm"
ALIGN = 64  # bytes: every parameter starts on a cache line


@dataclass(frozen=True)
class MappedLayout:
    """Where a member's shared parameters live: the file, its node, its size in bytes, and each
    parameter's (name, dtype name, shape, byte offset) in it."""

    path: str
    node_id: str
    nbytes: int
    entries: tuple[tuple[str, str, tuple[int, ...], int], ...]


def file_prefix(run_tag: str) -> str:
    """The files of one run start with this (see :func:`remove_leftovers`)."""
    return os.path.join(SHM_DIR, f"poptrain-{run_tag}-")


def map_parameters(params: dict[str, torch.nn.Parameter], names: list[str], run_tag: str, node_id: str) -> MappedLayout | None:
    """Move ``params[names]`` (CPU parameters) into one new shared-memory file: afterwards each
    parameter's ``.data`` is a view of the file, with the same values, so the model, the
    optimizer and the state dict work as before. Returns the layout to hand to the coordinator,
    or None, with nothing changed, when ``/dev/shm`` is missing or has no room."""
    entries, offset = [], 0
    for name in names:
        param = params[name]
        offset = -(-offset // ALIGN) * ALIGN
        entries.append((name, str(param.dtype).removeprefix("torch."), tuple(param.shape), offset))
        offset += param.numel() * param.element_size()
    nbytes = max(ALIGN, -(-offset // ALIGN) * ALIGN)
    path = f"{file_prefix(run_tag)}{os.getpid()}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        return None
    try:
        # Reserve the pages now: a full tmpfs fails here (ENOSPC) instead of killing the process
        # with SIGBUS at its first write.
        os.posix_fallocate(fd, 0, nbytes)
    except OSError:
        os.close(fd)
        os.unlink(path)
        return None
    os.close(fd)
    layout = MappedLayout(path, node_id, nbytes, tuple(entries))
    views = map_layout(layout)
    with torch.no_grad():
        for name, view in views.items():
            view.copy_(params[name].data)
            params[name].data = view
    return layout


def map_layout(layout: MappedLayout) -> dict[str, torch.Tensor]:
    """Each parameter of ``layout`` as a tensor viewing the shared file (read and write)."""
    buffer = torch.from_file(layout.path, shared=True, size=layout.nbytes, dtype=torch.uint8)
    views = {}
    for name, dtype_name, shape, offset in layout.entries:
        dtype = getattr(torch, dtype_name)
        count = 1
        for size in shape:
            count *= size
        itemsize = torch.empty((), dtype=dtype).element_size()
        views[name] = buffer[offset : offset + count * itemsize].view(dtype).view(shape)
    return views


def attach(layout: MappedLayout, node_id: str) -> dict[str, torch.Tensor] | None:
    """The coordinator's side: map a member's file when it is on this node, then remove its name
    (both processes keep their mappings; nothing is left behind when either dies). None when
    the file is not reachable from here."""
    if layout.node_id != node_id or not os.path.exists(layout.path):
        return None
    try:
        views = map_layout(layout)
    except (OSError, RuntimeError):
        return None
    os.unlink(layout.path)
    return views


def release(layout: MappedLayout) -> None:
    """The member's side when the coordinator did not attach: drop the file's name (the member
    keeps its mapping, so its parameters stay as they are)."""
    try:
        os.unlink(layout.path)
    except FileNotFoundError:
        pass


def remove_leftovers(run_tag: str) -> None:
    """Remove the files of a run that a member created but no coordinator attached (a member
    killed in between): the driver calls this at the end of the run."""
    for path in glob.glob(glob.escape(file_prefix(run_tag)) + "*"):
        try:
            os.unlink(path)
        except OSError:
            pass
