"""A member's batches: its training stream (seeded, resumable, independent of anything else in the
process) and its held-out data in order."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from torch.utils.data import TensorDataset, default_collate


class SizedDataset(Protocol):
    """A map-style dataset with a length, as a member's data must be (:func:`poptrain.components.build.build_dataset`
    checks it): ``dataset[i]`` is sample ``i`` (its inputs, then its target), ``len(dataset)`` their
    number. torch's ``Dataset`` declares no ``__len__``."""

    def __getitem__(self, index: int) -> Any: ...

    def __len__(self) -> int: ...


class BatchStream:
    """Seeded, resumable batches: epoch e uses permutation(seed, e); the position is (epoch, offset).

    An incomplete last batch of an epoch is dropped; a batch larger than the dataset is clamped.
    """

    def __init__(self, dataset: SizedDataset, batch_size: int, shuffle: bool, seed: int):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.size = len(dataset)
        self.batch_size = min(batch_size, self.size)
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def next(self) -> list[torch.Tensor]:
        if self.offset + self.batch_size > self.size:
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        index = self._order[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return collate(self.dataset, index)

    def follow(self, other: BatchStream) -> None:
        """Stand at ``other``'s position (epoch, offset and its order), without drawing: a stacked
        group's members on one shared stream take their batch from the first one."""
        self.epoch, self.offset, self._order = other.epoch, other.offset, other._order

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)


def in_order(dataset: SizedDataset, batch_size: int) -> Iterator[list[torch.Tensor]]:
    """Every sample of ``dataset`` once, in order, ``batch_size`` at a time (the last batch may be smaller)."""
    for start in range(0, len(dataset), batch_size):
        yield collate(dataset, torch.arange(start, min(start + batch_size, len(dataset))))


def to_device(batch: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``batch`` (CPU tensors) on ``device``; on the CPU the same tensors, not copied. To a GPU
    through pinned (page-locked) memory, asynchronously: a copy from ordinary (pageable) memory
    may first wait for all the work queued on the GPU (a host-device synchronisation every step),
    and ``non_blocking`` from it overlaps nothing; from pinned memory the copy is queued and the
    host goes on. Torch's pinned-memory cache keeps a block until the copy that reads it is done."""
    if device.type != "cuda":
        return [t.to(device) for t in batch]
    return [(t.pin_memory() if t.device.type == "cpu" else t).to(device, non_blocking=True) for t in batch]


def collate(dataset: SizedDataset, index: torch.Tensor) -> list[torch.Tensor]:
    """The samples ``index`` of ``dataset`` as one batch: [inputs..., targets]."""
    if isinstance(dataset, TensorDataset):
        return [t[index] for t in dataset.tensors]
    batch = default_collate([dataset[int(i)] for i in index])
    return list(batch) if isinstance(batch, (list, tuple)) else [batch]
