"""A member's own random streams, so that its results do not depend on what else runs in its process.

Model initialisation, dropout and user code draw from the process-wide generators of torch (CPU
and CUDA), NumPy and Python's :mod:`random`. :class:`MemberRandomness` keeps a member's own
state of each: :meth:`MemberRandomness.active` swaps it in while the member computes and takes it
back out afterwards, leaving the process's state as it found it. A member alone in its process
draws exactly the numbers it drew from the seeded process-wide generators; several members in one
process each draw their own when they compute one after another. Not for members computing at the
same time on several threads: the process-wide generators are one, so their swaps would interleave
(``tests/in_process.py`` steps members on threads, for behaviour that draws nothing at random).
Its state is saved in the member's checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def member_seed(run_seed: int, index: int) -> int:
    """The seed of the ``index``-th member of a run seeded ``run_seed``."""
    return (run_seed * 1_000_003 + index * 7_919 + 17) % (2**31 - 1)


def _process_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _set_process_state(state: tuple, device: torch.device) -> None:
    cpu, cuda, numpy_state, python_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


class MemberRandomness:
    """The member's own torch (CPU and its CUDA device), NumPy and Python random states."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        outside = _process_state(device)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        self.state = _process_state(device)
        _set_process_state(outside, device)

    @contextmanager
    def active(self) -> Iterator[None]:
        """The member's streams are the process's inside the block; the process's own outside."""
        outside = _process_state(self.device)
        _set_process_state(self.state, self.device)
        try:
            yield
        finally:
            self.state = _process_state(self.device)
            _set_process_state(outside, self.device)

    @contextmanager
    def torch_stream(self, generator: torch.Generator) -> Iterator[torch.Generator]:
        """``generator`` (on the member's device) holding the member's own torch stream of that device
        inside the block (what its dropout draws from alone); the member's stream goes on from where
        the block left it. The process's generators are left alone."""
        index = 1 if self.device.type == "cuda" else 0
        generator.set_state(self.state[index])
        yield generator
        state = list(self.state)
        state[index] = generator.get_state()
        self.state = tuple(state)

    @contextmanager
    def borrowed(self) -> Iterator[None]:
        """As :meth:`active`, but what is drawn inside is not kept: the member's streams go on
        afterwards as if the block had not run (evaluation must not change training)."""
        with self.active():
            saved = _process_state(self.device)
            try:
                yield
            finally:
                _set_process_state(saved, self.device)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (a checkpoint loads with ``weights_only=True``)."""
        cpu, cuda, (_, keys, pos, has_gauss, gauss), python_state = self.state
        return {
            "torch": cpu,
            # The member's own device only: a restart or resume may see another number of GPUs.
            "cuda": [cuda] if cuda is not None else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            # Mersenne Twister's 625 words as one tensor, not a tuple of 625 ints: pickling those one
            # by one was most of a small member's checkpoint (a thousand members write a thousand).
            "python": (python_state[0], torch.tensor(python_state[1], dtype=torch.int64), python_state[2]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cpu, cuda, numpy_state, python_state = self.state
        numpy = state["numpy"]
        numpy_state = ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
        python = state["python"]
        words = python[1].tolist() if isinstance(python[1], torch.Tensor) else python[1]  # a tuple in checkpoints written before
        python_state = (python[0], tuple(words), python[2])
        if state["cuda"] and self.device.type == "cuda":
            cuda = state["cuda"][0]
        self.state = (state["torch"], cuda, numpy_state, python_state)
