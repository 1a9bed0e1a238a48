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


class StackedBatches:
    """The batch streams of a cohort's members drawn as one, each member's stream its own (its seed,
    order and position): member i's epoch order is row i of an (N, size) index tensor and its
    position in it row i of an offsets column, so one gather per data tensor draws every member's
    batch, shape (N, batch, ...): bitwise what each member's :class:`BatchStream` would draw, at the
    cost of one draw instead of N. Per-member Python happens only where a member's epoch ends.

    The members' data must be one tensor dataset (the same tensors or equal ones: see
    :meth:`fits`), read with the same batch size. Their :class:`BatchStream` objects are
    written back (:meth:`to_streams`) before anything reads a member's position (a checkpoint, an
    exploit's donor) and read again (:meth:`from_streams`) after one was loaded."""

    def __init__(self, streams: list[BatchStream]):
        self.streams = streams
        first = streams[0]
        self.tensors, self.size, self.batch_size = first.dataset.tensors, first.size, first.batch_size  # type: ignore[attr-defined]
        self.steps = torch.arange(self.batch_size)
        self.from_streams()

    @staticmethod
    def fits(streams: list[BatchStream]) -> bool:
        """Whether ``streams`` can be drawn as one: tensor datasets holding equal tensors, and the
        same batch size."""
        first = streams[0]
        return all(b.batch_size == first.batch_size and b.size == first.size and same_tensor_data(b.dataset, first.dataset) for b in streams)

    def from_streams(self) -> None:
        """Take every member's position (epoch, offset, order) from its own stream."""
        self.epochs = [b.epoch for b in self.streams]
        self.offsets = torch.tensor([b.offset for b in self.streams], dtype=torch.long)
        self.orders = torch.stack([b._order for b in self.streams])

    def to_streams(self) -> None:
        """Write every member's position back into its own stream (its order a row of the stack's)."""
        for i, (b, offset) in enumerate(zip(self.streams, self.offsets.tolist(), strict=True)):
            b.epoch, b.offset, b._order = self.epochs[i], offset, self.orders[i].clone()  # its own: the stack's row moves on

    def next(self) -> list[torch.Tensor]:
        """Every member's next batch, stacked: [inputs..., targets], each (N, batch, ...)."""
        ended = (self.offsets > self.size - self.batch_size).nonzero().flatten().tolist()
        for i in ended:  # a member's epoch ends: its next order, as its own stream would draw it
            self.epochs[i] += 1
            self.offsets[i] = 0
            self.orders[i] = self.streams[i]._permutation(self.epochs[i])
        index = self.orders.gather(1, self.offsets.unsqueeze(1) + self.steps)
        self.offsets += self.batch_size
        return [t[index] for t in self.tensors]


def same_tensor_data(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are tensor datasets holding equal tensors (the same object, or equal
    copies: members whose data a config builds once each)."""
    if not (isinstance(a, TensorDataset) and isinstance(b, TensorDataset)):
        return False
    return a is b or all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))


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
